"""HTTP/1.1 for httpx on trio, lean enough for thousands of small blobs.

httpx's default transport (httpcore) costs more per request than a blob transfer can afford: its
pool looks at every connection for each request and response, work that grows with the square
of the connections in use, and it reads sockets 64 KiB at a time. :class:`HTTP1Transport` is the
narrowest seam that removes both while keeping httpx's API: redirects, auth, cookies, content
decoding and proxies (httpx's mounts) stay httpx's business. It keeps idle connections on a stack
per origin, so that taking and returning one costs the same with 1 or 500 connections, reads up
to 1 MiB at a time (over TLS, a read returns one TLS record: 16 KiB at most), and frames messages
as RFC 9112 says.
"""

from __future__ import annotations

import inspect
import re
import ssl
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, aclosing, contextmanager, nullcontext

import httpx
import trio

from ._protocol import check_int

__all__ = ["HTTP1Transport"]

READ_SIZE = 1024 * 1024  # most bytes of a body asked of the socket at once (TLS: one record)
MIN_READ_SIZE = 64 * 1024  # ... however many bodies are being read
# Bytes all bodies being read may ask for at once. A body's reader still holds its last piece
# while the next arrives (httpx's iterators keep it until they move on), so the pieces alive
# add up to about twice this.
READ_BUDGET = 8 * 1024 * 1024
HEAD_READ_SIZE = 128 * 1024  # asked for while a head is incomplete: a small body comes along
MAX_HEAD_SIZE = 64 * 1024  # a response head (or chunk-size line, or trailer) longer is refused
COALESCE_SIZE = 128 * 1024  # request head and body pieces up to this size go out in one write
DEFAULT_PORTS = {b"http": 80, b"https": 443}
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})

_HEAD_END = re.compile(rb"\n\r?\n")
_FORBIDDEN = re.compile(rb"[\r\n\0]")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: (.*))?")
_LENGTH = re.compile(rb"[0-9]{1,18}")  # a Content-Length: under an exabyte
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")  # a chunk size: under an exabyte, as Content-Length

Origin = tuple[bytes, bytes, int]


class _NoResponse(Exception):
    """The connection ended, or failed, before any byte of a response came."""


class _Connection:
    """One HTTP/1.1 connection: its stream, and bytes received but not yet consumed."""

    __slots__ = (
        "buffer",
        "generation",
        "origin",
        "plain",
        "read_timeout",
        "request",
        "reusable",
        "socket",
        "stream",
        "write_timeout",
    )

    def __init__(
        self,
        origin: Origin,
        stream: trio.abc.Stream,
        socket: trio.socket.SocketType,
        generation: int,
    ) -> None:
        self.origin = origin
        self.stream = stream
        self.socket = socket
        # Plain TCP: sent and received straight through the socket, which checkpoints as the
        # stream would, without the stream's wrappers around every call.
        self.plain = isinstance(stream, trio.SocketStream)
        self.buffer = b""
        self.request: httpx.Request | None = None  # the request being served, for errors
        self.read_timeout: float | None = None
        self.write_timeout: float | None = None
        self.reusable = True  # False once a request could not be sent whole
        self.generation = generation  # the transport's when it was opened: see aclose

    def close(self) -> None:
        """Drop the connection at once (a TLS stream is not told: framing makes that safe)."""
        self.socket.close()

    def idle_and_open(self) -> bool:
        """Whether an idle connection can take a request: no end of stream or stray bytes
        waiting, which would make it readable."""
        return not self.socket.is_readable()

    async def send(self, data: bytes) -> None:
        timeout = self.write_timeout
        try:
            if timeout is None:
                await self._send_all(data)
            else:
                with trio.fail_after(timeout):
                    await self._send_all(data)
        except trio.TooSlowError as exc:
            raise httpx.WriteTimeout(f"write took over {timeout} s", request=self.request) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.WriteError(_describe(exc), request=self.request) from exc

    async def _send_all(self, data: bytes) -> None:
        if not self.plain:
            await self.stream.send_all(data)
            return
        sent = await self.socket.send(data)
        if sent < len(data):
            with memoryview(data) as view:
                while sent < len(view):
                    sent += await self.socket.send(view[sent:])

    async def _receive_some(self, max_bytes: int) -> bytes | bytearray:
        if self.plain:
            return await self.socket.recv(max_bytes)
        return await self.stream.receive_some(max_bytes)

    async def receive(self, max_bytes: int) -> bytes:
        """What the buffer holds, else up to ``max_bytes`` from the socket; ``b""`` at its end."""
        if self.buffer:
            buffered, self.buffer = self.buffer[:max_bytes], self.buffer[max_bytes:]
            return buffered
        timeout = self.read_timeout
        data: bytes | bytearray
        try:
            if timeout is None:
                data = await self._receive_some(max_bytes)
            else:
                with trio.fail_after(timeout):
                    data = await self._receive_some(max_bytes)
        except trio.TooSlowError as exc:
            raise httpx.ReadTimeout(f"read took over {timeout} s", request=self.request) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(_describe(exc), request=self.request) from exc
        return data if isinstance(data, bytes) else bytes(data)

    async def receive_until(
        self, pattern: re.Pattern[bytes], what: str, *, response_start: bool = False
    ) -> bytes:
        """Bytes up to the first match of ``pattern``, which is consumed too. With
        ``response_start``, a connection that ends or fails before giving any byte raises
        :class:`_NoResponse` (from the read error, if any)."""
        buffer, self.buffer = self.buffer, b""
        while (match := pattern.search(buffer)) is None or match.start() > MAX_HEAD_SIZE:
            if len(buffer) > MAX_HEAD_SIZE:
                raise httpx.RemoteProtocolError(
                    f"{what} longer than {MAX_HEAD_SIZE} bytes", request=self.request
                )
            try:
                data = await self.receive(HEAD_READ_SIZE)
            except httpx.ReadError as exc:
                if response_start and not buffer:
                    raise _NoResponse from exc
                raise
            if not data:
                if response_start and not buffer:
                    raise _NoResponse
                raise httpx.RemoteProtocolError(
                    f"connection closed in the middle of a {what}", request=self.request
                )
            buffer += data
        self.buffer = buffer[match.end() :]
        return buffer[: match.start()]


class HTTP1Transport(httpx.AsyncBaseTransport):
    """An httpx transport for trio that speaks HTTP/1.1 (plain or over TLS) with a lean pool.

    :func:`download` and :func:`upload` send through one when given no client; pass it to a
    client of your own (``httpx.AsyncClient(transport=HTTP1Transport())``) for the same speed.
    Connections are opened as needed (bound concurrency yourself, as the transfers do) and at
    most ``max_idle_connections`` are kept open between requests. ``ssl_context``
    verifies HTTPS servers (default: ``httpx.create_ssl_context()``, which honours
    ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``); the transport sets its ALPN protocols to
    ``["http/1.1"]`` (a context you give is changed, as httpx's own transport changes it), and a
    server that picks another protocol is an ``httpx.ConnectError``. The request's ``timeout``
    extension is honoured (httpx sets it from the client's ``timeout``). An idempotent request
    (``GET``, ``PUT``...) whose body is bytes is sent once more, on a new connection, when a
    kept-alive one turns out to have been closed by the server before answering. No HTTP/2, and
    no proxies of its own: httpx mounts its proxy transports as usual. One transport may serve
    one client after another: :meth:`aclose`, which a client's ``async with`` calls at its end,
    closes the idle connections, and later requests open new ones.
    """

    def __init__(
        self, *, ssl_context: ssl.SSLContext | None = None, max_idle_connections: int = 64
    ) -> None:
        check_int("max_idle_connections", max_idle_connections, minimum=0)
        self._ssl_context = ssl_context
        self._max_idle = max_idle_connections
        self._idle: dict[Origin, list[_Connection]] = {}
        self._idle_count = 0
        self._generation = 0  # how many times aclose was called
        self.bodies = 0  # response bodies not read to their end nor closed yet

    def read_size(self) -> int:
        """How much one body may ask of its socket at once: :data:`READ_SIZE`, less when many
        bodies are being read, so that the bytes they ask for stay within :data:`READ_BUDGET`."""
        return max(MIN_READ_SIZE, min(READ_SIZE, READ_BUDGET // max(self.bodies, 1)))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and return its response, the body still to be read."""
        url = request.url
        if url.raw_scheme not in DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(
                f"HTTP1Transport speaks http and https, not {url.scheme!r}", request=request
            )
        origin = (url.raw_scheme, url.raw_host, url.port or DEFAULT_PORTS[url.raw_scheme])
        timeouts = request.extensions.get("timeout", {})
        head, length, closing = _request_head(request)
        replayable = request.method in IDEMPOTENT and isinstance(request.stream, httpx.ByteStream)
        replaying = False
        while True:
            connection = None if replaying else self._take(origin)
            reused = connection is not None
            if connection is None:
                connection = await self._connect(request, origin, timeouts.get("connect"))
            connection.request = request
            connection.read_timeout = timeouts.get("read")
            connection.write_timeout = timeouts.get("write")
            try:
                response = await _exchange(connection, request, head, length)
                return _response(self, connection, request, closing, *response)
            except _NoResponse as exc:
                connection.close()
                if reused and replayable:
                    replaying = True  # the server had closed it while idle: once more, on a new one
                    continue
                cause = exc.__cause__
                if isinstance(cause, httpx.TransportError):
                    raise cause from cause.__cause__
                raise httpx.RemoteProtocolError(
                    "server disconnected without sending a response", request=request
                ) from None
            except BaseException:
                connection.close()
                raise

    async def aclose(self) -> None:
        """Close the idle connections; connections in use close when their response ends (they
        are not kept). The transport stays usable: later requests open new connections."""
        self._generation += 1
        self.close_idle()

    def close_idle(self) -> None:
        """Close the connections kept for later requests (to free their descriptors, say)."""
        for stack in self._idle.values():
            for connection in stack:
                connection.close()
        self._idle.clear()
        self._idle_count = 0

    def _take(self, origin: Origin) -> _Connection | None:
        stack = self._idle.get(origin)
        while stack:
            connection = stack.pop()
            self._idle_count -= 1
            if connection.idle_and_open():
                return connection
            connection.close()
        return None

    def release(self, connection: _Connection) -> None:
        """Keep ``connection`` for a later request to its origin (or close it, when enough are
        kept or it was opened before the last :meth:`aclose`)."""
        if (
            connection.generation != self._generation
            or self._idle_count >= self._max_idle
            or connection.buffer
            or not connection.reusable
        ):
            connection.close()
            return
        connection.request = None
        self._idle.setdefault(connection.origin, []).append(connection)
        self._idle_count += 1

    async def _connect(
        self, request: httpx.Request, origin: Origin, seconds: float | None
    ) -> _Connection:
        scheme, host, port = origin
        generation = self._generation
        tcp: trio.SocketStream | None = None
        try:
            with _deadline(seconds, request):
                tcp = await trio.open_tcp_stream(host.decode("ascii"), port)
                if scheme == b"http":
                    return _Connection(origin, tcp, tcp.socket, generation)
                server_hostname = request.extensions.get("sni_hostname", host.decode("ascii"))
                tls = trio.SSLStream(
                    tcp, self._tls(), server_hostname=server_hostname, https_compatible=True
                )
                await tls.do_handshake()
                protocol = tls.selected_alpn_protocol()
                if protocol not in (None, "http/1.1"):
                    raise httpx.ConnectError(
                        f"the server chose {protocol!r} (ALPN), not http/1.1, the only protocol "
                        "HTTP1Transport speaks",
                        request=request,
                    )
                return _Connection(origin, tls, tcp.socket, generation)
        except BaseException as exc:
            if tcp is not None:
                tcp.socket.close()
            if isinstance(exc, OSError | trio.BrokenResourceError):
                raise httpx.ConnectError(_describe(exc), request=request) from exc
            raise

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()
        # For each connection: a context shared with an HTTP/2 client may offer h2 again.
        self._ssl_context.set_alpn_protocols(["http/1.1"])
        return self._ssl_context


@contextmanager
def _deadline(seconds: float | None, request: httpx.Request) -> Iterator[None]:
    if seconds is None:
        yield
        return
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError as exc:
        raise httpx.ConnectTimeout(f"connect took over {seconds} s", request=request) from exc


def _describe(exc: BaseException) -> str:
    """``exc``'s message, or its cause's (trio's wrappers often have none of their own)."""
    return str(exc) or str(exc.__cause__ or "") or type(exc).__name__


def _request_head(request: httpx.Request) -> tuple[bytes, int | None, bool]:
    """The request line and headers, the body's length (None: chunked), and whether the
    request asks to close the connection after it (``close`` among its ``Connection`` options)."""
    method = request.method.encode("ascii", "replace")  # "?" is no token character
    if not _TOKEN.fullmatch(method):
        raise httpx.LocalProtocolError(f"invalid method {request.method!r}", request=request)
    lines = [b"%s %s HTTP/1.1" % (method, request.url.raw_path)]
    length: int | None = 0
    closing = False
    for name, value in request.headers.raw:
        if _FORBIDDEN.search(name) or _FORBIDDEN.search(value) or not _TOKEN.fullmatch(name):
            raise httpx.LocalProtocolError(f"invalid header {name!r}", request=request)
        lowered = name.lower()
        if lowered == b"content-length":
            if not _LENGTH.fullmatch(value):
                raise httpx.LocalProtocolError(
                    f"invalid Content-Length {value[:20]!r}", request=request
                )
            length = int(value)
        elif lowered == b"transfer-encoding" and value.lower() == b"chunked":
            length = None
        elif lowered == b"connection" and b"close" in _items(value):
            closing = True
        lines.append(b"%s: %s" % (name, value))
    lines.append(b"\r\n")
    return b"\r\n".join(lines), length, closing


async def _exchange(
    connection: _Connection,
    request: httpx.Request,
    head: bytes,
    length: int | None,
) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
    """Send the request and read its final response's head: status, reason, version, headers.

    A server may answer before it has read the whole body, and close: when sending fails, the
    answer is still read, and the write error raised only if there is none.
    """
    try:
        await _send_request(connection, request, head, length)
    except httpx.WriteError as exc:
        connection.reusable = False  # the server stopped reading: whatever it says, not again
        try:
            return await _receive_head(connection)
        except (_NoResponse, httpx.TransportError):
            raise _NoResponse from exc
    return await _receive_head(connection)


async def _send_request(
    connection: _Connection,
    request: httpx.Request,
    head: bytes,
    length: int | None,
) -> None:
    """Write the head and body, small pieces together, checking the body against its length."""
    stream = request.stream
    if not isinstance(stream, httpx.AsyncByteStream):
        raise RuntimeError("an AsyncClient request needs an async body")
    pending = head
    sent = 0
    pieces = stream.__aiter__()
    # httpx's streams are async generators: one cut off (by a cancellation) is closed here,
    # not left to be finalized after the trio run that could close it has ended.
    closing: AbstractAsyncContextManager[object] = nullcontext()
    if inspect.isasyncgen(pieces):
        closing = aclosing(pieces)
    async with closing:
        async for piece in pieces:
            if not piece:
                continue
            sent += len(piece)
            if length is not None and sent > length:
                break
            if length is None:
                pending += b"%x\r\n" % len(piece)
            if len(pending) + len(piece) <= COALESCE_SIZE:
                pending += piece
            else:
                await connection.send(pending)
                await connection.send(piece)
                pending = b""
            if length is None:
                pending += b"\r\n"
    if length is not None and sent != length:
        raise httpx.LocalProtocolError(
            f"request body has {'more' if sent > length else sent} bytes, "
            f"its Content-Length says {length}",
            request=request,
        )
    if length is None:
        pending += b"0\r\n\r\n"
    if pending:
        await connection.send(pending)


async def _receive_head(
    connection: _Connection,
) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
    """The next final response head on ``connection``: 1xx ones are skipped, but for 101."""
    while True:
        head = await connection.receive_until(_HEAD_END, "response head", response_start=True)
        # Every CR ends a line (the last line's LF is part of the head's end).
        if b"\0" in head or head.count(b"\r") != head.count(b"\r\n") + head.endswith(b"\r"):
            raise httpx.RemoteProtocolError(
                "NUL or bare CR in a response head", request=connection.request
            )
        lines = head.split(b"\n")
        status = _STATUS.fullmatch(lines[0].rstrip(b"\r"))
        if status is None:
            raise httpx.RemoteProtocolError(
                f"not an HTTP/1.x status line: {lines[0][:100]!r}", request=connection.request
            )
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            line = line.rstrip(b"\r")
            if line[:1] in (b" ", b"\t") and headers:  # obsolete line folding
                name, value = headers[-1]
                folded = line.strip(b" \t")
                headers[-1] = (name, value + b" " + folded if value and folded else value or folded)
                continue
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise httpx.RemoteProtocolError(
                    f"malformed header line {line[:100]!r}", request=connection.request
                )
            headers.append((name, value.strip(b" \t")))
        code = int(status[2])
        if 100 <= code < 200 and code != 101:
            continue  # informational: the final response follows
        version = b"HTTP/1.1" if status[1] == b"1" else b"HTTP/1.0"
        return code, status[3] or b"", version, headers


def _response(
    transport: HTTP1Transport,
    connection: _Connection,
    request: httpx.Request,
    closing: bool,
    status: int,
    reason: bytes,
    version: bytes,
    headers: list[tuple[bytes, bytes]],
) -> httpx.Response:
    """The response, with a body stream framed as RFC 9112 section 6.3 says (the connection
    is not kept if the request was ``closing`` it). A 101 has no body, and its connection is
    closed."""
    fields: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        fields.setdefault(name.lower(), []).append(value)
    tokens = set(_tokens(fields, b"connection"))
    keep_alive = b"close" not in tokens if version == b"HTTP/1.1" else b"keep-alive" in tokens
    if closing or (version == b"HTTP/1.0" and b"transfer-encoding" in fields):
        keep_alive = False  # HTTP/1.0 with Transfer-Encoding: faulty framing (RFC 9112 6.1)
    if status == 101:
        keep_alive = False  # the connection now speaks another protocol
    remaining: int | None  # None: read until the connection ends
    chunked = False
    if request.method == "HEAD" or status in (101, 204, 304):
        remaining = 0
    elif b"transfer-encoding" in fields:
        codings = [coding for coding in _tokens(fields, b"transfer-encoding") if coding]
        if codings != [b"chunked"]:
            raise httpx.RemoteProtocolError(
                f"Transfer-Encoding {b', '.join(codings)[:100]!r} (only chunked is supported)",
                request=request,
            )
        chunked = True
        remaining = None
    elif b"content-length" in fields:
        values = set(_tokens(fields, b"content-length"))
        text = values.pop() if len(values) == 1 else b""
        if not _LENGTH.fullmatch(text):
            raise httpx.RemoteProtocolError("invalid Content-Length", request=request)
        remaining = int(text)
    else:
        remaining = None
        keep_alive = False
    if chunked:
        body: _Body = _ChunkedBody(transport, connection, keep_alive)
    else:
        body = _Body(transport, connection, keep_alive, remaining)
    return httpx.Response(
        status,
        headers=headers,
        stream=body,
        request=request,
        extensions={"http_version": version, "reason_phrase": reason},
    )


def _tokens(fields: dict[bytes, list[bytes]], name: bytes) -> list[bytes]:
    """The comma-separated values of header ``name`` (lowercased field names), lowercased."""
    return [item for value in fields.get(name, ()) for item in _items(value)]


def _items(value: bytes) -> list[bytes]:
    """The items of a comma-separated header value, lowercased."""
    return [item.strip() for item in value.lower().split(b",")]


class _Body(httpx.AsyncByteStream):
    """A response body of ``remaining`` bytes (None: up to the end of the connection).

    An iterator rather than an async generator, so that a response closed early leaves nothing
    suspended. The connection goes back to the pool once the body has been read to its end, and
    is closed if the response is closed before that.
    """

    def __init__(
        self,
        transport: HTTP1Transport,
        connection: _Connection,
        keep_alive: bool,
        remaining: int | None = None,
    ) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
        self._keep_alive = keep_alive
        self._remaining = remaining
        self._received = 0
        transport.bodies += 1

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        connection = self._connection
        if connection is None:
            raise StopAsyncIteration
        try:
            data = await self._next(connection)
        except BaseException:
            self._finish(reuse=False)
            raise
        if data:
            self._received += len(data)
            return data
        self._finish(reuse=self._keep_alive)
        raise StopAsyncIteration

    async def _next(self, connection: _Connection) -> bytes:
        """The next piece of the body, ``b""`` at its end."""
        remaining = self._remaining
        if remaining is None:
            return await connection.receive(self._transport.read_size())
        if not remaining:
            return b""
        data = await connection.receive(min(remaining, self._transport.read_size()))
        if not data:
            raise httpx.RemoteProtocolError(
                f"connection closed after {self._received} bytes of a "
                f"{self._received + remaining}-byte body",
                request=connection.request,
            )
        self._remaining = remaining - len(data)
        return data

    def _complete(self) -> bool:
        """Whether the whole body has been read (so the connection is ready for another)."""
        return self._remaining == 0

    async def aclose(self) -> None:
        self._finish(reuse=self._keep_alive and self._complete())

    def _finish(self, *, reuse: bool) -> None:
        """Done with the connection: give it back to the pool, or close it."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        self._transport.bodies -= 1
        if reuse:
            self._transport.release(connection)
        else:
            connection.close()


class _ChunkedBody(_Body):
    """A body in ``Transfer-Encoding: chunked``: chunks of data, then trailers (dropped)."""

    _LINE_END = re.compile(rb"\r?\n")

    async def _next(self, connection: _Connection) -> bytes:
        if self._remaining:  # inside a chunk
            data = await connection.receive(min(self._remaining, self._transport.read_size()))
            if not data:
                raise httpx.RemoteProtocolError(
                    "connection closed inside a chunk", request=connection.request
                )
            self._remaining -= len(data)
            if not self._remaining:
                line = await self._line(connection, "chunk end")
                if line:
                    raise httpx.RemoteProtocolError(
                        "chunk longer than its size line says", request=connection.request
                    )
            return data
        size = (await self._line(connection, "chunk size line")).partition(b";")[0].strip()
        if not _HEX.fullmatch(size):
            raise httpx.RemoteProtocolError(
                f"invalid chunk size {size[:20]!r}", request=connection.request
            )
        self._remaining = int(size, 16)
        if self._remaining:
            return await self._next(connection)
        while await self._line(connection, "trailer"):
            pass
        return b""

    async def _line(self, connection: _Connection, what: str) -> bytes:
        return await connection.receive_until(self._LINE_END, what)

    def _complete(self) -> bool:
        return False
