"""Sans-IO protocol rules: origins, redirects, error bodies, Retry-After, argument checks."""

import gzip
import os
import tracemalloc
import zlib
from datetime import UTC, datetime

import httpx
import pytest

from trio_blobs import AuthenticationError, ProtocolError, RegistryError
from trio_blobs._protocol import (
    UnknownCoding,
    check_base_url,
    check_repository,
    error_for_response,
    location_target,
    parse_error_body,
    parse_retry_after,
    read_limited,
    same_origin,
)

from ._helpers import Pieces


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("http://r.test/v2/", "http://r.test:80/x", True),
        ("https://r.test/", "https://r.test:443/", True),
        ("https://r.test/", "http://r.test/", False),
        ("http://r.test:5000/", "http://r.test:5001/", False),
        ("http://r.test/", "http://cdn.r.test/", False),
        ("http://R.TEST/", "http://r.test/", True),
        ("http://r.test:8080/", "https://r.test:8080/", False),
    ],
)
def test_same_origin_compares_scheme_host_and_port(a: str, b: str, same: bool) -> None:
    assert same_origin(httpx.URL(a), httpx.URL(b)) is same


def _redirect(location: str | None, status: int = 307) -> httpx.Response:
    headers = {"location": location} if location is not None else {}
    return httpx.Response(status, headers=headers)


@pytest.mark.parametrize(
    ("current", "location", "target"),
    [
        ("http://r.test/v2/a/blobs/x", "/storage/x?sig=1", "http://r.test/storage/x?sig=1"),
        ("http://r.test/v2/a/blobs/x", "y?z=1", "http://r.test/v2/a/blobs/y?z=1"),
        ("https://r.test/v2/", "https://cdn.test/b?X-Amz=1&e=2", "https://cdn.test/b?X-Amz=1&e=2"),
        ("http://r.test/v2/", "https://cdn.test/b", "https://cdn.test/b"),
    ],
)
def test_location_target_resolves_and_keeps_query(current: str, location: str, target: str) -> None:
    assert str(location_target(httpx.URL(current), _redirect(location))) == target


@pytest.mark.parametrize(
    ("location", "target"),
    [
        ("/v2/a/blobs/uploads/u", "http://r.test/v2/a/blobs/uploads/u?digest=sha256:0"),
        ("/u?_state=a%2Bb%3D", "http://r.test/u?_state=a%2Bb%3D&digest=sha256:0"),
        ("https://s3.test/k?X-Sig=ab%2F#f", "https://s3.test/k?X-Sig=ab%2F&digest=sha256:0#f"),
        ("/u?", "http://r.test/u?digest=sha256:0"),
    ],
)
def test_location_target_adds_a_query_to_the_location_as_it_is(location: str, target: str) -> None:
    current = httpx.URL("http://r.test/v2/a/blobs/uploads/")
    got = location_target(current, _redirect(location, 202), query="digest=sha256:0")
    assert str(got) == target


def test_an_unusable_location_is_named_as_the_registry_sent_it() -> None:
    current = httpx.URL("http://r.test/v2/a/blobs/uploads/")
    with pytest.raises(ProtocolError) as caught:
        location_target(current, _redirect("http://[::1/u", 202), query="digest=sha256:0")
    assert "'http://[::1/u'" in str(caught.value)


def test_location_target_adds_a_query_to_the_fallback_too() -> None:
    fallback = httpx.URL("http://r.test/u?_state=1")
    got = location_target(fallback, _redirect(None, 202), fallback=fallback, query="digest=d")
    assert str(got) == "http://r.test/u?_state=1&digest=d"


@pytest.mark.parametrize("location", [None, "", "ftp://cdn.test/x", "http://cdn.test/x"])
def test_location_target_refuses_bad_locations_and_downgrades(location: str | None) -> None:
    with pytest.raises(ProtocolError):
        location_target(httpx.URL("https://r.test/v2/x"), _redirect(location))


def test_parse_error_body_reads_registry_json() -> None:
    body = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown","detail":{"d":1}}]}'
    assert parse_error_body("application/json", body) == ("BLOB_UNKNOWN", "blob unknown", {"d": 1})


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html", b"<html><body>429 Too Many Requests</body></html>"),
        ("application/json", b"{not json"),
        ("application/json", b'{"errors": []}'),
        ("application/json", b'{"errors": "x"}'),
        ("application/json", b"[1, 2]"),
        ("", b""),
    ],
)
def test_parse_error_body_never_shows_other_bodies(content_type: str, body: bytes) -> None:
    assert parse_error_body(content_type, body) == (None, None, None)


def test_error_for_response_names_status_code_and_message() -> None:
    request = httpx.Request("GET", "http://r.test/v2/a/blobs/sha256:00")
    response = httpx.Response(
        404,
        request=request,
        headers={"content-type": "application/json"},
    )
    body = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}'
    error = error_for_response(response, body, digest="sha256:00", what="blob", from_storage=False)
    assert type(error) is RegistryError
    assert (error.status, error.code, error.error_message) == (
        404,
        "BLOB_UNKNOWN",
        "blob unknown to registry",
    )
    assert "404 Not Found: BLOB_UNKNOWN: blob unknown to registry" in str(error)
    assert error.url == str(request.url)


def test_error_for_response_keeps_html_out_and_reads_retry_after() -> None:
    request = httpx.Request("GET", "http://r.test/x")
    response = httpx.Response(
        429, request=request, headers={"content-type": "text/html", "retry-after": "7"}
    )
    error = error_for_response(
        response, b"<html>slow down</html>", digest=None, what="blob", from_storage=False
    )
    assert "<html>" not in str(error)
    assert error.retry_after == 7.0


def test_error_for_response_401_is_authentication_error() -> None:
    response = httpx.Response(401, request=httpx.Request("GET", "http://r.test/v2/"))
    assert isinstance(
        error_for_response(response, b"", digest=None, what="blob", from_storage=False),
        AuthenticationError,
    )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 3 ", 3.0),
        ("Wed, 25 Nov 2026 10:00:30 GMT", 30.0),
        ("Wed, 25 Nov 2026 09:59:00 GMT", 0.0),
        ("soon", None),
        ("²", None),
        ("٣", None),
        ("-5", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    now = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)
    assert parse_retry_after(value, now=now) == seconds


@pytest.mark.parametrize("name", ["library/_", "a/b/c", "ollama.com/x-y_z", "user/model.v2"])
def test_check_repository_accepts_real_names(name: str) -> None:
    assert check_repository(name) == name


@pytest.mark.parametrize("name", ["", "/a", "a/", "a//b", "../x", "a/../b", "a b", "a?b", "a#b", 3])
def test_check_repository_rejects_names_that_could_escape_the_path(name: object) -> None:
    with pytest.raises(ValueError, match="repository"):
        check_repository(name)


@pytest.mark.parametrize(
    "url", ["registry.test", "ftp://r.test", "http://", "", None, "http://[::"]
)
def test_check_base_url_rejects_non_http_urls(url: object) -> None:
    with pytest.raises(ValueError, match="base_url"):
        check_base_url(url)


def test_check_base_url_drops_a_trailing_slash() -> None:
    assert str(check_base_url("http://127.0.0.1:5000/")) == "http://127.0.0.1:5000/"
    assert str(check_base_url("http://127.0.0.1:5000/mirror/")) == "http://127.0.0.1:5000/mirror"


@pytest.mark.parametrize(
    "url", ["http://u:pw@r.test", "http://r.test/?x=1", "http://r.test/#frag", "http://u@r.test"]
)
def test_check_base_url_refuses_what_it_would_drop(url: str) -> None:
    """Credentials in a URL would be silently unused; a query or fragment would be dropped."""
    with pytest.raises(ValueError, match=r"mirror takes no user:password@ .*, query or fragment"):
        check_base_url(url, "mirror")


@pytest.mark.parametrize(
    ("status", "from_storage", "retryable", "kind"),
    [
        (404, False, False, RegistryError),
        (403, False, False, RegistryError),
        (401, False, False, AuthenticationError),
        (501, False, True, RegistryError),
        (429, False, True, RegistryError),
        # an expired presigned URL: go back to the registry for a fresh one
        (403, True, True, RegistryError),
        (401, True, True, RegistryError),
        (404, True, False, RegistryError),
    ],
)
def test_error_for_response_says_what_is_worth_retrying(
    status: int, from_storage: bool, retryable: bool, kind: type[RegistryError]
) -> None:
    response = httpx.Response(status, request=httpx.Request("GET", "http://cdn.test/x"))
    error = error_for_response(response, b"", digest=None, what="blob", from_storage=from_storage)
    assert type(error) is kind
    assert error.retryable is retryable


def coded(content: bytes, *codings: str) -> httpx.Response:
    """A streamed response whose body is ``content`` encoded with ``codings``, in order."""
    for coding in codings:
        content = gzip.compress(content, mtime=0) if coding == "gzip" else zlib.compress(content)
    headers = {"content-encoding": ", ".join(codings)} if codings else {}
    pieces = [content[i : i + 1000] for i in range(0, len(content), 1000)]
    return httpx.Response(200, headers=headers, stream=Pieces(pieces))


@pytest.mark.parametrize("codings", [(), ("gzip",), ("deflate",), ("deflate", "gzip")])
async def test_read_limited_undoes_the_codings(codings: tuple[str, ...]) -> None:
    content = os.urandom(5000) + b"a" * 5000
    assert await read_limited(coded(content, *codings), 10_000) == (content, False)
    assert await read_limited(coded(content, *codings), 9_999) == (content[:9_999], True)


async def test_read_limited_never_expands_a_bomb_past_its_limit() -> None:
    """A few KB that expand to 128 MiB (gzip in gzip): read a piece at a time, and each layer
    expanded to the limit at most, it costs the limit, not 128 MiB."""
    bomb = gzip.compress(gzip.compress(b"\0" * 2**27, mtime=0), mtime=0)
    assert len(bomb) < 10_000
    tracemalloc.start()
    try:
        content, more = await read_limited(coded_bytes(bomb, "gzip, gzip"), 64 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (content, more) == (b"\0" * 64 * 1024, True)
    assert peak < 10 * 1024 * 1024


def coded_bytes(body: bytes, coding: str) -> httpx.Response:
    return httpx.Response(200, headers={"content-encoding": coding}, stream=Pieces([body]))


@pytest.mark.parametrize(
    ("body", "coding"), [(b"x", "br"), (b"not gzip", "gzip"), (b"x", "compress")]
)
async def test_read_limited_refuses_what_it_cannot_undo(body: bytes, coding: str) -> None:
    with pytest.raises(UnknownCoding):
        await read_limited(coded_bytes(body, coding), 1000)
