"""Helpers shared by the tests."""

import itertools
import os

import httpx

from trio_blobs import Blob
from trio_blobs.testing import Registry

BASE_URL = "http://registry.test"


def add_blobs(registry: Registry, *sizes: int, repository: str = "library/_") -> list[Blob]:
    """Random blobs of the given sizes, stored in ``registry``."""
    return [registry.add_blob(os.urandom(size), repository) for size in sizes]


def went_backwards(calls: list[tuple[int, int]]) -> bool:
    """Whether progress ``(done, total)`` calls ever rolled back."""
    return any(b[0] < a[0] for a, b in itertools.pairwise(calls))


class CountingTransport(httpx.AsyncBaseTransport):
    """Wraps a transport and records the most requests that were ever in flight at once."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.active = self.peak = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            response = await self.inner.handle_async_request(request)
            await response.aread()
        finally:
            self.active -= 1
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=httpx.ByteStream(response.content),
        )


class Pieces(httpx.AsyncByteStream):
    """A body in pieces (an iterator, which may be left unfinished)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = iter(pieces)

    def __aiter__(self) -> "Pieces":
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self._pieces)
        except StopIteration:
            raise StopAsyncIteration from None
