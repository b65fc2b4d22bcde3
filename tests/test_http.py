"""HTTP1Transport: framing, pooling, errors and TLS, against a scripted server on loopback.

Each test gives the server a handler that reads the requests it needs and writes exact response
bytes; the server counts the connections it accepts and records the requests it reads.
"""

from __future__ import annotations

import datetime
import functools
import gzip
import hashlib
import ipaddress
import itertools
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trio_blobs import HTTP1Transport
from trio_blobs._http import READ_BUDGET, READ_SIZE

MiB = 1024 * 1024
HEADERS = {"User-Agent": "trio-blobs-test", "Accept-Encoding": "identity"}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;foo=bar\r\nhello\r\n"
    b'1;a=b;c="d"\r\n,\r\n'
    b"A\r\n world 123\r\n"
    b"0\r\nX-Trailer: yes\r\nX-Other: 1\r\n\r\n"
)


# -- the scripted server ----------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One request as the server read it."""

    connection: int  # which connection it came on: 1 for the first accepted
    raw: bytes  # head and body, as they came over the wire
    body: bytes  # the body, without its chunked coding

    @property
    def target(self) -> bytes:
        return self.raw.split(b" ", 2)[1]


class Conn:
    """One accepted connection, as a handler sees it."""

    def __init__(self, server: Server, stream: trio.abc.Stream, number: int) -> None:
        self.server = server
        self.stream = stream
        self.number = number
        self._buffer = b""

    async def read_until(self, end: bytes) -> bytes | None:
        """Bytes up to and including ``end``; None if the client closed its end first."""
        while end not in self._buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self._buffer += data
        cut = self._buffer.index(end) + len(end)
        data, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return data

    async def _require(self, end: bytes) -> bytes:
        data = await self.read_until(end)
        assert data is not None, "the connection ended inside a request"
        return data

    async def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            data = await self.stream.receive_some(65536)
            assert data, "the connection ended inside a request body"
            self._buffer += data
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    async def read_request(self) -> Received | None:
        """The next request, head and body, recorded in ``server.requests``; None once the
        client has closed the connection (counted in ``server.eofs``)."""
        head = await self.read_until(b"\r\n\r\n")
        if head is None:
            assert not self._buffer, "the connection ended inside a request head"
            self.server.count("eofs")
            return None
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        raw, body = head, b""
        if fields.get(b"transfer-encoding") == b"chunked":
            while True:
                line = await self._require(b"\r\n")
                size = int(line.partition(b";")[0], 16)
                raw += line
                if not size:
                    raw += await self._require(b"\r\n")  # httpx sends no trailers
                    break
                chunk = await self._exactly(size + 2)
                assert chunk.endswith(b"\r\n"), chunk[-10:]
                raw += chunk
                body += chunk[:-2]
        elif b"content-length" in fields:
            body = await self._exactly(int(fields[b"content-length"]))
            raw += body
        received = Received(self.number, raw, body)
        self.server.requests.append(received)
        return received

    async def wait_eof(self) -> bytes:
        """What the client still sends, once it has closed its end."""
        data, self._buffer = self._buffer, b""
        while chunk := await self.stream.receive_some(65536):
            data += chunk
        self.server.count("eofs")
        return data

    async def send(self, data: bytes, *, piece: int | None = None) -> None:
        """Write ``data``; with ``piece``, that many bytes at a time, each in its own segment."""
        if piece is None:
            await self.stream.send_all(data)
            return
        for start in range(0, len(data), piece):
            await self.stream.send_all(data[start : start + piece])
            await trio.sleep(0.001)


Handler = Callable[[Conn], Awaitable[None]]


def answering(*responses: bytes) -> Handler:
    """A handler that answers requests, in the order they come on any connection, with
    ``responses``, then with :data:`OK`, until each connection's client closes it."""
    answers = iter(responses)

    async def handler(conn: Conn) -> None:
        while await conn.read_request():
            await conn.send(next(answers, OK))

    return handler


class Server:
    """A raw TCP (or TLS) server on 127.0.0.1 whose connections ``handler`` serves."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.handler = answering()
        self.port = 0
        self.connections = 0  # accepted
        self.finished = 0  # closed on the server's side
        self.eofs = 0  # seen closed by the client
        self.requests: list[Received] = []
        self._changed = trio.Event()

    def count(self, counter: str) -> None:
        """Add one to ``counter`` and wake :meth:`wait_for`."""
        setattr(self, counter, getattr(self, counter) + 1)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Wait (2 s at most) for ``condition``: the server's tasks run on their own time."""
        with trio.fail_after(2):
            while not condition():
                await self._changed.wait()

    @property
    def url(self) -> str:
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> None:
        serve = functools.partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        self.port = listeners[0].socket.getsockname()[1]

    async def _serve(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        stream: trio.abc.Stream = tcp
        if self.ssl_context is not None:
            stream = trio.SSLStream(tcp, self.ssl_context, server_side=True, https_compatible=True)
        try:
            await self.handler(Conn(self, stream, self.connections))
        except trio.BrokenResourceError:
            pass  # the client reset the connection or refused the handshake: it tells the test
        finally:
            await trio.aclose_forcefully(stream)
            self.count("finished")


class Pieces:
    """A request body of ``pieces``, repeated ``times``, whose length is not known up front."""

    def __init__(self, *pieces: bytes, times: int = 1) -> None:
        self._pieces = itertools.chain.from_iterable(itertools.repeat(pieces, times))

    def __aiter__(self) -> Pieces:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        try:
            return next(self._pieces)
        except StopIteration:
            raise StopAsyncIteration from None


def endless() -> Pieces:
    """A body that only a failed write stops (1 GiB at most)."""
    return Pieces(b"x" * 65536, times=16384)


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    server = Server()
    await server.start(nursery)
    return server


@pytest.fixture
async def transport() -> AsyncIterator[HTTP1Transport]:
    transport = HTTP1Transport()
    yield transport
    await transport.aclose()


@pytest.fixture
async def client(transport: HTTP1Transport) -> AsyncIterator[httpx.AsyncClient]:
    """A client on :func:`transport` (not conftest's in-memory one); 5 s turns a hang into an
    error."""
    async with httpx.AsyncClient(transport=transport, headers=HEADERS, timeout=5) as client:
        yield client


def request_head(server: Server, target: bytes, method: bytes = b"GET", *extra: bytes) -> bytes:
    """The exact head httpx sends for a request from :func:`client`."""
    lines = [
        b"%s %s HTTP/1.1" % (method, target),
        b"Host: 127.0.0.1:%d" % server.port,
        b"Accept: */*",
        b"Connection: keep-alive",
        b"User-Agent: trio-blobs-test",
        b"Accept-Encoding: identity",
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


# -- 1. a GET and its response ----------------------------------------------------------------


async def test_get_returns_status_reason_version_headers_and_body(
    server: Server, client: httpx.AsyncClient
) -> None:
    server.handler = answering(
        b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 5\r\nX-Multi: a\r\n"
        b"X-Padded: \t padded \t\r\nx-multi: b\r\n\r\nhello"
    )
    response = await client.get(f"{server.url}/v2/a/blobs/sha256:00?x=1&y=%20")
    assert response.status_code == 200
    assert response.reason_phrase == "Fine Thanks"
    assert response.http_version == "HTTP/1.1"
    assert response.headers.multi_items() == [
        ("content-length", "5"),
        ("x-multi", "a"),
        ("x-padded", "padded"),
        ("x-multi", "b"),
    ]
    assert response.content == b"hello"
    assert [r.raw for r in server.requests] == [
        request_head(server, b"/v2/a/blobs/sha256:00?x=1&y=%20")
    ]


# -- 2. keep-alive ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "reused"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\n", True, id="1.1"),
        pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\n", False, id="1.1-close"),
        pytest.param(b"HTTP/1.1 200 OK\r\nConnection: x, Close\r\n", False, id="1.1-close-list"),
        pytest.param(b"HTTP/1.0 200 OK\r\n", False, id="1.0"),
        pytest.param(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n", True, id="1.0-keep-alive"),
    ],
)
async def test_connections_are_reused_as_version_and_connection_header_say(
    server: Server, client: httpx.AsyncClient, head: bytes, reused: bool
) -> None:
    server.handler = answering(*[head + b"Content-Length: 2\r\n\r\nok"] * 3)
    for _ in range(3):
        response = await client.get(server.url)
        assert response.text == "ok"
        assert response.http_version == head[:8].decode()
    assert server.connections == (1 if reused else 3)
    assert [r.connection for r in server.requests] == ([1, 1, 1] if reused else [1, 2, 3])


@pytest.mark.parametrize("connection", ["close", "close, te", "TE ,Close"])
async def test_a_request_with_connection_close_is_not_reused(
    server: Server, client: httpx.AsyncClient, connection: str
) -> None:
    for _ in range(2):
        assert (await client.get(server.url, headers={"Connection": connection})).text == "ok"
    assert server.connections == 2
    await server.wait_for(lambda: server.eofs == 2)


async def test_max_idle_connections_zero_never_reuses(server: Server) -> None:
    async with httpx.AsyncClient(transport=HTTP1Transport(max_idle_connections=0)) as client:
        for _ in range(3):
            assert (await client.get(server.url)).text == "ok"
        await server.wait_for(lambda: server.eofs == 3)
    assert server.connections == 3


async def test_at_most_max_idle_connections_are_kept(server: Server) -> None:
    async with httpx.AsyncClient(transport=HTTP1Transport(max_idle_connections=1)) as client:
        async with client.stream("GET", server.url) as a, client.stream("GET", server.url) as b:
            await a.aread()
            await b.aread()
        await server.wait_for(lambda: server.eofs == 1)  # the second one back found the pool full
        for _ in range(2):
            assert (await client.get(server.url)).text == "ok"
    assert server.connections == 2


# -- 3. connections the server closed ---------------------------------------------------------


async def test_a_connection_the_server_closed_while_idle_is_not_used(
    server: Server, client: httpx.AsyncClient
) -> None:
    """A POST is never replayed, so it only succeeds if it did not go out on the closed one."""

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(OK)
        if conn.number > 1:
            await answering()(conn)

    server.handler = handler
    assert (await client.get(server.url)).text == "ok"
    await server.wait_for(lambda: server.finished == 1)
    await trio.sleep(0.05)  # for the FIN to reach the client's socket
    assert (await client.post(server.url, content=b"data")).text == "ok"
    assert [(r.connection, r.body) for r in server.requests] == [(1, b""), (2, b"data")]


def close_after_reading_second_request(connections: int) -> Handler:
    """Connections up to ``connections`` answer one request, then read one more and close
    without answering it; later connections answer everything."""

    async def handler(conn: Conn) -> None:
        if conn.number > connections:
            await answering()(conn)
            return
        await conn.read_request()
        await conn.send(OK)
        await conn.read_request()

    return handler


@pytest.mark.parametrize(("method", "content"), [("GET", b""), ("PUT", b"layer"), ("DELETE", b"")])
async def test_an_idempotent_request_the_server_dropped_is_replayed_on_a_new_connection(
    server: Server, client: httpx.AsyncClient, method: str, content: bytes
) -> None:
    server.handler = close_after_reading_second_request(1)
    await client.get(server.url)
    response = await client.request(method, f"{server.url}/again", content=content)
    assert response.text == "ok"
    first, dropped, replayed = server.requests
    assert [r.connection for r in server.requests] == [1, 1, 2]
    assert dropped.raw == replayed.raw
    assert replayed.body == content
    assert first.target == b"/"


async def test_the_replay_goes_to_a_new_connection_not_another_idle_one(
    server: Server, client: httpx.AsyncClient
) -> None:
    server.handler = close_after_reading_second_request(2)
    async with client.stream("GET", server.url) as a, client.stream("GET", server.url) as b:
        await a.aread()
        await b.aread()
    response = await client.get(f"{server.url}/again")
    assert response.text == "ok"
    assert [r.connection for r in server.requests if r.target == b"/again"] == [2, 3]


@pytest.mark.parametrize(
    ("method", "content"),
    [
        pytest.param("POST", b"data", id="POST"),
        pytest.param("PUT", Pieces(b"data"), id="PUT-streamed"),
    ],
)
async def test_a_request_that_is_not_replayable_fails_when_the_server_drops_it(
    server: Server, client: httpx.AsyncClient, method: str, content: bytes | Pieces
) -> None:
    server.handler = close_after_reading_second_request(1)
    await client.get(server.url)
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        await client.request(method, server.url, content=content)
    assert server.connections == 1
    assert [r.body for r in server.requests] == [b"", b"data"]


async def test_a_new_connection_closed_before_any_response_fails_without_replay(
    server: Server, client: httpx.AsyncClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()

    server.handler = handler
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        await client.get(server.url)
    assert server.connections == 1


async def test_a_request_is_replayed_at_most_once(
    server: Server, client: httpx.AsyncClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        if conn.number == 1:
            await conn.send(OK)
            await conn.read_request()

    server.handler = handler
    await client.get(server.url)
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        await client.get(server.url)
    assert server.connections == 2


# -- 4. chunked bodies ------------------------------------------------------------------------


@pytest.mark.parametrize("piece", [None, 1, 3, 7], ids=["whole", "bytewise", "by-3", "by-7"])
async def test_a_chunked_body_is_decoded_however_it_is_split(
    server: Server, client: httpx.AsyncClient, piece: int | None
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(CHUNKED, piece=piece)
        await answering()(conn)

    server.handler = handler
    response = await client.get(server.url)
    assert response.content == b"hello, world 123"
    assert "x-trailer" not in response.headers
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 1


async def test_transfer_encoding_chunked_wins_over_content_length(
    server: Server, client: httpx.AsyncClient
) -> None:
    server.handler = answering(CHUNKED.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\n", 1))
    assert (await client.get(server.url)).content == b"hello, world 123"
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 1


@pytest.mark.parametrize("codings", [b"chunked,", b", Chunked", b"chunked ,,"])
async def test_empty_transfer_encoding_items_are_ignored(
    server: Server, client: httpx.AsyncClient, codings: bytes
) -> None:
    server.handler = answering(CHUNKED.replace(b"chunked", codings, 1))
    assert (await client.get(server.url)).content == b"hello, world 123"
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 1


@pytest.mark.parametrize("codings", [b"gzip, chunked", b"chunked, chunked", b"gzip", b","])
async def test_a_transfer_coding_other_than_chunked_is_refused(
    server: Server, client: httpx.AsyncClient, transport: HTTP1Transport, codings: bytes
) -> None:
    """The coded bytes are never taken for the content (httpx decodes Content-Encoding only)."""
    coded = gzip.compress(b"hello")
    server.handler = answering(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (codings, len(coded), coded)
    )
    with pytest.raises(httpx.RemoteProtocolError, match="only chunked"):
        await client.get(server.url)
    assert transport.bodies == 0
    await server.wait_for(lambda: server.eofs == 1)


async def test_a_chunked_http_1_0_response_is_read_and_its_connection_not_reused(
    server: Server, client: httpx.AsyncClient
) -> None:
    server.handler = answering(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    assert (await client.get(server.url)).content == b"hello"
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 2


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="not-hex"),
        pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", id="negative"),
        pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", id="0x"),
        pytest.param(b"\r\nhello\r\n0\r\n\r\n", id="empty"),
        pytest.param(b"3\r\nhello\r\n0\r\n\r\n", id="longer-than-size"),
        pytest.param(b"1" + b"0" * 15 + b"\r\nhello\r\n0\r\n\r\n", id="an-exabyte"),
    ],
)
async def test_a_bad_chunk_raises_and_closes_the_connection(
    server: Server, client: httpx.AsyncClient, transport: HTTP1Transport, chunks: bytes
) -> None:
    server.handler = answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    with pytest.raises(httpx.RemoteProtocolError, match="chunk"):
        await client.get(server.url)
    assert transport.bodies == 0
    await server.wait_for(lambda: server.eofs == 1)
    assert (await client.get(server.url)).text == "ok"


# -- 5. bodies read until the connection closes -----------------------------------------------


async def test_a_body_without_length_is_read_until_the_connection_closes(
    server: Server, client: httpx.AsyncClient
) -> None:
    body = os.urandom(200_000)

    async def handler(conn: Conn) -> None:
        if conn.number > 1:
            await answering()(conn)
            return
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\n\r\n")
        await conn.send(body, piece=50_000)

    server.handler = handler
    assert (await client.get(server.url)).content == body
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 2


# -- 6. responses without a body --------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "status"),
    [("HEAD", b"200 OK"), ("GET", b"204 No Content"), ("GET", b"304 Not Modified")],
)
async def test_a_response_without_body_leaves_the_connection_ready(
    server: Server, client: httpx.AsyncClient, method: str, status: bytes
) -> None:
    server.handler = answering(b"HTTP/1.1 %s\r\nContent-Length: 1000\r\n\r\n" % status)
    response = await client.request(method, server.url)
    assert response.status_code == int(status[:3])
    assert response.content == b""
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 1


# -- 7. informational responses ---------------------------------------------------------------


async def test_informational_responses_are_skipped(
    server: Server, client: httpx.AsyncClient
) -> None:
    server.handler = answering(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone"
    )
    response = await client.get(server.url)
    assert (response.status_code, response.content) == (201, b"done")
    assert "link" not in response.headers
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 1


async def test_101_switching_protocols_comes_at_once_without_body_and_closes_its_connection(
    server: Server, client: httpx.AsyncClient, transport: HTTP1Transport
) -> None:
    async def handler(conn: Conn) -> None:
        if conn.number > 1:
            await answering()(conn)
            return
        await conn.read_request()
        await conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"\r\nthe other protocol"
        )
        await conn.wait_eof()

    server.handler = handler
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket"}
    with trio.fail_after(1):
        response = await client.get(server.url, headers=upgrade)
    assert (response.status_code, response.content) == (101, b"")
    assert transport.bodies == 0
    await server.wait_for(lambda: server.eofs == 1)
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 2


# -- 8. malformed and truncated responses -----------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", id="content-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", id="in-chunk"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", id="no-last"
        ),
    ],
)
async def test_a_truncated_body_raises_and_gives_up_its_connection_at_once(
    server: Server, client: httpx.AsyncClient, transport: HTTP1Transport, data: bytes
) -> None:
    """The body stops counting as open when it fails, before httpx closes the response."""

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(data)

    server.handler = handler
    async with client.stream("GET", server.url) as response:
        with pytest.raises(httpx.RemoteProtocolError, match="closed"):
            await response.aread()
        assert transport.bodies == 0


async def test_a_truncated_head_raises_remote_protocol_error(
    server: Server, client: httpx.AsyncClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n")

    server.handler = handler
    with pytest.raises(httpx.RemoteProtocolError, match="in the middle of a response head"):
        await client.get(server.url)
    assert server.connections == 1


async def test_bytes_after_a_response_keep_its_connection_out_of_the_pool(
    server: Server, client: httpx.AsyncClient
) -> None:
    server.handler = answering(OK + b"HTTP/1.1 500 Stray\r\nContent-Length: 0\r\n\r\n")
    assert (await client.get(server.url)).text == "ok"
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 2


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"HTTP/2 200 OK", id="version-2"),
        pytest.param(b"HTTP/1.1 20 OK", id="two-digits"),
        pytest.param(b"HTTP/1.1 000 Zero\r\nContent-Length: 2", id="status-000"),
        pytest.param(b"HTTP/1.1 099 Low\r\nContent-Length: 2", id="status-099"),
        pytest.param(b"HTTP/1.1 200 OK\rX-Evil: 1\r\nContent-Length: 2", id="cr-in-reason"),
        pytest.param(b"HTTP/1.1 200 O\0K\r\nContent-Length: 2", id="nul-in-reason"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2", id="cr-in-value"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 2", id="nul-in-value"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\r\r\nContent-Length: 2", id="cr-cr-lf"),
        pytest.param(b"HTTP/1.1 200OK", id="no-space"),
        pytest.param(b"ICY 200 OK", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nNoColon", id="no-colon"),
        pytest.param(b"HTTP/1.1 200 OK\r\nBad Name: x", id="space-in-name"),
        pytest.param(b"HTTP/1.1 200 OK\r\n: x", id="empty-name"),
        pytest.param(b"HTTP/1.1 200 OK\r\n Folded: x", id="fold-first"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3", id="two-lengths"
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3", id="length-list"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2,", id="length-empty-item"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: -2", id="negative-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: two", id="word-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: %s" % (b"9" * 19), id="huge-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: %s2" % (b"0" * 4999), id="5000-digit-length"
        ),
    ],
)
async def test_a_malformed_head_raises_and_closes_the_connection(
    server: Server, client: httpx.AsyncClient, transport: HTTP1Transport, head: bytes
) -> None:
    server.handler = answering(head + b"\r\n\r\nok")
    with pytest.raises(httpx.RemoteProtocolError):
        await client.get(server.url)
    assert transport.bodies == 0
    await server.wait_for(lambda: server.eofs == 1)


async def test_repeated_equal_content_lengths_are_accepted(
    server: Server, client: httpx.AsyncClient
) -> None:
    server.handler = answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nhi"
    )
    assert (await client.get(server.url)).text == "hi"
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 1


@pytest.mark.parametrize("complete", [True, False], ids=["complete", "endless"])
async def test_a_head_over_64_kib_is_refused(
    server: Server, client: httpx.AsyncClient, complete: bool
) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: %s\r\n" % (b"f" * 1000) * 70
    server.handler = answering(head + b"Content-Length: 2\r\n\r\nok" if complete else head)
    with pytest.raises(httpx.RemoteProtocolError, match="longer than 65536"):
        await client.get(server.url)


async def test_a_head_just_under_64_kib_is_accepted(
    server: Server, client: httpx.AsyncClient
) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: %s\r\n" % (b"f" * 1000) * 63
    server.handler = answering(head + b"Content-Length: 2\r\n\r\nok")
    response = await client.get(server.url)
    assert response.text == "ok"
    assert len(response.headers.get_list("x-filler")) == 63


async def test_obsolete_line_folding_is_unfolded(server: Server, client: httpx.AsyncClient) -> None:
    server.handler = answering(
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n   b\r\n\tc \r\nContent-Length: 2\r\n\r\nok"
    )
    response = await client.get(server.url)
    assert response.headers["x-folded"] == "a b c"
    assert response.text == "ok"


async def test_a_folded_content_length_is_read_without_its_padding(
    server: Server, client: httpx.AsyncClient
) -> None:
    server.handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length:\r\n  2\r\n \r\n\r\nhi")
    response = await client.get(server.url)
    assert response.headers.raw == [(b"Content-Length", b"2")]
    assert response.text == "hi"
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 1


# -- 9. request bodies and headers ------------------------------------------------------------


@pytest.mark.parametrize("size", [11, 200_000])
async def test_a_bytes_body_goes_out_with_its_content_length(
    server: Server, client: httpx.AsyncClient, size: int
) -> None:
    body = os.urandom(size)
    assert (await client.post(f"{server.url}/up", content=body)).text == "ok"
    assert [r.raw for r in server.requests] == [
        request_head(server, b"/up", b"POST", b"Content-Length: %d" % size) + body
    ]


async def test_a_body_of_unknown_length_goes_out_chunked(
    server: Server, client: httpx.AsyncClient
) -> None:
    big = os.urandom(100_000)
    content = Pieces(b"abc", b"", big, b"defgh")
    assert (await client.put(f"{server.url}/up", content=content)).text == "ok"
    [received] = server.requests
    assert received.body == b"abc" + big + b"defgh"
    assert received.raw == (
        request_head(server, b"/up", b"PUT", b"Transfer-Encoding: chunked")
        + b"3\r\nabc\r\n186a0\r\n"
        + big
        + b"\r\n5\r\ndefgh\r\n0\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("pieces", "match"),
    [
        pytest.param((b"abc",), "has 3 bytes", id="fewer"),
        pytest.param((b"abc", b"def"), "has more bytes", id="more"),
        pytest.param((b"abc", b"x" * 100_000), "has more bytes", id="much-more"),
    ],
)
async def test_a_body_that_breaks_its_content_length_raises_local_protocol_error(
    server: Server,
    client: httpx.AsyncClient,
    transport: HTTP1Transport,
    pieces: tuple[bytes, ...],
    match: str,
) -> None:
    """Nothing beyond the declared length goes out, and the connection is dropped."""
    received = []

    async def handler(conn: Conn) -> None:
        if conn.number > 1:
            await answering()(conn)
            return
        received.append(await conn.wait_eof())

    server.handler = handler
    with pytest.raises(httpx.LocalProtocolError, match=match):
        await client.put(server.url, content=Pieces(*pieces), headers={"Content-Length": "5"})
    await server.wait_for(lambda: server.eofs == 1)
    allowed = request_head(server, b"/", b"PUT", b"Content-Length: 5") + b"".join(pieces)[:5]
    assert allowed.startswith(received[0])
    assert transport.bodies == 0
    assert (await client.get(server.url)).text == "ok"


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Bad": "a\r\nInjected: 1"},
        {"X-Bad": "a\nInjected: 1"},
        {"X-Bad": "a\0b"},
        {"Bad Name": "x"},
        {"Content-Length": "-1"},
        {"Content-Length": "1" * 5000},
    ],
)
async def test_a_bad_request_header_raises_before_anything_is_sent(
    server: Server, client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    with pytest.raises(httpx.LocalProtocolError):
        await client.get(server.url, headers=headers)
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 1
    assert [r.raw for r in server.requests] == [request_head(server, b"/")]


@pytest.mark.parametrize(
    "method",
    [
        pytest.param("GET / HTTP/1.1\r\nHost: x\r\n\r\nDELETE /victim HTTP/1.1\r\nX:", id="crlf"),
        pytest.param("GET /", id="space"),
        pytest.param("GET\0", id="nul"),
        pytest.param("GÉT", id="non-ascii"),
        pytest.param("", id="empty"),
    ],
)
async def test_a_method_that_is_not_a_token_raises_before_anything_is_sent(
    server: Server, client: httpx.AsyncClient, method: str
) -> None:
    with pytest.raises(httpx.LocalProtocolError, match="invalid method"):
        await client.request(method, server.url)
    assert (await client.get(server.url)).text == "ok"
    assert [r.raw for r in server.requests] == [request_head(server, b"/")]


# -- 10. a server that answers before reading the whole body ----------------------------------


async def test_an_early_answer_wins_over_the_body_it_cut_off(
    server: Server, client: httpx.AsyncClient, transport: HTTP1Transport
) -> None:
    async def handler(conn: Conn) -> None:
        if conn.number > 1:
            await answering()(conn)
            return
        await conn.read_until(b"\r\n\r\n")
        await conn.send(
            b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 8\r\n\r\n"
            b"too big!"
        )
        # closing with the body unread resets the connection: the client's writes fail

    server.handler = handler
    response = await client.put(server.url, content=endless())
    assert (response.status_code, response.content) == (413, b"too big!")
    assert transport.bodies == 0
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 2


async def test_a_body_cut_off_without_an_answer_raises_write_error(
    server: Server, client: httpx.AsyncClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_until(b"\r\n\r\n")

    server.handler = handler
    with pytest.raises(httpx.WriteError):
        await client.put(server.url, content=endless())
    assert server.connections == 1


# -- 11. responses closed early, read to the end, or cancelled --------------------------------


async def test_a_response_closed_before_its_body_is_read_closes_its_connection(
    server: Server, client: httpx.AsyncClient, transport: HTTP1Transport
) -> None:
    server.handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")  # body to come
    async with client.stream("GET", server.url) as response:
        assert response.status_code == 200
    assert transport.bodies == 0
    await server.wait_for(lambda: server.eofs == 1)
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 2


async def test_a_body_read_to_its_end_returns_the_connection_to_the_pool(
    server: Server, client: httpx.AsyncClient, transport: HTTP1Transport
) -> None:
    server.handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
    async with client.stream("GET", server.url) as response:
        assert b"".join([piece async for piece in response.aiter_raw()]) == b"0123456789"
        assert transport.bodies == 0
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 1


async def test_a_request_cancelled_mid_body_leaves_the_pool_usable(
    server: Server, client: httpx.AsyncClient, transport: HTTP1Transport
) -> None:
    server.handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n012")
    with trio.move_on_after(0.2) as scope:
        async with client.stream("GET", server.url) as response:
            async for _ in response.aiter_raw():
                pass
    assert scope.cancelled_caught
    assert transport.bodies == 0
    await server.wait_for(lambda: server.eofs == 1)
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 2


async def test_a_request_cancelled_before_its_answer_leaves_the_pool_usable(
    server: Server, client: httpx.AsyncClient
) -> None:
    async def handler(conn: Conn) -> None:
        if conn.number > 1:
            await answering()(conn)
            return
        await conn.read_request()
        await conn.wait_eof()

    server.handler = handler
    with trio.move_on_after(0.2) as scope:
        await client.get(server.url)
    assert scope.cancelled_caught
    await server.wait_for(lambda: server.eofs == 1)
    assert (await client.get(server.url)).text == "ok"
    assert server.connections == 2


# -- 12. timeouts and connection errors -------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n012"])
async def test_a_server_that_stops_answering_raises_read_timeout(
    server: Server, transport: HTTP1Transport, sent: bytes
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(sent)
        await trio.sleep_forever()

    server.handler = handler
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(0.2)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(server.url)
    assert transport.bodies == 0


async def test_a_server_that_stops_reading_raises_write_timeout(
    server: Server, transport: HTTP1Transport
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_until(b"\r\n\r\n")
        await trio.sleep_forever()

    server.handler = handler
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5, write=0.2)) as c:
        with pytest.raises(httpx.WriteTimeout):
            await c.put(server.url, content=endless())


async def test_a_tls_handshake_that_never_ends_raises_connect_timeout(
    server: Server, transport: HTTP1Transport
) -> None:
    async def handler(conn: Conn) -> None:
        await trio.sleep_forever()

    server.handler = handler
    url = f"https://127.0.0.1:{server.port}/"
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5, connect=0.2)) as c:
        with pytest.raises(httpx.ConnectTimeout):
            await c.get(url)


async def test_a_refused_connection_raises_connect_error(client: httpx.AsyncClient) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        await client.get(f"http://127.0.0.1:{port}/")


async def test_an_unsupported_scheme_raises_unsupported_protocol(
    client: httpx.AsyncClient,
) -> None:
    with pytest.raises(httpx.UnsupportedProtocol, match="'ftp'"):
        await client.get("ftp://127.0.0.1/blob")


# -- 13. TLS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLS:
    """A self-signed certificate for 127.0.0.1, and new contexts that serve it or trust it."""

    cert: Path
    key: Path

    def server(self, *alpn: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        if alpn:
            context.set_alpn_protocols(list(alpn))
        return context

    def client(self, *alpn: str) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.cert)
        if alpn:
            context.set_alpn_protocols(list(alpn))
        return context


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLS:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trio-blobs test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    (directory / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return TLS(directory / "cert.pem", directory / "key.pem")


@pytest.fixture
async def tls_server(nursery: trio.Nursery, tls: TLS) -> Server:
    server = Server(tls.server())
    await server.start(nursery)
    return server


async def test_https_get_over_a_trusted_certificate(tls_server: Server, tls: TLS) -> None:
    transport = HTTP1Transport(ssl_context=tls.client())
    async with httpx.AsyncClient(transport=transport, headers=HEADERS) as client:
        for _ in range(2):
            response = await client.get(f"{tls_server.url}/tls")
            assert (response.status_code, response.text) == (200, "ok")
    assert tls_server.connections == 1
    assert [r.raw for r in tls_server.requests] == [request_head(tls_server, b"/tls")] * 2


async def test_https_refuses_an_untrusted_certificate(tls_server: Server) -> None:
    async with httpx.AsyncClient(transport=HTTP1Transport()) as client:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get(tls_server.url)
    assert tls_server.requests == []


async def selecting_alpn(
    nursery: trio.Nursery, tls: TLS, *alpn: str
) -> tuple[Server, list[str | None]]:
    """A TLS server offering ``alpn``, and the protocols its connections chose, once they have
    shaken hands."""
    server = Server(tls.server(*alpn))
    await server.start(nursery)
    chosen: list[str | None] = []

    async def handler(conn: Conn) -> None:
        assert isinstance(conn.stream, trio.SSLStream)
        await conn.stream.do_handshake()
        chosen.append(conn.stream.selected_alpn_protocol())
        await answering()(conn)

    server.handler = handler
    return server, chosen


async def test_https_offers_http_1_1_only_whatever_the_context_offered(
    nursery: trio.Nursery, tls: TLS
) -> None:
    server, chosen = await selecting_alpn(nursery, tls, "h2", "http/1.1")
    context = tls.client("h2", "http/1.1")  # as an HTTP/2 client of httpx leaves it
    async with httpx.AsyncClient(transport=HTTP1Transport(ssl_context=context)) as client:
        assert (await client.get(server.url)).text == "ok"
    assert chosen == ["http/1.1"]


async def test_a_server_that_chooses_another_protocol_than_http_1_1_is_a_connect_error(
    nursery: trio.Nursery, tls: TLS, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = await selecting_alpn(nursery, tls, "h2")
    context = tls.client("h2")
    monkeypatch.setattr(context, "set_alpn_protocols", lambda protocols: None)  # offers h2 still
    async with httpx.AsyncClient(transport=HTTP1Transport(ssl_context=context)) as client:
        with pytest.raises(httpx.ConnectError, match="'h2'"):
            await client.get(server.url)
    await server.wait_for(lambda: server.finished == 1)
    assert server.requests == []


# -- 14. the read budget ----------------------------------------------------------------------


async def test_read_size_shrinks_while_many_bodies_are_open(
    server: Server, client: httpx.AsyncClient, transport: HTTP1Transport
) -> None:
    big = os.urandom(2 * MiB)

    async def handler(conn: Conn) -> None:
        while request := await conn.read_request():
            body = big if request.target == b"/big" else b"ok"
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    server.handler = handler
    assert transport.read_size() == READ_SIZE
    async with AsyncExitStack() as stack:
        responses = [
            await stack.enter_async_context(client.stream("GET", f"{server.url}/{target}"))
            for target in ["big"] + ["small"] * 31
        ]
        assert transport.bodies == 32
        assert transport.read_size() == READ_BUDGET // 32
        pieces = [piece async for piece in responses[0].aiter_raw()]
        assert b"".join(pieces) == big
        assert max(map(len, pieces)) <= READ_BUDGET // 32
        assert transport.bodies == 31
        assert transport.read_size() == READ_BUDGET // 31
        for response in responses[1 : 32 - READ_BUDGET // READ_SIZE]:
            await response.aclose()
        assert transport.bodies == READ_BUDGET // READ_SIZE
        assert transport.read_size() == READ_SIZE
    assert transport.bodies == 0
    assert transport.read_size() == READ_SIZE
    assert server.connections == 32


# -- 15. closing the transport ----------------------------------------------------------------


async def test_aclose_closes_idle_connections_and_later_clients_get_new_ones(
    server: Server,
) -> None:
    transport = HTTP1Transport()
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(server.url)).text == "ok"
        await trio.sleep(0.05)
        assert server.eofs == 0
    await server.wait_for(lambda: server.eofs == 1)
    async with httpx.AsyncClient(transport=transport) as client:  # the same transport
        for _ in range(2):
            assert (await client.get(server.url)).text == "ok"
    await server.wait_for(lambda: server.eofs == 2)
    assert [r.connection for r in server.requests] == [1, 2, 2]


async def test_a_response_open_at_aclose_closes_its_connection_when_read(
    server: Server, client: httpx.AsyncClient, transport: HTTP1Transport
) -> None:
    async with client.stream("GET", server.url) as response:
        await transport.aclose()
        assert await response.aread() == b"ok"
    await server.wait_for(lambda: server.eofs == 1)
    for _ in range(2):
        assert (await client.get(server.url)).text == "ok"
    assert [r.connection for r in server.requests] == [1, 2, 2]


async def test_close_idle_closes_the_kept_connections_only(
    server: Server, client: httpx.AsyncClient, transport: HTTP1Transport
) -> None:
    async with client.stream("GET", server.url) as in_use:
        assert (await client.get(server.url)).text == "ok"  # on a second connection, kept
        transport.close_idle()  # that one: not the one in use
        await server.wait_for(lambda: server.eofs == 1)
        assert await in_use.aread() == b"ok"
    assert (await client.get(server.url)).text == "ok"  # on the first, kept after
    assert [r.connection for r in server.requests] == [1, 2, 1]


@pytest.mark.parametrize("value", [-1, 1.5, "4", True, None])
async def test_max_idle_connections_must_be_a_non_negative_int(value: object) -> None:
    with pytest.raises(ValueError, match="max_idle_connections"):
        HTTP1Transport(max_idle_connections=value)  # type: ignore[arg-type]


# -- 16. a large body -------------------------------------------------------------------------


async def test_a_large_body_arrives_intact_in_pieces_of_at_most_1_mib(
    server: Server, client: httpx.AsyncClient
) -> None:
    body = os.urandom(5_000_000)
    server.handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5000000\r\n\r\n" + body)
    digest = hashlib.sha256()
    sizes = []
    async with client.stream("GET", server.url) as response:
        async for piece in response.aiter_raw():
            digest.update(piece)
            sizes.append(len(piece))
    assert digest.hexdigest() == hashlib.sha256(body).hexdigest()
    assert sum(sizes) == 5_000_000
    assert max(sizes) <= MiB
