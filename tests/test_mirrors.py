"""Mirrors: tried in order before the registry for each blob, trusted through the digest."""

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from trio_blobs import AuthChallenge, Blob, download
from trio_blobs.testing import Fault, Registry

from ._helpers import BASE_URL, add_blobs

MIRROR = "http://mirror.test"
SECOND = "http://second.test"


class Hosts(httpx.AsyncBaseTransport):
    """Sends each request to the registry that serves its host."""

    def __init__(self, registries: dict[str, Registry]) -> None:
        self.transports = {host: r.transport() for host, r in registries.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.transports[request.url.host].handle_async_request(request)


def blob_gets(registry: Registry) -> int:
    return len([r for r in registry.requests if r.method == "GET"])


@pytest.fixture
def mirror() -> Registry:
    return Registry()


@pytest.fixture
async def client(registry: Registry, mirror: Registry) -> AsyncIterator[httpx.AsyncClient]:
    transport = Hosts({"registry.test": registry, "mirror.test": mirror})
    async with httpx.AsyncClient(transport=transport) as client:
        yield client


def copy(blobs: list[Blob], source: Registry, target: Registry) -> None:
    for blob in blobs:
        target.blobs.setdefault("library/_", {})[blob.digest] = source.blobs["library/_"][
            blob.digest
        ]


async def test_blobs_come_from_the_mirror_when_it_has_them(
    registry: Registry, mirror: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = add_blobs(registry, 10, 100_000)
    copy(blobs, registry, mirror)
    await download(
        blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, mirrors=[MIRROR], token="t"
    )
    assert (blob_gets(mirror), blob_gets(registry)) == (2, 0)
    assert all("authorization" not in r.headers for r in mirror.requests)  # no token for it


@pytest.mark.parametrize(
    "fault",
    [
        None,  # the mirror does not have it: 404
        Fault(status=503, times=None),
        Fault(status=401, times=None),
        Fault(corrupt=True, times=None),  # its bytes do not verify
        Fault(truncate_at=10, times=None),
    ],
)
async def test_a_mirror_that_fails_is_passed_over(
    registry: Registry,
    mirror: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    fault: Fault | None,
) -> None:
    [blob] = add_blobs(registry, 1000)
    if fault is not None:
        copy([blob], registry, mirror)
        mirror.add_fault(fault)
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, mirrors=[MIRROR])
    assert (blob_gets(mirror), blob_gets(registry)) == (1, 1)
    assert (tmp_path / blob.file_name).read_bytes() == registry.blobs["library/_"][blob.digest]


async def test_a_stalled_mirror_is_passed_over(
    registry: Registry,
    mirror: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    [blob] = add_blobs(registry, 1000)
    copy([blob], registry, mirror)
    mirror.add_fault(Fault(stall_after=10, times=None))
    start = trio.current_time()
    await download(
        [blob],
        base_url=BASE_URL,
        dest_dir=tmp_path,
        client=client,
        mirrors=[MIRROR],
        stall_timeout=2,
    )
    assert 2 <= trio.current_time() - start <= 3
    assert (blob_gets(mirror), blob_gets(registry)) == (1, 1)


async def test_mirrors_are_tried_in_order(registry: Registry, tmp_path: Path) -> None:
    first, second = Registry(), Registry()
    blobs = add_blobs(registry, 10, 20)
    copy(blobs[1:], registry, second)
    transport = Hosts({"registry.test": registry, "mirror.test": first, "second.test": second})
    async with httpx.AsyncClient(transport=transport) as client:
        await download(
            blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, mirrors=[MIRROR, SECOND]
        )
    assert (blob_gets(first), blob_gets(second), blob_gets(registry)) == (2, 2, 1)


async def test_credentials_go_to_mirrors_only_when_asked(
    mirror: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = add_blobs(mirror, 10)
    await download(
        [blob],
        base_url=BASE_URL,
        dest_dir=tmp_path,
        client=client,
        mirrors=[MIRROR],
        mirror_credentials=True,
        token="t",
    )
    assert [r.headers.get("authorization") for r in mirror.requests] == ["Bearer t"]


async def test_a_mirror_with_credentials_of_its_own_keeps_them_apart(tmp_path: Path) -> None:
    registry, mirror = Registry(token="registry-token"), Registry(token="mirror-token")
    blobs = add_blobs(registry, *range(100, 120))
    copy(blobs[::2], registry, mirror)  # the others are misses there: 404, then the registry

    async def get_token(challenge: AuthChallenge) -> str:
        return "mirror-token" if "mirror.test" in (challenge.realm or "") else "registry-token"

    transport = Hosts({"registry.test": registry, "mirror.test": mirror})
    async with httpx.AsyncClient(transport=transport) as client:
        await download(
            blobs,
            base_url=BASE_URL,
            dest_dir=tmp_path,
            client=client,
            mirrors=[MIRROR],
            mirror_credentials=True,
            get_token=get_token,
        )
    # One challenge each (the first request): neither side's token replaced the other's.
    for served, token in ((mirror, "mirror-token"), (registry, "registry-token")):
        sent = [r.headers.get("authorization") for r in served.requests]
        assert sum(header != f"Bearer {token}" for header in sent) == 1
    assert (blob_gets(mirror), blob_gets(registry)) == (20 + 1, 10 + 1)  # and the refused ones


@pytest.mark.parametrize(("mirrors", "error"), [(["ftp://x"], ValueError), ("http://m", TypeError)])
async def test_bad_mirrors_fail_before_any_request(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, mirrors: object, error: type
) -> None:
    with pytest.raises(error):
        await download(
            add_blobs(registry, 10),
            base_url=BASE_URL,
            dest_dir=tmp_path,
            client=client,
            mirrors=mirrors,  # type: ignore[arg-type]
        )
    assert registry.requests == []
