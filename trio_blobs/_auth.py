"""Sans-IO parsing of ``WWW-Authenticate`` challenges (RFC 7235), as registries send them.

A header holds a comma-separated list of challenges::

    challenge  = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
    auth-param = token BWS "=" BWS ( token / quoted-string )

The list separator and the parameter separator are the same comma, so the scanner looks at each
comma-separated item and decides what it is: ``name = value`` is a parameter of the current
challenge; an item that starts with any other token starts a new challenge (``scheme``,
``scheme token68`` or ``scheme name=value``); anything else is skipped. Fetching tokens is not
done here.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass

__all__ = ["AuthChallenge", "parse_auth_challenge"]

# RFC 9110 whitespace is SP / HTAB; CR and LF are accepted as well in case a folded header
# reaches us unfolded.
_WS = " \t\r\n"
# A "word" is what the scanner reads where a scheme, a parameter name or a token68 may stand.
# It is lenient (any character but these); whether it is a valid token is checked separately.
_WORD_END = frozenset(_WS + ',="')
# RFC 9110 tchar: the characters allowed in a scheme or parameter name.
_TCHAR = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)


@dataclass(frozen=True, slots=True)
class AuthChallenge:
    """One challenge from a WWW-Authenticate header."""

    scheme: str | None = None
    """Lower-cased: ``"bearer"``, ``"basic"``, ...; None for an empty or garbage header."""
    realm: str | None = None
    service: str | None = None
    scope: str | None = None
    error: str | None = None
    """Why credentials sent were refused (RFC 6750: ``"invalid_token"``,
    ``"insufficient_scope"``); None for a first challenge. A ``get_token`` should not hand back
    a cached token for a challenge with an ``error``."""
    origin: str | None = None
    """Who challenged, as ``scheme://host[:port]``: the registry or a mirror. Not in the header:
    set by the transfers (None from :func:`parse_auth_challenge`)."""

    def with_scopes(self, *scopes: str | None) -> AuthChallenge:
        """This challenge asking for ``scopes`` besides its own, merged per resource:
        ``repository:a/b:pull`` and ``repository:a/b:push`` make ``repository:a/b:pull,push``.

        A challenge names what one request needs (from ``/v2/``, nothing); a client that asks
        for what all its requests need gets one token that serves them all.
        """
        return dataclasses.replace(self, scope=merge_scopes(self.scope, *scopes) or None)


def merge_scopes(*scopes: str | None) -> str:
    """The union of space-separated token scopes (``type:name:action,...``), one item per
    resource, in a stable order; an item of another shape is kept as it is."""
    resources: dict[tuple[str, str], set[str]] = {}
    others: set[str] = set()
    for scope in scopes:
        for item in (scope or "").split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind and name:
                resources.setdefault((kind, name), set()).update(filter(None, actions.split(",")))
            else:
                others.add(item)
    merged = [f"{k}:{n}:{','.join(sorted(a))}" for (k, n), a in sorted(resources.items())]
    return " ".join(merged + sorted(others))


def parse_auth_challenge(header: str) -> AuthChallenge:
    """The challenge to answer from a ``WWW-Authenticate`` header value.

    The first Bearer challenge if there is one, otherwise the first challenge of any scheme;
    ``AuthChallenge()`` if there is none. Only ``realm``, ``service``, ``scope`` and ``error``
    are kept;
    a parameter given twice keeps its first value. Never raises: malformed parts are skipped.
    """
    challenges = _parse_challenges(header)
    chosen = next((c for c in challenges if c[0] == "bearer"), None)
    if chosen is None:
        if not challenges:
            return AuthChallenge()
        chosen = challenges[0]
    scheme, params = chosen
    return AuthChallenge(
        scheme=scheme,
        realm=params.get("realm"),
        service=params.get("service"),
        scope=params.get("scope"),
        error=params.get("error"),
    )


def _parse_challenges(s: str) -> list[tuple[str, dict[str, str]]]:
    """Every well-formed challenge in ``s`` as ``(lower-case scheme, {lower-case name: value})``."""
    challenges: list[tuple[str, dict[str, str]]] = []
    # The parameters of the challenge being read; None while parameters have nowhere to go
    # (before the first scheme, after a token68, after a malformed scheme).
    params: dict[str, str] | None = None
    # True between "scheme SP" and the next comma: the one place a token68 may stand.
    after_scheme = False
    i, n = 0, len(s)
    while True:
        i = _skip_ws(s, i)
        if i >= n:
            return challenges
        if s[i] == ",":  # also skips empty list elements: ", ,"
            i += 1
            after_scheme = False
            continue

        word, j = _read_word(s, i)
        k = _skip_ws(s, j)
        is_param = k < n and s[k] == "="
        if is_param and after_scheme and _only_padding(s, k):
            # "Basic dXNlcjpwYXNz==": the '='s are a token68's padding, not a parameter.
            is_param = False

        if is_param:
            value, i = _read_value(s, k + 1)
            if params is not None and value is not None and _is_token(word):
                params.setdefault(word.lower(), value)  # first one wins
            i = _skip_item(s, i)  # junk after a value, up to the next comma, is ignored
        elif not after_scheme and _is_token(word):
            # Not a parameter, at the start or after a comma: a new challenge's scheme.
            params = {}
            challenges.append((word.lower(), params))
            after_scheme = True
            i = j
            continue
        else:
            # A token68 after the scheme, or an item that is neither a parameter nor a
            # scheme (a stray quoted string, a malformed scheme): it ends the parameter list
            # of the current challenge, and the rest of the item goes with it.
            params = None
            i = _skip_item(s, j)
        after_scheme = False


def _is_token(word: str) -> bool:
    return bool(word) and all(c in _TCHAR for c in word)


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _read_word(s: str, i: int) -> tuple[str, int]:
    start = i
    while i < len(s) and s[i] not in _WORD_END:
        i += 1
    return s[start:i], i


def _read_quoted(s: str, i: int) -> tuple[str, int]:
    """Read the quoted-string whose opening quote is at ``s[i]``.

    ``\\x`` stands for ``x``; an unterminated string runs to the end of ``s``.
    """
    out: list[str] = []
    i += 1
    while i < len(s):
        c = s[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\" and i + 1 < len(s):
            i += 1
            c = s[i]
        out.append(c)
        i += 1
    return "".join(out), i


def _read_value(s: str, i: int) -> tuple[str | None, int]:
    """Read a parameter value starting at ``s[i]`` (after the '='); None if it is empty.

    Unquoted values are read leniently, as registries send them: up to the next comma, so
    ``realm=https://host/token?x=y`` keeps its ``=``, ``/`` and ``:``.
    """
    i = _skip_ws(s, i)
    if i < len(s) and s[i] == '"':
        return _read_quoted(s, i)
    end = s.find(",", i)
    if end < 0:
        end = len(s)
    value = s[i:end].rstrip(_WS)
    return value or None, end


def _skip_item(s: str, i: int) -> int:
    """Index of the next comma outside a quoted string (or the end of ``s``)."""
    while i < len(s) and s[i] != ",":
        if s[i] == '"':
            _, i = _read_quoted(s, i)
        else:
            i += 1
    return i


def _only_padding(s: str, i: int) -> bool:
    """Whether the rest of this list item, from ``s[i]``, is only '=' and whitespace."""
    return all(c == "=" or c in _WS for c in s[i : _skip_item(s, i)])
