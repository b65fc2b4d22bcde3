"""WWW-Authenticate parsing: real registries' headers, the corners of RFC 7235, and fuzzing."""

from __future__ import annotations

import dataclasses
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_blobs._auth import AuthChallenge, merge_scopes, parse_auth_challenge

A = AuthChallenge
HUB_REALM = "https://auth.docker.io/token"

CASES: list[tuple[str, AuthChallenge]] = [
    # Real registries.
    (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/ubuntu:pull"',
        A("bearer", HUB_REALM, "registry.docker.io", "repository:library/ubuntu:pull"),
    ),
    (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:me/app:pull,push",error="insufficient_scope"',
        A(
            "bearer",
            HUB_REALM,
            "registry.docker.io",
            "repository:me/app:pull,push",
            "insufficient_scope",
        ),
    ),
    (
        'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:octo/hello:pull"',
        A("bearer", "https://ghcr.io/token", "ghcr.io", "repository:octo/hello:pull"),
    ),
    (
        'Bearer realm="https://quay.io/v2/auth",service="quay.io"',
        A("bearer", "https://quay.io/v2/auth", "quay.io"),
    ),
    (
        'Basic realm="https://123456789012.dkr.ecr.us-east-1.amazonaws.com/",'
        'service="ecr.amazonaws.com"',
        A("basic", "https://123456789012.dkr.ecr.us-east-1.amazonaws.com/", "ecr.amazonaws.com"),
    ),
    ('Basic realm="Registry Realm"', A("basic", "Registry Realm")),
    # Several challenges: Bearer wins wherever it is, otherwise the first one.
    ('Basic realm="x", Bearer realm="y",service="z"', A("bearer", "y", "z")),
    ('Bearer realm="y",service="z", Basic realm="x"', A("bearer", "y", "z")),
    ('Basic realm="x", Digest realm="y", nonce="n"', A("basic", "x")),
    ('Bearer realm="a", Bearer realm="b"', A("bearer", "a")),
    (
        'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"',
        A("newauth", "apps"),
    ),
    # Unquoted values run to the next comma.
    (
        "Bearer realm=https://auth.example/token?x=y&a=b:c,service=reg.example",
        A("bearer", "https://auth.example/token?x=y&a=b:c", "reg.example"),
    ),
    ("Bearer realm=https://h/t  ,  service=s   ", A("bearer", "https://h/t", "s")),
    # Commas and '=' inside quoted values.
    (
        'Bearer realm="https://h/token?service=a,b&scope=c=d",service="s"',
        A("bearer", "https://h/token?service=a,b&scope=c=d", "s"),
    ),
    # Escapes: \" and \\ and \x -> x.
    ('Bearer realm="a\\"b\\\\c\\d"', A("bearer", 'a"b\\cd')),
    ('Bearer realm="\\\\"', A("bearer", "\\")),
    ('Bearer realm=""', A("bearer", "")),
    # Case of scheme and parameter names.
    ('BEARER Realm="r",SERVICE="s",ScOpE="c"', A("bearer", "r", "s", "c")),
    ('bAsIc REALM="r"', A("basic", "r")),
    # Whitespace, tabs, BWS around '=', empty list elements.
    (' \tBearer\t realm = "r" ,\t, ,service\t=\t"s",,  ', A("bearer", "r", "s")),
    (',, ,Bearer realm="r"', A("bearer", "r")),
    # token68 after a scheme is neither a parameter nor in the way of later challenges.
    ('Basic dXNlcjpwYXNz==, Bearer realm="r"', A("bearer", "r")),
    ('Negotiate a87421000492aa874209af8bc028, Bearer realm="r"', A("bearer", "r")),
    ("Basic dXNlcjpwYXNz==", A("basic")),
    ('Basic dXNl/+cjpw= , realm="not basic\'s"', A("basic")),
    ('Foo abc==, Basic realm="b"', A("foo")),
    # Unknown parameters are ignored; a repeated one keeps its first value.
    (
        'Bearer error="invalid_token",realm="r",charset="UTF-8"',
        A("bearer", "r", error="invalid_token"),
    ),
    ('Bearer realm="first", realm="second", REALM=third', A("bearer", "first")),
    # A scheme with no parameters.
    ("Bearer", A("bearer")),
    ("Basic, Bearer", A("bearer")),
    # Unbalanced quotes: an unterminated quoted string runs to the end.
    ('Bearer realm="r, service="s', A("bearer", "r, service=")),
    ('Bearer realm="r\\', A("bearer", "r\\")),
    # Junk after a quoted value, up to the next comma, is ignored.
    ('Bearer realm="r"junk x, service="s"', A("bearer", "r", "s")),
    # Garbage.
    ("", A()),
    ("   \t ", A()),
    (",,,", A()),
    ('"', A()),
    ('="x"', A()),
    ('realm="r", service="s"', A()),
    ("\x00\x01\x7f", A()),
    ('B@d realm="x"', A()),
]


@pytest.mark.parametrize(("header", "expected"), CASES)
def test_examples(header: str, expected: AuthChallenge) -> None:
    assert parse_auth_challenge(header) == expected


def test_with_scopes_merges_actions_per_resource() -> None:
    bare = parse_auth_challenge('Bearer realm="r",service="s"')
    filled = bare.with_scopes("repository:a/b:pull")
    assert filled == A("bearer", "r", "s", "repository:a/b:pull")
    assert bare.scope is None  # unchanged
    merged = filled.with_scopes("repository:x:pull repository:a/b:push,pull", None)
    assert merged.scope == "repository:a/b:pull,push repository:x:pull"
    assert merged.with_scopes("repository:a/b:push").scope == merged.scope
    assert A("bearer", "r", scope="").with_scopes().scope is None


@pytest.mark.parametrize(
    ("scopes", "merged"),
    [
        (["registry:catalog:*", "registry:catalog:*"], "registry:catalog:*"),
        (["repository:a:delete", "repository:a:pull,push"], "repository:a:delete,pull,push"),
        (
            ["repository(plugin):a:pull", "repository:a:pull"],
            "repository:a:pull repository(plugin):a:pull",
        ),
        (["odd", "repository:a:", "odd"], "repository:a: odd"),
        (["repository:h:5000/a:pull"], "repository:h:5000/a:pull"),
    ],
)
def test_merge_scopes(scopes: list[str], merged: str) -> None:
    assert merge_scopes(*scopes) == merged


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        A("bearer").realm = "x"  # type: ignore[misc]


# --- Properties ---------------------------------------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
TOKEN68_CHARS = string.ascii_letters + string.digits + "-._~+/"
OWS = st.text(" \t", max_size=2)
RWS = st.text(" \t", min_size=1, max_size=2)
KNOWN = ("realm", "service", "scope", "error")

tokens = st.text(TCHARS, min_size=1, max_size=8)
other_schemes = tokens.filter(lambda t: t.lower() != "bearer")
extra_names = tokens.filter(lambda t: t.lower() not in KNOWN)


@st.composite
def random_case(draw: st.DrawFn, word: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return "".join(c.swapcase() if f else c for c, f in zip(word, flips, strict=True))


@st.composite
def rendered_value(draw: st.DrawFn, value: str) -> str:
    """``value`` as a quoted string (minimal or gratuitous escapes), or bare where possible."""
    bare_ok = (
        value
        and "," not in value
        and value[0] not in ' \t\r\n"'
        and value[-1] not in " \t\r\n"
        and value.strip("=")  # '=' alone right after a scheme is token68 padding
    )
    how = draw(st.sampled_from(["quoted", "escape-all", "bare"] if bare_ok else ["quoted"]))
    if how == "bare":
        return value
    if how == "escape-all":
        return '"' + "".join("\\" + c for c in value) + '"'
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def param_list(draw: st.DrawFn, params: list[tuple[str, str]]) -> str:
    parts = []
    for name, value in params:
        lhs = draw(OWS) + "=" + draw(OWS)
        parts.append(name + lhs + draw(rendered_value(value)))
    out = ""
    for k, part in enumerate(parts):
        if k:
            out += draw(OWS) + "," + draw(st.sampled_from(["", ",", " , ", ",\t,"])) + draw(OWS)
        out += part
    return out


@st.composite
def other_challenge(draw: st.DrawFn) -> str:
    scheme = draw(other_schemes)
    kind = draw(st.sampled_from(["bare", "token68", "params"]))
    if kind == "bare":
        return scheme
    if kind == "token68":
        t68 = draw(st.text(TOKEN68_CHARS, min_size=1, max_size=12)) + "=" * draw(st.integers(0, 2))
        return scheme + draw(RWS) + t68
    params = draw(st.lists(st.tuples(tokens, st.text(max_size=10)), min_size=1, max_size=3))
    return scheme + draw(RWS) + draw(param_list(params))


@st.composite
def headers(draw: st.DrawFn) -> tuple[str, AuthChallenge]:
    """A header with one Bearer challenge among others, and what it must parse to."""
    values = {name: draw(st.none() | st.text(max_size=20)) for name in KNOWN}
    params = [(draw(random_case(n)), v) for n, v in values.items() if v is not None]
    params += draw(st.lists(st.tuples(extra_names, st.text(max_size=10)), max_size=3))
    params = draw(st.permutations(params))
    bearer = draw(random_case("bearer"))
    if params:
        bearer += draw(RWS) + draw(param_list(params))
    challenges = [
        *draw(st.lists(other_challenge(), max_size=2)),
        bearer,
        *draw(st.lists(other_challenge(), max_size=2)),
    ]
    sep = st.builds(lambda a, b, c: a + "," + b + c, OWS, st.sampled_from(["", ", ", ","]), OWS)
    header = draw(OWS) + challenges[0]
    for challenge in challenges[1:]:
        header += draw(sep) + challenge
    header += draw(OWS)
    return header, AuthChallenge("bearer", **values)


@settings(max_examples=250, deadline=None)
@given(headers())
def test_recovers_bearer_parameters(case: tuple[str, AuthChallenge]) -> None:
    header, expected = case
    assert parse_auth_challenge(header) == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(other_challenge(), min_size=1, max_size=4))
def test_without_bearer_the_first_challenge_wins(challenges: list[str]) -> None:
    result = parse_auth_challenge(", ".join(challenges))
    assert result.scheme == challenges[0].split()[0].lower()


@settings(max_examples=500, deadline=None)
@given(st.text() | st.text('Bearer Basic realm=",\\ \t\r\n=scope'))
def test_never_raises(header: str) -> None:
    result = parse_auth_challenge(header)
    assert isinstance(result, AuthChallenge)
    if result.scheme is not None:
        assert result.scheme
        assert all(c in TCHARS for c in result.scheme)
        assert result.scheme == result.scheme.lower()
