"""An OCI distribution registry held in memory, with faults injected on demand."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from urllib.parse import parse_qs, quote, unquote

import httpx
import trio

from .._digest import Blob, check_digest, compute_digest
from ._server import DropConnection, MemoryTransport, Response, listen, run_server

__all__ = ["Fault", "RecordedRequest", "Registry"]

_CHUNK = 1 << 20  # response bodies are sent in slices of this size
_TRICKLE_HZ = 20  # a trickled body is sent in this many slices per second
_SERVICE = "trio-blobs-test"
_NAME = r"(?P<name>[a-z0-9._-]+(?:/[a-z0-9._-]+)*)"
_CONTENT_RANGE = re.compile(r"(\d+)-(\d+)")
_MESSAGES = {
    "BLOB_UNKNOWN": "blob unknown to registry",
    "BLOB_UPLOAD_INVALID": "blob upload invalid",
    "BLOB_UPLOAD_UNKNOWN": "blob upload unknown to registry",
    "DENIED": "requested access to the resource is denied",
    "DIGEST_INVALID": "provided digest did not match uploaded content",
    "MANIFEST_BLOB_UNKNOWN": "manifest references a manifest or blob unknown to registry",
    "MANIFEST_INVALID": "manifest invalid",
    "MANIFEST_UNKNOWN": "manifest unknown to registry",
    "NAME_UNKNOWN": "repository name not known to registry",
    "PAGINATION_NUMBER_INVALID": "invalid number of results requested",
    "SIZE_INVALID": "provided length did not match content length",
    "TOOMANYREQUESTS": "too many requests",
    "UNAUTHORIZED": "authentication required",
    "UNKNOWN": "unknown error",
    "UNSUPPORTED": "the operation is unsupported",
}
_STATUS_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 405: "UNSUPPORTED", 429: "TOOMANYREQUESTS"}
_UNKNOWN_CODES = [  # a 404's code, by the end of its path
    (re.compile(r"/blobs/uploads/[^/]*$"), "BLOB_UPLOAD_UNKNOWN"),
    (re.compile(r"/blobs/[^/]+$|^/_storage/"), "BLOB_UNKNOWN"),
    (re.compile(r"/manifests/[^/]+$"), "MANIFEST_UNKNOWN"),
]


@dataclass(frozen=True, kw_only=True, slots=True)
class RecordedRequest:
    """A request as the registry received it.

    ``url`` is absolute (origin, path and query); ``body_size`` is set once the body is read.
    """

    method: str
    url: str
    headers: httpx.Headers
    body_size: int


@dataclass(kw_only=True, eq=False)
class Fault:
    """Misbehaviour applied to the next ``times`` requests that match.

    A request matches when its method is ``method`` (``None``: any), its path or query names
    ``digest`` (a blob's ``GET``, the ``PUT`` or ``POST`` that uploads it, a mount of it), and its
    path (without the query) contains ``path``; ``None`` matches anything. ``matched`` counts
    the requests it applied to.

    ``status`` answers with that status (and ``body``, else a JSON error whose code a registry
    would send: ``BLOB_UNKNOWN`` for a 404 of a blob, say) without touching the registry's
    state; without it the request is handled and only the response altered.
    ``headers`` replace same-named response headers (not Content-Length). ``delay`` holds the
    response head back. The body faults apply to whatever body is sent, a ``status`` answer's
    included, and compose: ``corrupt`` (flip the middle byte) and ``extra`` change the body, and
    Content-Length follows; then at most ``min(stall_after, truncate_at)`` bytes are sent, at
    ``trickle`` bytes per second if set. After ``stall_after`` bytes nothing more is sent until
    the request is cancelled; after ``truncate_at`` the connection drops (the in-memory
    transport raises :class:`httpx.RemoteProtocolError`). A response without a body (a
    ``HEAD``'s, a ``201``'s) has nothing to cut but itself: ``stall_after=0`` and
    ``truncate_at=0`` stall or drop it in place of its head, so that the request takes effect
    and its answer never comes.
    """

    method: str | None = "GET"
    digest: str | None = None
    path: str | None = None
    times: int | None = 1
    status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    delay: float = 0.0
    stall_after: int | None = None
    trickle: float | None = None
    truncate_at: int | None = None
    corrupt: bool = False
    extra: bytes = b""
    matched: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        for name in ("method", "path"):
            if not isinstance(getattr(self, name), str | None):
                raise TypeError(f"{name} must be a str or None, got {getattr(self, name)!r}")
        for name in ("times", "status", "stall_after", "truncate_at"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int or None, got {value!r}")
        if not isinstance(self.body, bytes | None) or not isinstance(self.extra, bytes):
            raise TypeError("body and extra must be bytes")
        if not isinstance(self.corrupt, bool):
            raise TypeError(f"corrupt must be True or False, got {self.corrupt!r}")
        for name, value in (("delay", self.delay), ("trickle", self.trickle)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not isinstance(self.headers, Mapping) or not all(
            isinstance(x, str) for item in self.headers.items() for x in item
        ):
            raise TypeError(f"headers must map str to str, got {self.headers!r}")
        if self.digest is not None:
            check_digest(self.digest)
        if self.times is not None and self.times < 1:
            raise ValueError(f"times must be at least 1 or None, got {self.times!r}")
        if self.status is not None and not 200 <= self.status <= 599:
            raise ValueError(f"status must be in 200..599, got {self.status!r}")
        if not self.delay >= 0 or (self.trickle is not None and not self.trickle > 0):
            raise ValueError("delay must be >= 0 and trickle > 0")
        if min(self.stall_after or 0, self.truncate_at or 0) < 0:
            raise ValueError("stall_after and truncate_at must be >= 0")

    def _matches(self, method: str, path: str, query: str) -> bool:
        return (
            (self.times is None or self.matched < self.times)
            and (self.method is None or self.method.upper() == method)
            and (self.digest is None or self.digest in path or self.digest in query)
            and (self.path is None or self.path in path)
        )


@dataclass(slots=True)
class _Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes = b""


class _Refused(Exception):
    """Raised by a route to answer with ``reply`` (an error) instead."""

    def __init__(self, reply: _Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def _error(status: int, code: str, detail: object = None, **headers: str) -> _Reply:
    error = {"code": code, "message": _MESSAGES[code], "detail": detail}
    return _Reply(
        status,
        {"Content-Type": "application/json", **headers},
        json.dumps({"errors": [error]}).encode(),
    )


def _json(status: int, value: object) -> _Reply:
    return _Reply(status, {"Content-Type": "application/json"}, json.dumps(value).encode())


def _unknown_upload(call: _Call) -> _Refused:
    return _Refused(_error(404, "BLOB_UPLOAD_UNKNOWN", {"uuid": call.params["uuid"]}))


def _valid_digest(digest: str | None) -> str:
    try:
        return check_digest(digest)
    except ValueError:
        raise _Refused(_error(400, "DIGEST_INVALID", {"digest": digest})) from None


class _Body:
    """A request body that counts what is read from it."""

    def __init__(self, source: AsyncIterable[bytes]) -> None:
        self._chunks = aiter(source)
        self.size = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        chunk = await anext(self._chunks)
        self.size += len(chunk)
        return chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    async def drain(self) -> None:
        async for _ in self:
            pass


@dataclass(frozen=True, slots=True)
class _Call:
    """A routed request: ``params`` are the path's parts (name, digest, reference, uuid)."""

    method: str
    origin: str
    params: dict[str, str]
    query: dict[str, str]
    headers: httpx.Headers
    body: _Body


@dataclass(slots=True)
class _Upload:
    name: str
    state: str
    issued: set[str]
    data: bytearray = field(default_factory=bytearray)
    short_chunk: int | None = None  # a PATCH this short must have been the last one


class Registry:
    """An in-memory registry serving the OCI distribution API subset that blob transfers use.

    State is public and mutable: ``blobs`` (repository -> digest -> bytes), ``manifests``
    (repository -> tag or digest -> (bytes, media type)), ``requests`` (every request, in
    arrival order), ``faults``, ``token`` (when set, ``/v2/`` needs ``Bearer <token>``; changing it
    expires the old one), ``token_requests``, ``chunk_min_length``, ``mount`` and
    ``redirect_blobs_to`` (an origin that blob GETs are redirected to with a 307 to
    ``/_storage/<digest>?expires=...&sig=...``). ``/_storage/<digest>`` serves a blob of any
    repository, needs no token and ignores the query; it is recorded like every request. Blob
    GETs honour ``Range: bytes=<start>-`` with a 206 (``ranges=False`` ignores it, answering 200
    with the whole blob, as some servers do). A POST to ``blobs/uploads/?digest=<digest>`` stores
    the blob it carries (``whole_posts=False`` ignores the body and opens an upload session, as
    the distribution registry does).

    Upload sessions live at ``/v2/<name>/blobs/uploads/<uuid>?_state=<opaque>``; each PATCH issues
    a new ``_state``. PATCH and PUT need the current one (a stale Location is refused with 400
    ``BLOB_UPLOAD_INVALID``); GET and DELETE accept any state issued for the session, and GET
    answers with the current Location. A failed digest check on PUT ends the session.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        chunk_min_length: int | None = None,
        mount: bool = True,
        redirect_blobs_to: str | None = None,
        ranges: bool = True,
        whole_posts: bool = True,
    ) -> None:
        self.blobs: dict[str, dict[str, bytes]] = {}
        self.manifests: dict[str, dict[str, tuple[bytes, str]]] = {}
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self.token = token
        self.token_requests = 0
        self.chunk_min_length = chunk_min_length
        self.mount = mount
        self.redirect_blobs_to = redirect_blobs_to
        self.ranges = ranges
        self.whole_posts = whole_posts
        self._uploads: dict[str, _Upload] = {}

    def add_blob(self, data: bytes, repository: str = "library/_") -> Blob:
        """Store ``data`` in ``repository`` and return the blob it is."""
        if not isinstance(repository, str) or not re.fullmatch(_NAME, repository):
            raise ValueError(
                f"{repository!r} is not a repository name (lower-case components, '/' between)"
            )
        blob = Blob.from_bytes(data)
        self.blobs.setdefault(repository, {})[blob.digest] = data
        return blob

    def add_fault(self, fault: Fault) -> Fault:
        """Apply ``fault`` to matching requests and return it.

        Faults are checked in the order added; the first that matches and is not exhausted wins.
        """
        self.faults.append(fault)
        return fault

    def transport(self) -> httpx.AsyncBaseTransport:
        """An httpx transport that sends every request, whatever its host, to this registry."""
        return MemoryTransport(self._handle)

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve HTTP/1.1 on ``host``:``port`` (0: any free port) until cancelled.

        Reports the base URL, such as ``"http://127.0.0.1:41234"``, through ``task_status``.
        Several servers may serve one registry, e.g. one as a second, storage origin.
        """
        listeners, base_url = await listen(host, port)
        task_status.started(base_url)
        await run_server(self._handle, listeners, base_url)

    @asynccontextmanager
    async def serving(self, *, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve HTTP/1.1 while the block runs and yield the base URL; stop when it exits."""
        listeners, base_url = await listen(host, port)
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_server, self._handle, listeners, base_url)
                try:
                    yield base_url
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The server contains its own errors: a lone exception beside cancellations is the
            # block's, so unwrap it.
            _, rest = group.split(trio.Cancelled)
            if rest is None or len(rest.exceptions) != 1:
                raise
            failure = rest.exceptions[0]
        if failure is not None:
            raise failure

    async def _handle(
        self,
        method: str,
        target: str,
        headers: httpx.Headers,
        body: AsyncIterable[bytes],
        origin: str,
    ) -> Response:
        """Answer one request: record it, apply the first matching fault, route it."""
        record = RecordedRequest(method=method, url=origin + target, headers=headers, body_size=0)
        self.requests.append(record)
        raw_path, _, query = target.partition("?")
        path = unquote(raw_path)
        fault = next((f for f in self.faults if f._matches(method, path, unquote(query))), None)
        counted = _Body(body)
        if fault is not None:
            fault.matched += 1
        if fault is not None and fault.status is not None:
            reply = _fault_reply(fault.status, fault.body, path)
        else:
            reply = await self._route(method, path, query, headers, counted, origin)
        await counted.drain()  # whatever the route left unread
        self._record_size(record, counted.size)
        if fault is not None:
            await trio.sleep(fault.delay)
        return await _respond(method, reply, fault)

    def _record_size(self, record: RecordedRequest, size: int) -> None:
        # Search from the end: the record is recent, and a test may have cleared the list.
        for index in range(len(self.requests) - 1, -1, -1):
            if self.requests[index] is record:
                self.requests[index] = replace(record, body_size=size)
                return

    async def _route(
        self,
        method: str,
        path: str,
        query: str,
        headers: httpx.Headers,
        body: _Body,
        origin: str,
    ) -> _Reply:
        match, handlers = _find_route(path)
        params = match.groupdict() if match else {}
        if (
            path.startswith("/v2/")
            and self.token is not None
            and headers.get("authorization") != f"Bearer {self.token}"
        ):
            return self._challenge(origin, params.get("name"), method)
        if match is None:
            return _error(404, "NAME_UNKNOWN", {"path": path})
        handler = handlers.get(method)
        if handler is None:
            return _error(405, "UNSUPPORTED", {"method": method}, Allow=", ".join(handlers))
        query_params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
        try:
            return await handler(self, _Call(method, origin, params, query_params, headers, body))
        except _Refused as refused:
            return refused.reply

    def _challenge(self, origin: str, name: str | None, method: str) -> _Reply:
        challenge = f'Bearer realm="{origin}/token",service="{_SERVICE}"'
        if name is not None:
            actions = "pull" if method in ("GET", "HEAD") else "pull,push"
            challenge += f',scope="repository:{name}:{actions}"'
        return _error(401, "UNAUTHORIZED", None, **{"WWW-Authenticate": challenge})

    # Routes. Each takes the routed call and returns a reply or raises _Refused.

    async def _base(self, call: _Call) -> _Reply:
        return _json(200, {})

    async def _issue_token(self, call: _Call) -> _Reply:
        self.token_requests += 1
        token = self.token or "anonymous"
        return _json(
            200,
            {
                "token": token,
                "access_token": token,
                "expires_in": 300,
                "issued_at": datetime.now(UTC).isoformat(),
            },
        )

    async def _get_blob(self, call: _Call) -> _Reply:
        name = call.params["name"]
        digest = _valid_digest(call.params["digest"])
        data = self.blobs.get(name, {}).get(digest)
        if data is None:
            raise _Refused(_error(404, "BLOB_UNKNOWN", {"digest": digest}))
        if call.method == "GET" and self.redirect_blobs_to is not None:
            location = (
                f"{self.redirect_blobs_to.rstrip('/')}/_storage/{digest}"
                f"?expires=4102444800&sig={secrets.token_hex(8)}"
            )
            return _Reply(307, {"Location": location})
        return self._blob_reply(call, digest, data)

    async def _get_stored(self, call: _Call) -> _Reply:
        digest = _valid_digest(call.params["digest"])
        data = next((repo[digest] for repo in self.blobs.values() if digest in repo), None)
        if data is None:
            raise _Refused(_error(404, "BLOB_UNKNOWN", {"digest": digest}))
        return self._blob_reply(call, digest, data)

    def _blob_reply(self, call: _Call, digest: str, data: bytes) -> _Reply:
        """The blob, or the part of it a ``Range: bytes=<start>-[<end>]`` asks for."""
        headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest}
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", call.headers.get("range", "").strip())
        if not self.ranges or wanted is None or call.method != "GET":
            return _Reply(200, headers, data)
        start = int(wanted[1])
        end = min(int(wanted[2]), len(data) - 1) if wanted[2] else len(data) - 1
        if start >= len(data) or start > end:
            return _Reply(416, {"Content-Range": f"bytes */{len(data)}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return _Reply(206, headers, data[start : end + 1])

    async def _start_upload(self, call: _Call) -> _Reply:
        name = call.params["name"]
        mounted = call.query.get("mount")
        if mounted is not None and self.mount:
            data = self.blobs.get(call.query.get("from", ""), {}).get(mounted)
            if data is not None:
                self.blobs.setdefault(name, {})[mounted] = data
                return _created(name, mounted)
        if "digest" in call.query and self.whole_posts:
            digest = _valid_digest(call.query["digest"])
            return self._store(name, digest, await call.body.read())
        upload_id = str(uuid.uuid4())
        state = secrets.token_urlsafe(12)
        upload = self._uploads[upload_id] = _Upload(name, state, {state})
        reply = _upload_reply(202, upload_id, upload)
        if self.chunk_min_length is not None:
            reply.headers["OCI-Chunk-Min-Length"] = str(self.chunk_min_length)
        return reply

    def _upload(self, call: _Call, *, current: bool) -> _Upload:
        upload = self._uploads.get(call.params["uuid"])
        if upload is None or upload.name != call.params["name"]:
            raise _unknown_upload(call)
        state = call.query.get("_state")
        if state not in upload.issued:
            raise _Refused(_error(400, "BLOB_UPLOAD_INVALID", "missing or unknown _state"))
        if current and state != upload.state:
            raise _Refused(_error(400, "BLOB_UPLOAD_INVALID", "stale Location: use the latest one"))
        return upload

    async def _receive(self, call: _Call, upload: _Upload) -> None:
        """Append the request's body to ``upload``, which another request may have cancelled or
        finished while it came: then the session is unknown, as it would be at the start."""
        async for chunk in call.body:
            upload.data.extend(chunk)
        if self._uploads.get(call.params["uuid"]) is not upload:
            raise _unknown_upload(call)

    async def _upload_status(self, call: _Call) -> _Reply:
        return _upload_reply(204, call.params["uuid"], self._upload(call, current=False))

    async def _patch_upload(self, call: _Call) -> _Reply:
        upload = self._upload(call, current=True)
        held = len(upload.data)
        if upload.short_chunk is not None:
            short = f"a chunk of {upload.short_chunk} bytes was shorter than OCI-Chunk-Min-Length"
            raise _Refused(_error(400, "BLOB_UPLOAD_INVALID", short))
        expected = None
        content_range = call.headers.get("content-range")
        if content_range is not None:
            match = _CONTENT_RANGE.fullmatch(content_range.strip())
            if match is None or int(match[2]) < int(match[1]) - 1:
                raise _Refused(_error(400, "BLOB_UPLOAD_INVALID", {"Content-Range": content_range}))
            if int(match[1]) != held:
                detail = {"Content-Range": content_range, "held": held}
                reply = _error(416, "BLOB_UPLOAD_INVALID", detail)
                reply.headers.update(_upload_reply(416, call.params["uuid"], upload).headers)
                raise _Refused(reply)
            expected = int(match[2]) - int(match[1]) + 1
        await self._receive(call, upload)
        received = len(upload.data) - held
        if expected is not None and received != expected:
            del upload.data[held:]
            raise _Refused(_error(400, "SIZE_INVALID", {"expected": expected, "got": received}))
        if self.chunk_min_length is not None and received < self.chunk_min_length:
            upload.short_chunk = received
        upload.state = secrets.token_urlsafe(12)
        upload.issued.add(upload.state)
        return _upload_reply(202, call.params["uuid"], upload)

    async def _finish_upload(self, call: _Call) -> _Reply:
        upload = self._upload(call, current=True)
        digest = _valid_digest(call.query.get("digest"))
        await self._receive(call, upload)
        del self._uploads[call.params["uuid"]]
        return self._store(upload.name, digest, bytes(upload.data))

    async def _cancel_upload(self, call: _Call) -> _Reply:
        self._upload(call, current=False)
        del self._uploads[call.params["uuid"]]
        return _Reply(204)

    def _store(self, name: str, digest: str, data: bytes) -> _Reply:
        actual = compute_digest(data, digest.partition(":")[0])
        if actual != digest:
            raise _Refused(_error(400, "DIGEST_INVALID", {"expected": digest, "got": actual}))
        self.blobs.setdefault(name, {})[digest] = data
        return _created(name, digest)

    async def _put_manifest(self, call: _Call) -> _Reply:
        name, reference = call.params["name"], call.params["reference"]
        data = await call.body.read()
        media_type = call.headers.get("content-type")
        if not media_type:
            raise _Refused(_error(400, "MANIFEST_INVALID", "Content-Type is required"))
        digest = compute_digest(data)
        if ":" in reference:
            algorithm = _valid_digest(reference).partition(":")[0]
            if compute_digest(data, algorithm) != reference:
                raise _Refused(_error(400, "DIGEST_INVALID", {"reference": reference}))
        blobs, manifests = _references(data)
        known_blobs, known_manifests = self.blobs.get(name, {}), self.manifests.get(name, {})
        missing = [d for d in blobs if d not in known_blobs]
        missing += [d for d in manifests if d not in known_manifests]
        if missing:
            raise _Refused(_error(400, "MANIFEST_BLOB_UNKNOWN", {"digests": missing}))
        stored = self.manifests.setdefault(name, {})
        stored[reference] = stored[digest] = (data, media_type)
        return _Reply(
            201,
            {"Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": digest},
        )

    async def _list_tags(self, call: _Call) -> _Reply:
        name = call.params["name"]
        if name not in self.manifests and name not in self.blobs:
            raise _Refused(_error(404, "NAME_UNKNOWN", {"name": name}))
        tags = sorted(ref for ref in self.manifests.get(name, {}) if ":" not in ref)
        return _page(call, f"/v2/{name}/tags/list", "tags", tags, name=name)

    async def _catalog(self, call: _Call) -> _Reply:
        repositories = sorted(self.manifests.keys() | self.blobs.keys())
        return _page(call, "/v2/_catalog", "repositories", repositories)

    async def _get_manifest(self, call: _Call) -> _Reply:
        reference = call.params["reference"]
        found = self.manifests.get(call.params["name"], {}).get(reference)
        if found is None:
            raise _Refused(_error(404, "MANIFEST_UNKNOWN", {"reference": reference}))
        data, media_type = found
        digest = reference if ":" in reference else compute_digest(data)
        return _Reply(200, {"Content-Type": media_type, "Docker-Content-Digest": digest}, data)


_Route = Callable[[Registry, _Call], Awaitable[_Reply]]
_ROUTES: list[tuple[re.Pattern[str], dict[str, _Route]]] = [
    (re.compile(r"/v2/"), {"GET": Registry._base, "HEAD": Registry._base}),
    (re.compile(r"/v2/_catalog"), {"GET": Registry._catalog}),
    (re.compile(rf"/v2/{_NAME}/tags/list"), {"GET": Registry._list_tags}),
    (re.compile(rf"/v2/{_NAME}/blobs/uploads/"), {"POST": Registry._start_upload}),
    (
        re.compile(rf"/v2/{_NAME}/blobs/uploads/(?P<uuid>[^/]+)"),
        {
            "GET": Registry._upload_status,
            "PATCH": Registry._patch_upload,
            "PUT": Registry._finish_upload,
            "DELETE": Registry._cancel_upload,
        },
    ),
    (
        re.compile(rf"/v2/{_NAME}/blobs/(?P<digest>[^/]+)"),
        {"GET": Registry._get_blob, "HEAD": Registry._get_blob},
    ),
    (
        re.compile(rf"/v2/{_NAME}/manifests/(?P<reference>[^/]+)"),
        {
            "GET": Registry._get_manifest,
            "HEAD": Registry._get_manifest,
            "PUT": Registry._put_manifest,
        },
    ),
    (
        re.compile(r"/_storage/(?P<digest>[^/]+)"),
        {"GET": Registry._get_stored, "HEAD": Registry._get_stored},
    ),
    (re.compile(r"/token"), {"GET": Registry._issue_token}),
]


def _find_route(path: str) -> tuple[re.Match[str] | None, dict[str, _Route]]:
    for pattern, handlers in _ROUTES:
        if match := pattern.fullmatch(path):
            return match, handlers
    return None, {}


def _page(call: _Call, path: str, key: str, items: list[str], **fields: str) -> _Reply:
    """``items`` (sorted) as the JSON list ``key``, paginated as the distribution spec says:
    those after ``last``, at most ``n`` of them, with a ``Link`` to the next page of ``path``
    if any."""
    last, count = call.query.get("last"), call.query.get("n")
    if last is not None:
        items = [item for item in items if item > last]
    following = None
    if count is not None:
        if not (count.isascii() and count.isdigit()):
            raise _Refused(_error(400, "PAGINATION_NUMBER_INVALID", {"n": count}))
        if len(items) > int(count):
            items = items[: int(count)]
            if items:
                following = f"{path}?n={count}&last={quote(items[-1], safe='')}"
    reply = _json(200, {**fields, key: items})
    if following is not None:
        reply.headers["Link"] = f'<{following}>; rel="next"'
    return reply


def _created(name: str, digest: str) -> _Reply:
    headers = {"Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest}
    return _Reply(201, headers)


def _upload_reply(status: int, upload_id: str, upload: _Upload) -> _Reply:
    headers = {
        "Location": f"/v2/{upload.name}/blobs/uploads/{upload_id}?_state={upload.state}",
        "Range": f"0-{max(len(upload.data) - 1, 0)}",
        "Docker-Upload-UUID": upload_id,
    }
    return _Reply(status, headers)


def _fault_reply(status: int, body: bytes | None, path: str) -> _Reply:
    if body is not None:
        return _Reply(status, {}, body)
    if status < 400:
        return _Reply(status)
    code = _STATUS_CODES.get(status, "UNKNOWN")
    if status == 404:  # what the registry says of what it does not have
        code = next((c for route, c in _UNKNOWN_CODES if route.search(path)), "NAME_UNKNOWN")
    return _error(status, code, "injected fault")


def _references(manifest: bytes) -> tuple[list[str], list[str]]:
    """The blob and manifest digests that a manifest or index references."""
    try:
        doc = json.loads(manifest)
        blobs = [doc["config"]["digest"]] if "config" in doc else []
        blobs += [layer["digest"] for layer in doc.get("layers", [])]
        manifests = [entry["digest"] for entry in doc.get("manifests", [])]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise _Refused(_error(400, "MANIFEST_INVALID", str(exc))) from None
    if not all(isinstance(d, str) for d in blobs + manifests):
        raise _Refused(_error(400, "MANIFEST_INVALID", "digests must be strings"))
    return blobs, manifests


async def _respond(method: str, reply: _Reply, fault: Fault | None) -> Response:
    """Turn a reply into a response, applying the fault's body changes; one with no body to
    cut stalls or drops here, when the fault says so."""
    content = reply.content
    if fault is not None:
        if fault.corrupt and content:
            middle = len(content) // 2
            content = content[:middle] + bytes([content[middle] ^ 0xFF]) + content[middle + 1 :]
        content += fault.extra
    headers = httpx.Headers(reply.headers)
    headers["Docker-Distribution-API-Version"] = "registry/2.0"
    if fault is not None:
        headers.update(fault.headers)
    if reply.status in (204, 304):
        content = b""
    else:
        headers["Content-Length"] = str(len(content))
    if method == "HEAD":
        content = b""
    if fault is not None and not content:  # no body to cut: 0 cuts the answer itself
        if fault.stall_after == 0:
            await trio.sleep_forever()
        if fault.truncate_at == 0:
            raise DropConnection
    return Response(reply.status, headers.multi_items(), _stream(content, fault))


async def _stream(content: bytes, fault: Fault | None) -> AsyncGenerator[bytes, None]:
    """Yield ``content`` in slices, trickled, stalled or cut short as the fault says."""
    limit, stall, drop, rate = len(content), False, False, None
    if fault is not None:
        rate = fault.trickle
        if fault.stall_after is not None and fault.stall_after < limit:
            limit, stall = fault.stall_after, True
        if fault.truncate_at is not None and fault.truncate_at < limit:
            limit, stall, drop = fault.truncate_at, False, True
    size = _CHUNK if rate is None else max(1, min(_CHUNK, int(rate / _TRICKLE_HZ)))
    start = trio.current_time()
    for offset in range(0, limit, size):
        end = min(offset + size, limit)
        if rate is None:
            await trio.lowlevel.checkpoint()
        else:
            await trio.sleep_until(start + end / rate)
        yield content[offset:end]
    if stall:
        await trio.sleep_forever()
    if drop:
        raise DropConnection
