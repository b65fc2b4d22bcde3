"""Limits a person on a slow link can set: the rate across a whole call, and how many blob
bodies flow at once."""

import itertools
import os
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from trio_blobs import Blob, download, upload
from trio_blobs.testing import Fault, Registry

from ._helpers import BASE_URL, add_blobs

MB = 1_000_000


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def test_downloads_keep_to_the_rate_together_and_smoothly(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    blobs = add_blobs(registry, *[MB] * 4)
    times: list[float] = []
    start = trio.current_time()
    await download(
        blobs,
        base_url=BASE_URL,
        dest_dir=tmp_path,
        client=client,
        rate_limit=2 * MB,
        stall_timeout=1,
        progress=lambda done, total: times.append(trio.current_time()),
    )
    assert 1.8 <= trio.current_time() - start <= 2.2  # 4 MB at 2 MB/s, however many streams
    assert max(gaps(times)) <= 0.25  # bytes keep coming, no whole-second sleeps
    assert len([r for r in registry.requests if r.method == "GET"]) == 4  # nothing stalled


async def test_uploads_keep_to_the_rate(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    blobs = []
    for _ in range(3):
        data = os.urandom(MB)
        blob = Blob.from_bytes(data)
        (tmp_path / blob.file_name).write_bytes(data)
        blobs.append(blob)
    times: list[float] = []
    start = trio.current_time()
    await upload(
        blobs,
        base_url=BASE_URL,
        src_dir=tmp_path,
        client=client,
        rate_limit=MB,
        stall_timeout=1,
        progress=lambda done, total: times.append(trio.current_time()),
    )
    assert 2.8 <= trio.current_time() - start <= 3.2
    assert max(gaps(times)) <= 0.25
    assert len([r for r in registry.requests if r.method == "PUT"]) == 3


@pytest.mark.parametrize("rate", [0, -1, True, "fast"])
async def test_a_bad_rate_fails_before_any_request(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, rate: object
) -> None:
    with pytest.raises(ValueError, match="rate_limit"):
        await download(
            add_blobs(registry, 10),
            base_url=BASE_URL,
            dest_dir=tmp_path / "d",
            client=client,
            rate_limit=rate,  # type: ignore[arg-type]
        )
    assert registry.requests == []
    assert not (tmp_path / "d").exists()


class InFlight(httpx.AsyncBaseTransport):
    """Records, per method, the most requests in flight at once."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        method = request.method
        self.active[method] = self.active.get(method, 0) + 1
        self.peak[method] = max(self.peak.get(method, 0), self.active[method])
        try:
            response = await self.inner.handle_async_request(request)
            await response.aread()
        finally:
            self.active[method] -= 1
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=httpx.ByteStream(response.content),
        )


async def test_body_streams_are_limited_apart_from_requests(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    registry = Registry(whole_posts=False)  # POSTs without bodies, then PUTs with them
    blobs = add_blobs(registry, *[1000] * 8)
    for blob in blobs:
        (tmp_path / blob.file_name).write_bytes(registry.blobs["library/_"][blob.digest])
    registry.add_fault(Fault(method=None, delay=1.0, times=None))  # every request takes 1 s
    transport = InFlight(registry.transport())
    async with httpx.AsyncClient(transport=transport) as client:
        await download(
            blobs,
            base_url=BASE_URL,
            dest_dir=tmp_path / "pulled",
            client=client,
            concurrency=8,
            max_body_streams=2,
        )
        await upload(
            blobs,
            base_url=BASE_URL,
            src_dir=tmp_path,
            repository="other/repo",
            client=client,
            concurrency=8,
            max_body_streams=2,
        )
    assert transport.peak["GET"] == 2  # blob bodies
    assert transport.peak["PUT"] == 2
    assert transport.peak["HEAD"] == 8  # cheap requests run wider
    # The first POST carries its blob, asking whether the registry takes blobs that way (this
    # one ignores it); the other seven wait for that answer, then go out together.
    assert transport.peak["POST"] == 7
