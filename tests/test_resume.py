"""Resumable downloads: what a failed attempt received is kept, re-hashed and continued."""

import fcntl
import os
import shutil
import signal
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import trio
import trio.testing

from trio_blobs import Blob, LocalFileError, download
from trio_blobs.testing import Fault, Registry

from ._helpers import BASE_URL, add_blobs
from .test_download import file_size_limit  # noqa: F401 - a fixture

MB = 1_000_000


def gets(registry: Registry, blob: Blob) -> list[str | None]:
    """The Range header of every GET for ``blob``, in order."""
    return [
        r.headers.get("range")
        for r in registry.requests
        if r.method == "GET" and blob.digest in r.url
    ]


def partial_of(dest: Path, blob: Blob) -> Path:
    return dest / f".{blob.file_name}.partial"


async def test_a_dropped_connection_resumes_where_it_stopped(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = add_blobs(registry, 100 * MB)
    registry.add_fault(Fault(truncate_at=50 * MB))  # the connection drops half way
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert gets(registry, blob) == [None, f"bytes={50 * MB}-"]  # 100 MB served in all
    assert (tmp_path / blob.file_name).read_bytes() == registry.blobs["library/_"][blob.digest]
    assert not partial_of(tmp_path, blob).exists()


async def test_a_server_that_ignores_range_starts_over(tmp_path: Path) -> None:
    registry = Registry(ranges=False)
    [blob] = add_blobs(registry, 2 * MB)
    registry.add_fault(Fault(truncate_at=MB))
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await download(
            [blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, resume_threshold=MB
        )
    assert gets(registry, blob) == [None, f"bytes={MB}-"]
    assert (tmp_path / blob.file_name).read_bytes() == registry.blobs["library/_"][blob.digest]


async def test_a_wrong_content_range_discards_what_was_kept(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = add_blobs(registry, 2 * MB)
    registry.add_fault(Fault(truncate_at=MB))
    registry.add_fault(Fault(headers={"content-range": f"bytes 0-{MB - 1}/{2 * MB}"}))
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, resume_threshold=MB)
    assert gets(registry, blob) == [None, f"bytes={MB}-", None]
    assert (tmp_path / blob.file_name).read_bytes() == registry.blobs["library/_"][blob.digest]


async def test_small_blobs_start_over(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = add_blobs(registry, 2 * MB)
    registry.add_fault(Fault(truncate_at=MB))
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert gets(registry, blob) == [None, None]
    assert {p.name for p in tmp_path.iterdir()} == {blob.file_name}


@pytest.mark.parametrize(
    ("kept", "ranges"),
    [
        ("half", [f"bytes={MB}-"]),  # a partial file from an earlier call: only the rest
        ("all", []),  # complete but not renamed (a crash, say): verified without a request
        ("wrong", [None]),  # complete but wrong: dropped, fetched again
        ("longer", [None]),  # longer than the blob: dropped
    ],
)
async def test_a_later_call_finds_what_an_earlier_one_kept(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    kept: str,
    ranges: list[str | None],
) -> None:
    [blob] = add_blobs(registry, 2 * MB)
    data = registry.blobs["library/_"][blob.digest]
    partial_of(tmp_path, blob).write_bytes(
        {"half": data[:MB], "all": data, "wrong": bytes(2 * MB), "longer": data + b"x"}[kept]
    )
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, resume_threshold=MB)
    assert gets(registry, blob) == ranges
    assert (tmp_path / blob.file_name).read_bytes() == data
    assert {p.name for p in tmp_path.iterdir()} == {blob.file_name}


async def test_a_partial_file_in_use_elsewhere_is_left_alone(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = add_blobs(registry, 2 * MB)
    partial = partial_of(tmp_path, blob)
    partial.write_bytes(b"another download's bytes")
    with partial.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        await download(
            [blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, resume_threshold=MB
        )
    assert gets(registry, blob) == [None]
    assert partial.read_bytes() == b"another download's bytes"
    assert (tmp_path / blob.file_name).read_bytes() == registry.blobs["library/_"][blob.digest]


async def test_a_full_disk_keeps_what_was_received(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    file_size_limit: int,  # noqa: F811
) -> None:
    [blob] = add_blobs(registry, 4 * file_size_limit)
    with pytest.raises(LocalFileError):
        await download(
            [blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, resume_threshold=0
        )
    assert 0 < partial_of(tmp_path, blob).stat().st_size <= file_size_limit
    assert len(gets(registry, blob)) == 1  # not retried


async def test_the_free_space_needed_counts_what_partial_files_hold(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [blob] = add_blobs(registry, 2 * MB)
    data = registry.blobs["library/_"][blob.digest]
    partial_of(tmp_path, blob).write_bytes(data[: 3 * MB // 2])
    free = MB // 2 + 10  # enough for the rest, not for the whole blob
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(free=free))
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, resume_threshold=MB)
    assert gets(registry, blob) == [f"bytes={3 * MB // 2}-"]
    assert (tmp_path / blob.file_name).read_bytes() == data


async def test_a_cancelled_download_keeps_what_was_received(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    [blob] = add_blobs(registry, 2 * MB)
    registry.add_fault(Fault(stall_after=MB))
    with trio.move_on_after(5):
        await download(
            [blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, resume_threshold=MB
        )
    assert partial_of(tmp_path, blob).stat().st_size == MB
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, resume_threshold=MB)
    assert gets(registry, blob) == [None, f"bytes={MB}-"]


CHILD = textwrap.dedent(
    """
    import sys, trio, trio_blobs
    url, dest, digest, size = sys.argv[1:]
    blob = trio_blobs.Blob(digest, int(size))
    trio.run(lambda: trio_blobs.download([blob], base_url=url, dest_dir=dest, stall_timeout=60))
    """
)


async def test_a_killed_process_is_resumed_by_the_next(registry: Registry, tmp_path: Path) -> None:
    [blob] = add_blobs(registry, 100 * MB)
    registry.add_fault(Fault(stall_after=50 * MB))  # the first process never gets further
    partial = partial_of(tmp_path, blob)
    async with registry.serving() as url:
        child = await trio.lowlevel.open_process(
            [sys.executable, "-c", CHILD, url, str(tmp_path), blob.digest, str(blob.size)]
        )
        try:
            with trio.fail_after(30):
                # the file is the only sign of the other process's progress
                while not partial.exists() or partial.stat().st_size < 50 * MB:  # noqa: ASYNC110
                    await trio.sleep(0.05)
        finally:
            child.send_signal(signal.SIGKILL)
            await child.wait()
        await download([blob], base_url=url, dest_dir=tmp_path)
    assert gets(registry, blob) == [None, f"bytes={50 * MB}-"]  # 100 MB served in all
    assert (tmp_path / blob.file_name).read_bytes() == registry.blobs["library/_"][blob.digest]
    assert os.listdir(tmp_path) == [blob.file_name]


async def test_two_calls_fetching_the_same_blob_never_corrupt_it(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [big, small] = add_blobs(registry, 3 * MB, 1000)
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(
                lambda: download(
                    [big, small, big],
                    base_url=BASE_URL,
                    dest_dir=tmp_path,
                    client=client,
                    resume_threshold=MB,
                )
            )
    assert 1 <= len(gets(registry, big)) <= 2  # fetched once, or at worst twice
    for blob in (big, small):
        assert (tmp_path / blob.file_name).read_bytes() == registry.blobs["library/_"][blob.digest]
    assert sorted(os.listdir(tmp_path)) == sorted([big.file_name, small.file_name])


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
async def test_a_partial_name_that_is_not_a_file_is_left_alone(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, kind: str
) -> None:
    """A symbolic or hard link at the partial file's name is never written through (its target
    may be outside dest_dir), nor a FIFO waited on: the blob is fetched into a file of its own."""
    [blob] = add_blobs(registry, 300_000)
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside.conf"
    outside.write_bytes(b"precious\n")
    if kind == "symlink":
        partial_of(dest, blob).symlink_to(outside)
    elif kind == "hardlink":
        os.link(outside, partial_of(dest, blob))
    else:
        os.mkfifo(partial_of(dest, blob))
    with trio.fail_after(10):
        await download(
            [blob], base_url=BASE_URL, dest_dir=dest, client=client, resume_threshold=1000
        )
    assert outside.read_bytes() == b"precious\n"
    assert (dest / blob.file_name).read_bytes() == registry.blobs["library/_"][blob.digest]
    assert gets(registry, blob) == [None]
