"""Sans-IO registry protocol decisions: redirects, origins, error bodies, retry hints.

Nothing here does I/O, so each rule is tested without a socket.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus

import httpx

from ._exceptions import AuthenticationError, IntegrityError, ProtocolError, RegistryError

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRYABLE_STATUSES = frozenset({408, 429, *range(500, 600)})
MAX_REDIRECTS = 10
MAX_PORT = 65535

# Path components of a repository name: generous enough for every real registry, strict enough
# that a name can never step out of its URL path.
_REPOSITORY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # the distribution spec's tag grammar


def check_int(name: str, value: object, minimum: int = 1) -> None:
    """Raise :class:`ValueError` unless ``value`` is an int of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    """Raise :class:`TypeError` unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_repository(repository: object) -> str:
    """Return ``repository`` if it is a usable repository name, else raise :class:`ValueError`."""
    if not isinstance(repository, str) or not _REPOSITORY_RE.fullmatch(repository):
        raise ValueError(f"{repository!r} is not a valid repository name (e.g. 'library/ubuntu')")
    return repository


def http_url(value: object) -> httpx.URL | None:
    """``value`` parsed as an http:// or https:// URL with a host, or None."""
    try:
        url = httpx.URL(value) if isinstance(value, str | httpx.URL) else None
    except httpx.InvalidURL:
        return None
    return url if url is not None and url.scheme in ("http", "https") and url.host else None


def check_base_url(base_url: object, name: str = "base_url") -> httpx.URL:
    """Parse ``base_url`` (``http(s)://host[:port][/path]``, called ``name`` in errors), or
    raise :class:`ValueError`."""
    url = http_url(base_url)
    if url is None:
        raise ValueError(f"{name} must be an http:// or https:// URL, got {base_url!r}")
    if url.userinfo or url.query or url.fragment:
        raise ValueError(
            f"{name} takes no user:password@ (credentials come from token= or get_token=), "
            f"query or fragment: got {base_url!r}"
        )
    if url.port is not None and not (0 < url.port <= MAX_PORT and f":{url.port}" in str(base_url)):
        # the second: httpx reads a port written in other scripts' digits as ASCII ones
        raise ValueError(f"{name} needs a port of 1-{MAX_PORT} in ASCII digits: got {base_url!r}")
    path = url.path.rstrip("/") or "/"
    if path.endswith("/v2"):
        raise ValueError(f"{name} is the registry's root, without /v2: got {base_url!r}")
    return url.copy_with(path=path)


def origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """Scheme, host and effective port: what decides where credentials may go."""
    return (url.scheme, url.host, url.port or {"http": 80, "https": 443}.get(url.scheme))


def same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    """Whether two URLs share scheme, host and (effective) port."""
    return origin(a) == origin(b)


def add_query(reference: str, query: str) -> str:
    """The URL (or relative reference) ``reference`` with ``query`` added to its query."""
    rest, hash_mark, fragment = reference.partition("#")
    joiner = "" if rest.endswith(("?", "&")) else "&" if "?" in rest else "?"
    return f"{rest}{joiner}{query}{hash_mark}{fragment}"


def location_target(
    current: httpx.URL,
    response: httpx.Response,
    *,
    headers: tuple[str, ...] = ("location",),
    fallback: httpx.URL | None = None,
    query: str | None = None,
) -> httpx.URL:
    """Where a response sends the client next (a redirect, an upload session's next place),
    resolved against ``current``, the URL it answered; with ``query`` (``name=value``) added to
    its query, which is otherwise kept as it is.

    The first of ``headers`` present counts; without any, ``fallback`` if given. Raises
    :class:`ProtocolError` for a missing or unusable location and for a downgrade from https to
    http.
    """
    location = next((response.headers[h] for h in headers if response.headers.get(h)), None)
    if location is None:
        if fallback is None:
            raise ProtocolError(
                f"answer {response.status_code} without a Location", url=str(current)
            )
        if query is None:
            return fallback
        location = str(fallback)
    # The query is added before parsing: an upload session's URL can be long, and parsing costs.
    reference = location if query is None else add_query(location, query)
    try:
        # An absolute Location (the usual kind) parses faster alone than joined.
        absolute = reference.startswith(("http://", "https://"))
        target = httpx.URL(reference) if absolute else current.join(reference)
    except httpx.InvalidURL as exc:
        raise ProtocolError(f"unusable Location {location!r}", url=str(current)) from exc
    if target.scheme not in ("http", "https") or not target.host:
        raise ProtocolError(f"unusable Location {location!r}", url=str(current))
    if current.scheme == "https" and target.scheme == "http":
        raise ProtocolError("refusing to go from https to http", url=str(target))
    return target


def check_announced_digest(response: httpx.Response, digest: str) -> None:
    """Raise :class:`IntegrityError` if ``Docker-Content-Digest`` names another digest."""
    announced = response.headers.get("docker-content-digest")
    if announced is not None and announced.strip() != digest:
        raise IntegrityError(
            f"server announced digest {announced.strip()}",
            digest=digest,
            url=str(response.request.url),
        )


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date), if valid."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+", value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def parse_error_body(content_type: str, body: bytes) -> tuple[str | None, str | None, object]:
    """``(code, message, detail)`` of the first error in a registry's JSON error body.

    Anything that is not such a body (an HTML page from a CDN, say) gives ``(None, None, None)``:
    it is never shown to the user.
    """
    if "json" not in content_type.lower() and not body.lstrip().startswith(b"{"):
        return None, None, None
    try:
        errors = json.loads(body)["errors"]
        first = errors[0]
        code, message = first.get("code"), first.get("message")
        return (
            code if isinstance(code, str) else None,
            message if isinstance(message, str) else None,
            first.get("detail"),
        )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None, None, None


def error_for_response(
    response: httpx.Response, body: bytes, *, digest: str | None, what: str, from_storage: bool
) -> RegistryError:
    """The error to raise for a final non-success ``response`` whose (capped) body is ``body``.

    ``what`` says what was asked for (``"blob"``, ``"manifest"``, ...) and starts the message.
    408, 429 and 5xx are worth retrying; so are 401 and 403 from a storage origin the registry
    redirected to (``from_storage``): a presigned URL that expired, to be asked for anew.
    """
    status = response.status_code
    code, error_message, detail = parse_error_body(response.headers.get("content-type", ""), body)
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = response.reason_phrase or "unknown status"
    text = f"{what} request failed with {status} {reason}"
    if code or error_message:
        text += ": " + ": ".join(part for part in (code, error_message) if part)
    retryable = status in RETRYABLE_STATUSES or (from_storage and status in (401, 403))
    cls = AuthenticationError if status == 401 and not from_storage else RegistryError
    return cls(
        text,
        status=status,
        code=code,
        error_message=error_message,
        detail=detail,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        retryable=retryable,
        digest=digest,
        url=str(response.request.url),
    )


class UnknownCoding(ValueError):
    """A ``Content-Encoding`` that :func:`read_limited` does not undo."""


async def read_limited(
    response: httpx.Response, limit: int, arrived: Callable[[int], object] | None = None
) -> tuple[bytes, bool]:
    """``response``'s content, decoded as its ``Content-Encoding`` says (gzip, deflate), up to
    ``limit`` bytes, and whether there was more; ``arrived(n)`` is told of each piece received.

    Bytes are taken as they came (httpx would expand a piece whole, however far) and expanded
    no further than the limit, so a small compressed body cannot fill the memory. Raises
    :class:`UnknownCoding` for another coding.
    """
    if response.is_stream_consumed:  # read already (by an event hook, say), and decoded
        try:
            content = response.content
        except httpx.ResponseNotRead:  # streamed by someone else: nothing left to read
            return b"", False
        return content[:limit], len(content) > limit
    layers = []
    for coding in reversed(response.headers.get("content-encoding", "").lower().split(",")):
        coding = coding.strip()
        if coding in ("gzip", "x-gzip"):
            layers.append(zlib.decompressobj(16 + zlib.MAX_WBITS))
        elif coding == "deflate":
            layers.append(zlib.decompressobj())
        elif coding not in ("", "identity"):
            raise UnknownCoding(f"Content-Encoding {coding!r}")
    pieces: list[bytes] = []
    size = 0
    try:
        async for piece in response.aiter_raw():
            if arrived is not None:
                arrived(len(piece))
            for layer in layers:  # each layer expands to one byte past the limit at most
                piece = layer.decompress(piece, limit - size + 1)
            pieces.append(piece)
            size += len(piece)
            if size > limit or any(layer.unconsumed_tail for layer in layers):
                return b"".join(pieces)[:limit], True
    except zlib.error as exc:
        raise UnknownCoding(f"a body that is not what its Content-Encoding says: {exc}") from exc
    return b"".join(pieces), False
