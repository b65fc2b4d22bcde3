"""The test registry's two front ends: an in-memory httpx transport and a loopback HTTP/1.1 server.

Both hand every request to the same sans-socket :data:`Handler` and send back what it returns, so
a test sees the same registry whichever it uses. The handler, or a response body, drops the
connection by raising :class:`DropConnection`; the transport turns that into
:class:`httpx.RemoteProtocolError` (what httpx raises when a peer closes it), the server closes
the socket.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

import h11
import httpx
import trio

__all__ = ["DropConnection", "Handler", "MemoryTransport", "Response", "listen", "run_server"]

_RECEIVE_SIZE = 1 << 20


class DropConnection(Exception):
    """Raised by a handler, or by a response body, to drop the connection without a response,
    or after the bytes yielded so far."""


@dataclass(frozen=True, slots=True)
class Response:
    """A handler's answer: status, headers (with Content-Length) and the body in chunks."""

    status: int
    headers: list[tuple[str, str]]
    body: AsyncGenerator[bytes, None]


# (method, target, headers, request body, origin such as "http://127.0.0.1:5000") -> response
Handler = Callable[[str, str, httpx.Headers, AsyncIterable[bytes], str], Awaitable[Response]]


class MemoryTransport(httpx.AsyncBaseTransport):
    """An httpx transport that hands every request, whatever its host, to ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(request.stream, httpx.AsyncByteStream):
            raise TypeError("the in-memory registry transport needs an httpx.AsyncClient request")
        url = request.url
        try:
            response = await self._handler(
                request.method,
                url.raw_path.decode("ascii"),
                httpx.Headers(request.headers),
                request.stream,
                f"{url.scheme}://{url.netloc.decode('ascii')}",
            )
        except DropConnection as exc:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending a response", request=request
            ) from exc
        return httpx.Response(
            response.status,
            headers=response.headers,
            stream=_MemoryStream(response.body, request),
            extensions={"http_version": b"HTTP/1.1"},
        )


class _MemoryStream(httpx.AsyncByteStream):
    def __init__(self, body: AsyncGenerator[bytes, None], request: httpx.Request) -> None:
        self._body = body
        self._request = request

    # An iterator rather than an async generator: httpx may stop iterating early, and then only
    # aclose() runs, so nothing may be left suspended for the garbage collector to finalize.
    def __aiter__(self) -> _MemoryStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._body.__anext__()
        except DropConnection as exc:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body",
                request=self._request,
            ) from exc

    async def aclose(self) -> None:
        await self._body.aclose()


async def listen(host: str, port: int) -> tuple[list[trio.SocketListener], str]:
    """Open TCP listeners on ``host``:``port`` and return them with the base URL they serve."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    address, bound_port = listeners[0].socket.getsockname()[:2]
    if ":" in address:
        address = f"[{address}]"
    return listeners, f"http://{address}:{bound_port}"


async def run_server(handler: Handler, listeners: list[trio.SocketListener], base_url: str) -> None:
    """Serve HTTP/1.1 on ``listeners`` until cancelled; Host-less requests get ``base_url``."""
    await trio.serve_listeners(functools.partial(_serve_connection, handler, base_url), listeners)


async def _serve_connection(handler: Handler, base_url: str, stream: trio.SocketStream) -> None:
    """Answer requests on one keep-alive connection until either side closes it.

    A peer that goes away or speaks garbage, or a fault that drops the connection, ends this
    connection only; ``serve_listeners`` closes the socket.
    """
    conn = h11.Connection(h11.SERVER)
    try:
        while isinstance(request := await _next_event(conn, stream), h11.Request):
            headers = httpx.Headers(list(request.headers))
            origin = f"http://{headers['host']}" if "host" in headers else base_url
            async with aclosing(_request_body(conn, stream)) as body:
                response = await handler(
                    request.method.decode("ascii"),
                    request.target.decode("ascii"),
                    headers,
                    body,
                    origin,
                )
            head = h11.Response(
                status_code=response.status,
                headers=response.headers,
                reason=httpx.codes.get_reason_phrase(response.status),
            )
            async with aclosing(response.body) as chunks:
                await _send(conn, stream, head)
                async for chunk in chunks:
                    for piece in conn.send_with_data_passthrough(h11.Data(data=chunk)) or ():
                        await stream.send_all(piece)
            await _send(conn, stream, h11.EndOfMessage())
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (DropConnection, trio.BrokenResourceError, h11.RemoteProtocolError):
        return


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> object:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))
    return event


async def _request_body(
    conn: h11.Connection, stream: trio.SocketStream
) -> AsyncGenerator[bytes, None]:
    while isinstance(event := await _next_event(conn, stream), h11.Data):
        yield event.data


async def _send(conn: h11.Connection, stream: trio.SocketStream, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)
