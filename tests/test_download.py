"""download(): behaviour against the in-process registry, in memory and over loopback."""

import errno
import functools
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

import trio_blobs
from trio_blobs import (
    AuthChallenge,
    AuthenticationError,
    Blob,
    IntegrityError,
    LocalFileError,
    ProtocolError,
    RegistryError,
    RetriesExhaustedError,
    StallError,
    download,
)
from trio_blobs._session import RegistrySession
from trio_blobs._transfer import local_file_errors
from trio_blobs.testing import Fault, Registry

from ._helpers import BASE_URL, CountingTransport, add_blobs, went_backwards


def blob_gets(registry: Registry, digest: str | None = None) -> list[str]:
    return [
        r.url
        for r in registry.requests
        if r.method == "GET" and "/blobs/" in r.url and (digest is None or digest in r.url)
    ]


def stored(dest: Path) -> set[str]:
    """Every name in ``dest``, temporary files included."""
    return {p.name for p in dest.iterdir()}


def assert_exactly(dest: Path, registry: Registry, blobs: list[Blob]) -> None:
    """``dest`` holds these blobs, byte for byte, and nothing else."""
    assert stored(dest) == {b.file_name for b in blobs}
    for b in blobs:
        assert (dest / b.file_name).read_bytes() == registry.blobs["library/_"][b.digest]


# -- 1. a nursery of tasks, at most `concurrency` requests in flight ------------------------


async def test_downloads_in_parallel_within_the_concurrency_limit(
    registry: Registry, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    blobs = add_blobs(registry, *range(1000, 1020))
    registry.add_fault(Fault(delay=1.0, times=None))
    transport = CountingTransport(registry.transport())
    start = trio.current_time()
    async with httpx.AsyncClient(transport=transport) as client:
        result = await download(
            blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, concurrency=3
        )
    assert transport.peak == 3
    assert trio.current_time() - start == pytest.approx(7.0, abs=0.01)  # ceil(20 / 3) rounds
    assert result.downloaded == tuple(b.digest for b in blobs)
    assert_exactly(tmp_path, registry, blobs)


async def test_concurrency_stays_within_the_files_the_process_may_open(
    registry: Registry,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (64 + 3 * 5, resource.RLIM_INFINITY))
    caplog.set_level(logging.INFO, "trio_blobs")
    closed_idle = 0

    def close_idle(session: RegistrySession) -> None:
        nonlocal closed_idle
        closed_idle += 1

    monkeypatch.setattr(RegistrySession, "close_idle", close_idle)
    blobs = add_blobs(registry, *range(1000, 1040))
    registry.add_fault(Fault(delay=1.0, times=None))
    transport = CountingTransport(registry.transport())
    async with httpx.AsyncClient(transport=transport) as client, trio.open_nursery() as nursery:
        # Two calls at once share the places: the files are the process's.
        for half in (blobs[:20], blobs[20:]):
            fetch = functools.partial(
                download, half, base_url=BASE_URL, dest_dir=tmp_path, client=client, concurrency=20
            )
            nursery.start_soon(fetch)
    assert transport.peak == 5
    assert "concurrency 20 would need about 60 open files" in caplog.text
    # While transfers wait for places, those that end keep no connections idle (the last few,
    # with none waiting, keep theirs).
    assert len(blobs) - 2 * 5 <= closed_idle < len(blobs)
    assert_exactly(tmp_path, registry, blobs)


def test_running_out_of_files_says_what_to_do(tmp_path: Path) -> None:
    blob = Blob.from_bytes(b"x")
    with (
        pytest.raises(LocalFileError, match=r"Too many open files \(lower concurrency"),
        local_file_errors(blob.digest, tmp_path),
    ):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


# -- 2. verified files only under final names, nothing stray ----------------------------------


async def test_every_blob_lands_verified_under_its_final_name(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = add_blobs(registry, 0, 1, 65536, 3_000_000)
    result = await download(blobs, base_url=BASE_URL, dest_dir=tmp_path / "new", client=client)
    assert result == trio_blobs.DownloadResult(tuple(b.digest for b in blobs), ())
    assert_exactly(tmp_path / "new", registry, blobs)


async def test_a_failed_blob_leaves_no_file_and_no_temp_file(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    good, bad = add_blobs(registry, 100_000, 100_000)
    registry.add_fault(Fault(digest=bad.digest, corrupt=True, times=None))
    with pytest.raises(RetriesExhaustedError) as caught:
        await download(
            [good, bad], base_url=BASE_URL, dest_dir=tmp_path, client=client, concurrency=1
        )
    assert caught.value.digest == bad.digest
    assert isinstance(caught.value.last_error, IntegrityError)
    assert "digest" in str(caught.value)
    assert stored(tmp_path) == {good.file_name}


async def test_sha512_blobs_are_verified_with_sha512(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    data = os.urandom(5000)
    blob = Blob.from_bytes(data, algorithm="sha512")
    registry.blobs.setdefault("library/_", {})[blob.digest] = data
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert (tmp_path / f"sha512-{blob.digest[7:]}").read_bytes() == data


# -- 3. one GET per blob; redirects by hand; Authorization only to the registry ------------


async def test_one_get_per_blob_and_no_other_request(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = add_blobs(registry, *[10] * 30)
    await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert len(registry.requests) == 30
    assert sorted(blob_gets(registry)) == sorted(
        f"{BASE_URL}/v2/library/_/blobs/{b.digest}" for b in blobs
    )


async def test_redirect_to_storage_never_carries_the_token(tmp_path: Path) -> None:
    registry = Registry(token="s3cret", redirect_blobs_to="http://storage.test")
    blobs = add_blobs(registry, 70_000, 5)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, token="s3cret")
    assert_exactly(tmp_path, registry, blobs)
    to_storage = [r for r in registry.requests if r.url.startswith("http://storage.test/")]
    to_registry = [r for r in registry.requests if r.url.startswith(BASE_URL)]
    assert len(to_storage) == len(to_registry) == 2
    assert all("authorization" not in r.headers for r in to_storage)
    assert all(r.headers["authorization"] == "Bearer s3cret" for r in to_registry)
    assert all("sig=" in r.url for r in to_storage)  # the presigned query is kept


async def test_same_origin_redirect_keeps_the_token(tmp_path: Path) -> None:
    registry = Registry(token="s3cret", redirect_blobs_to=BASE_URL)
    blobs = add_blobs(registry, 100)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, token="s3cret")
    assert [r.headers.get("authorization") for r in registry.requests] == ["Bearer s3cret"] * 2


async def test_https_to_http_redirect_is_refused(tmp_path: Path) -> None:
    registry = Registry(redirect_blobs_to="http://storage.test")
    blobs = add_blobs(registry, 100)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        with pytest.raises(ProtocolError, match="https to http"):
            await download(
                blobs, base_url="https://registry.test", dest_dir=tmp_path, client=client
            )
    assert stored(tmp_path) == set()


async def test_a_redirect_loop_ends_after_ten_hops(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = add_blobs(registry, 100)
    registry.add_fault(
        Fault(status=307, headers={"location": "/v2/library/_/blobs/" + blob.digest}, times=None)
    )
    with pytest.raises(ProtocolError, match="more than 10 redirects"):
        await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert len(registry.requests) == 11


# -- 4. 401: one token refresh for many waiters ---------------------------------------------


async def test_many_rejected_transfers_share_one_token_refresh(tmp_path: Path) -> None:
    registry = Registry(token="t1")
    blobs = add_blobs(registry, *[1000] * 40)
    challenges: list[AuthChallenge] = []

    async def get_token(challenge: AuthChallenge) -> str:
        challenges.append(challenge)
        await trio.sleep(0.01)
        assert registry.token is not None
        return registry.token

    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await download(
            blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, get_token=get_token
        )
        registry.token = "t2"  # the old token expires
        await download(
            add_blobs(registry, *[1000] * 40),
            base_url=BASE_URL,
            dest_dir=tmp_path,
            client=client,
            get_token=get_token,
            token="t1",
        )
    assert len(challenges) == 2
    assert challenges[0].scheme == "bearer"
    assert challenges[0].realm == "http://registry.test/token"
    assert challenges[0].scope == "repository:library/_:pull"


async def test_without_a_token_one_request_goes_first_and_the_rest_carry_credentials(
    tmp_path: Path,
) -> None:
    registry = Registry(token="t1")
    blobs = add_blobs(registry, *[1000] * 40)

    async def get_token(challenge: AuthChallenge) -> str:
        await trio.sleep(0.01)
        return "t1"

    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await download(
            blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, get_token=get_token
        )
    without = [r for r in registry.requests if "authorization" not in r.headers]
    assert len(without) == 1
    assert len(registry.requests) == 41
    assert_exactly(tmp_path, registry, blobs)


async def test_a_first_request_that_fails_lets_the_others_go(tmp_path: Path) -> None:
    registry = Registry()
    blobs = add_blobs(registry, *[1000] * 5)
    registry.add_fault(Fault(status=503, times=1))

    async def get_token(challenge: AuthChallenge) -> str:
        raise AssertionError("an open registry asks for no credentials")

    async with httpx.AsyncClient(transport=registry.transport()) as client:
        with trio.fail_after(5):
            await download(
                blobs,
                base_url=BASE_URL,
                dest_dir=tmp_path,
                client=client,
                get_token=get_token,
                retry=trio_blobs.RetryPolicy(base_delay=0.01),
            )
    assert len(registry.requests) == 6
    assert_exactly(tmp_path, registry, blobs)


async def test_a_token_rejected_after_refresh_is_final(tmp_path: Path) -> None:
    registry = Registry(token="right")
    blobs = add_blobs(registry, 10)
    errors: list[str | None] = []

    async def get_token(challenge: AuthChallenge) -> str:
        errors.append(challenge.error)
        return "wrong"

    async with httpx.AsyncClient(transport=registry.transport()) as client:
        with pytest.raises(AuthenticationError, match="refused the new credentials") as caught:
            await download(
                blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, get_token=get_token
            )
    assert caught.value.status == 401
    assert caught.value.digest == blobs[0].digest
    # Asked once at first contact, and once more after the token was refused, saying so.
    assert errors == [None, "invalid_token"]
    assert len(registry.requests) == 3


async def test_a_401_without_get_token_is_a_clear_error(tmp_path: Path) -> None:
    registry = Registry(token="right")
    blobs = add_blobs(registry, 10)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        with pytest.raises(AuthenticationError, match="get_token"):
            await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert len(registry.requests) == 1


# -- 5. the monitor: stalls and slow transfers ----------------------------------------------


async def test_stalled_body_is_cancelled_and_retried(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    [blob] = add_blobs(registry, 200_000)
    registry.add_fault(Fault(stall_after=50_000, times=2))
    start = trio.current_time()
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, stall_timeout=3)
    assert 6 <= trio.current_time() - start <= 8
    assert len(blob_gets(registry)) == 3
    assert_exactly(tmp_path, registry, [blob])


async def test_missing_response_headers_count_as_a_stall(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    [blob] = add_blobs(registry, 1000)
    registry.add_fault(Fault(delay=1e6, times=1))
    start = trio.current_time()
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, stall_timeout=2)
    assert 2 <= trio.current_time() - start <= 3
    assert len(blob_gets(registry)) == 2


async def test_stalls_do_not_use_up_attempts_but_ten_in_a_row_fail(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    [blob] = add_blobs(registry, 1000)
    registry.add_fault(Fault(stall_after=10, times=None))
    with pytest.raises(RetriesExhaustedError) as caught:
        await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, stall_timeout=1)
    assert isinstance(caught.value.last_error, StallError)
    assert len(blob_gets(registry)) == 10  # more than the six attempts other failures get
    assert stored(tmp_path) == set()


async def test_a_crawling_transfer_is_cut_off_and_retried(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    fast = add_blobs(registry, *[200_000] * 5)
    for blob in fast:  # 1 MB/s: five samples of the median
        registry.add_fault(Fault(digest=blob.digest, trickle=1_000_000))
    [slow] = add_blobs(registry, 1_000_000)
    registry.add_fault(Fault(digest=slow.digest, trickle=50_000))  # 5% of the median
    start = trio.current_time()
    await download([*fast, slow], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert 5 <= trio.current_time() - start <= 6
    assert len(blob_gets(registry, slow.digest)) == 2
    assert_exactly(tmp_path, registry, [*fast, slow])


async def test_time_spent_waiting_for_a_body_stream_does_not_make_a_transfer_slow(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    big = add_blobs(registry, *[8_000_000] * 5)
    medium = add_blobs(registry, *[2_000_000] * 10)
    registry.add_fault(Fault(trickle=1_000_000, times=None))  # every body at 1 MB/s
    # The medium blobs wait for one of the big blobs' streams, then run at the median rate.
    await download(
        [*big, *medium], base_url=BASE_URL, dest_dir=tmp_path, client=client, max_body_streams=5
    )
    assert len(blob_gets(registry)) == 15
    assert_exactly(tmp_path, registry, [*big, *medium])


# -- 6. retries, backoff, Retry-After; permanent errors at once -----------------------------


@pytest.mark.parametrize(
    ("fault", "gets", "min_seconds", "max_seconds"),
    [
        # backoff n^2 x 10 ms x 0.5-1.5: 10 ms then 40 ms
        (Fault(status=503, times=2), 3, 0.025, 0.075),
        (Fault(status=500, times=1), 2, 0.005, 0.015),
        (Fault(status=408, times=1), 2, 0.005, 0.015),
        (Fault(status=429, times=1, headers={"retry-after": "30"}), 2, 30, 30.01),
        (Fault(status=503, times=1, headers={"retry-after": "3600"}), 2, 60, 60.01),
        (Fault(status=429, times=1, body=b"<html>Too Many</html>"), 2, 0.005, 0.015),
        (Fault(truncate_at=500, times=1), 2, 0.005, 0.015),
        (Fault(corrupt=True, times=2), 3, 0.025, 0.075),
        (Fault(extra=b"more", times=1), 2, 0.005, 0.015),
    ],
)
async def test_retryable_failures_are_retried_with_backoff(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    fault: Fault,
    gets: int,
    min_seconds: float,
    max_seconds: float,
) -> None:
    [blob] = add_blobs(registry, 4000)
    registry.add_fault(fault)
    start = trio.current_time()
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert min_seconds <= trio.current_time() - start <= max_seconds
    assert len(blob_gets(registry)) == gets
    assert_exactly(tmp_path, registry, [blob])


async def test_retries_end_after_six_attempts(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    [blob] = add_blobs(registry, 10)
    registry.add_fault(Fault(status=502, times=None))
    with pytest.raises(RetriesExhaustedError, match="502") as caught:
        await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert caught.value.attempts == 6
    assert isinstance(caught.value.last_error, RegistryError)
    assert len(blob_gets(registry)) == 6


@pytest.mark.parametrize("status", [400, 403, 404, 405])
async def test_permanent_statuses_fail_at_once_with_the_registry_message(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, status: int
) -> None:
    [blob] = add_blobs(registry, 10)
    registry.add_fault(Fault(status=status, times=None))
    with pytest.raises(RegistryError) as caught:
        await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert caught.value.status == status
    assert caught.value.digest == blob.digest
    assert len(blob_gets(registry)) == 1


async def test_unknown_blob_reports_the_registry_error_code(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    missing = Blob.from_bytes(b"not there")
    with pytest.raises(RegistryError, match="404 Not Found: BLOB_UNKNOWN") as caught:
        await download([missing], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert caught.value.code == "BLOB_UNKNOWN"
    assert caught.value.url == f"{BASE_URL}/v2/library/_/blobs/{missing.digest}"
    assert missing.digest in str(caught.value)


async def test_html_error_pages_stay_out_of_messages(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = add_blobs(registry, 10)
    registry.add_fault(Fault(status=403, body=b"<html><body>Forbidden by CDN</body></html>"))
    with pytest.raises(RegistryError) as caught:
        await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert "<html>" not in str(caught.value)
    assert "403 Forbidden" in str(caught.value)


async def test_several_failures_come_out_as_one_transfer_error(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = add_blobs(registry, *[10] * 5)
    registry.add_fault(Fault(status=404, times=None))
    with pytest.raises(RegistryError) as caught:
        await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert caught.value.digest in {b.digest for b in blobs}


# -- 7. a body longer than the blob; local write errors -------------------------------------


async def test_a_body_that_is_always_too_long_fails_without_writing_more(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    [blob] = add_blobs(registry, 1000)
    registry.add_fault(Fault(extra=b"x" * 1_000_000, times=None))
    with pytest.raises(RetriesExhaustedError) as caught:
        await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert isinstance(caught.value.last_error, IntegrityError)
    assert stored(tmp_path) == set()


@pytest.fixture
def file_size_limit() -> Iterator[int]:
    """Writes beyond 64 KiB fail with EFBIG, like a full disk, for the duration of a test."""
    limit = 65536
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


async def test_a_write_error_is_reported_as_such_and_not_retried(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, file_size_limit: int
) -> None:
    [blob] = add_blobs(registry, 4 * file_size_limit)
    with pytest.raises(LocalFileError, match=os.strerror(errno.EFBIG)) as caught:
        await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert caught.value.digest == blob.digest
    assert isinstance(caught.value.__cause__, OSError)
    assert len(blob_gets(registry)) == 1
    assert stored(tmp_path) == set()


# -- 8. skipping present blobs; progress ----------------------------------------------------


async def test_present_blobs_are_skipped_without_a_request(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    present, wrong_size, missing = add_blobs(registry, 100, 200, 300)
    (tmp_path / present.file_name).write_bytes(registry.blobs["library/_"][present.digest])
    (tmp_path / wrong_size.file_name).write_bytes(b"short")
    calls: list[tuple[int, int]] = []
    result = await download(
        [present, wrong_size, missing],
        base_url=BASE_URL,
        dest_dir=tmp_path,
        client=client,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert result.skipped == (present.digest,)
    assert result.downloaded == (wrong_size.digest, missing.digest)
    assert present.digest not in " ".join(blob_gets(registry))
    assert calls[0] == (100, 600)
    assert calls[-1] == (600, 600)
    assert_exactly(tmp_path, registry, [present, wrong_size, missing])


async def test_a_directory_at_a_blobs_name_fails_before_any_request(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Not taken for the stored blob (even of the blob's size), nor found out after the GET."""
    [blob] = add_blobs(registry, os.stat(tmp_path).st_size)
    (tmp_path / blob.file_name).mkdir()
    with pytest.raises(LocalFileError, match="a directory has the blob's name"):
        await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert registry.requests == []


async def test_a_dangling_link_at_a_blobs_name_is_replaced(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = add_blobs(registry, 1000)
    (tmp_path / blob.file_name).symlink_to(tmp_path / "gone")
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert not (tmp_path / blob.file_name).is_symlink()
    assert (tmp_path / blob.file_name).read_bytes() == registry.blobs["library/_"][blob.digest]
    assert not (tmp_path / "gone").exists()


async def test_progress_rolls_back_a_failed_attempt_and_stays_in_bounds(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = add_blobs(registry, 300_000, 300_000)
    registry.add_fault(Fault(digest=blobs[0].digest, truncate_at=200_000))
    calls: list[tuple[int, int]] = []
    await download(
        blobs,
        base_url=BASE_URL,
        dest_dir=tmp_path,
        client=client,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert all(0 <= done <= total == 600_000 for done, total in calls)
    assert went_backwards(calls)
    assert calls[-1] == (600_000, 600_000)


async def test_everything_present_reports_total_at_once(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = add_blobs(registry, 100)
    (tmp_path / blob.file_name).write_bytes(registry.blobs["library/_"][blob.digest])
    calls: list[tuple[int, int]] = []
    await download(
        [blob],
        base_url=BASE_URL,
        dest_dir=tmp_path,
        client=client,
        progress=lambda *a: calls.append(a),
    )
    assert calls == [(100, 100)]
    assert registry.requests == []


async def test_an_empty_list_returns_at_once(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    calls: list[tuple[int, int]] = []
    result = await download(
        [],
        base_url=BASE_URL,
        dest_dir=tmp_path / "never",
        client=client,
        progress=lambda *a: calls.append(a),
    )
    assert result == trio_blobs.DownloadResult((), ())
    assert registry.requests == []
    assert not (tmp_path / "never").exists()


# -- bad input: clear errors before any I/O -------------------------------------------------


BAD_ARGUMENTS = [
    ({"base_url": "registry.test"}, ValueError, "base_url"),
    ({"base_url": BASE_URL + "/v2/"}, ValueError, "without /v2"),
    ({"repository": "../etc"}, ValueError, "repository"),
    ({"concurrency": 0}, ValueError, "concurrency"),
    ({"stall_timeout": 0}, ValueError, "stall_timeout"),
    ({"blobs": ["sha256:" + "0" * 64]}, TypeError, "Blob"),
    (
        {"blobs": [Blob("sha256:" + "0" * 64, 1), Blob("sha256:" + "0" * 64, 2)]},
        ValueError,
        "two sizes",
    ),
    ({"base_url": "http://user:pw@registry.test"}, ValueError, "no user:password@"),
    ({"mirrors": ["http://m.test/?x=1"]}, ValueError, "mirror takes no"),
    ({"rate_limit": float("nan")}, ValueError, "rate_limit must be a finite number"),
    ({"rate_limit": float("inf")}, ValueError, "rate_limit must be a finite number"),
    ({"retry": "x"}, TypeError, "retry must be a RetryPolicy"),
    ({"progress": 5}, TypeError, "progress must be callable"),
    ({"blob_progress": "no"}, TypeError, "blob_progress must be callable"),
    ({"get_token": "tok"}, TypeError, "get_token must be an async callable"),
    (
        {"token": "a\r\nX-Evil: 1"},
        ValueError,
        "token must be a str with no line breaks or NUL$",
    ),
    ({"user_agent": "ua\n"}, ValueError, "user_agent must be a str with no line breaks"),
    ({"dest_dir": None}, TypeError, "dest_dir must be a path"),
    ({"dest_dir": b"d"}, TypeError, "dest_dir must be a path"),
    ({"dest_dir": ""}, ValueError, "dest_dir is empty"),
    ({"stall_timeout": True}, ValueError, "stall_timeout"),
    ({"fsync": "no"}, TypeError, "fsync must be True or False"),
    ({"mirror_credentials": 1}, TypeError, "mirror_credentials must be True or False"),
    ({"logger": "trio_blobs"}, TypeError, "logger must be a logging.Logger"),
    ({"client": "nope"}, TypeError, "client must be an httpx.AsyncClient"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGUMENTS)
@pytest.mark.parametrize("count", [1, 0])
async def test_bad_arguments_fail_before_any_request(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    kwargs: dict[str, object],
    error: type[Exception],
    match: str,
    count: int,
) -> None:
    args: dict[str, object] = {
        "blobs": add_blobs(registry, 10)[:count],
        "base_url": BASE_URL,
        "dest_dir": tmp_path / "d",
        "client": client,
    } | kwargs
    with pytest.raises(error, match=match):
        await download(**args)  # type: ignore[arg-type]
    assert registry.requests == []
    assert not (tmp_path / "d").exists()


async def test_a_dest_dir_that_links_to_nothing_says_so(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    (tmp_path / "store").symlink_to(tmp_path / "gone")
    with pytest.raises(LocalFileError, match="dest_dir is a symbolic link to nothing"):
        await download(
            add_blobs(registry, 10), base_url=BASE_URL, dest_dir=tmp_path / "store", client=client
        )
    assert registry.requests == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"retry": "x"}, TypeError, "retry must be a RetryPolicy"),
        ({"stall_timeout": float("nan")}, ValueError, "stall_timeout"),
        ({"platform": "linux/arm64"}, TypeError, r"Platform.parse\('linux/arm64'\)"),
    ],
)
async def test_fetch_manifest_checks_its_options_before_any_request(
    registry: Registry,
    client: httpx.AsyncClient,
    kwargs: dict[str, object],
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match):
        await trio_blobs.fetch_manifest(
            base_url=BASE_URL,
            repository="library/_",
            reference="v1",
            client=client,
            **kwargs,  # type: ignore[arg-type]
        )
    assert registry.requests == []


async def test_a_closed_client_is_a_clear_error_before_any_request(
    registry: Registry, tmp_path: Path
) -> None:
    client = httpx.AsyncClient(transport=registry.transport())
    await client.aclose()
    blobs = add_blobs(registry, 10, 20)
    with pytest.raises(ValueError, match="client is closed"):
        await download(blobs, base_url=BASE_URL, dest_dir=tmp_path / "d", client=client)
    with pytest.raises(ValueError, match="client is closed"):
        await trio_blobs.fetch_manifest(
            base_url=BASE_URL, repository="library/_", reference="v1", client=client
        )
    assert registry.requests == []
    assert not (tmp_path / "d").exists()


class Broken(httpx.AsyncBaseTransport):
    """A transport that fails every request with an error that is not httpx's."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise RuntimeError("the transport is broken")


async def test_the_same_unexpected_error_from_every_blob_is_raised_once(
    registry: Registry, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(transport=Broken()) as client:
        with pytest.raises(RuntimeError, match="the transport is broken"):
            await download(
                add_blobs(registry, 10, 20, 30), base_url=BASE_URL, dest_dir=tmp_path, client=client
            )


async def test_a_rejected_token_is_named_as_such(tmp_path: Path) -> None:
    registry = Registry(token="s3cret")
    blobs = add_blobs(registry, 10)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        with pytest.raises(trio_blobs.AuthenticationError, match="refused the token given"):
            await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, token="no")
    assert stored(tmp_path) == set()


def test_a_malformed_digest_never_becomes_a_blob() -> None:
    with pytest.raises(ValueError, match="digest"):
        Blob("sha256:../../etc/passwd", 1)


# -- 9. cancellation ------------------------------------------------------------------------


async def test_cancelling_the_caller_returns_promptly_and_cleans_up(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    blobs = add_blobs(registry, *[100_000] * 8)
    registry.add_fault(Fault(stall_after=20_000, times=None))
    with trio.move_on_after(5) as scope:
        await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, stall_timeout=60)
    assert scope.cancelled_caught
    assert stored(tmp_path) == set()


# -- over real sockets ----------------------------------------------------------------------


async def test_download_over_loopback(registry: Registry, tmp_path: Path) -> None:
    blobs = add_blobs(registry, 0, 1, 100_000, 3_000_000)
    registry.add_fault(Fault(truncate_at=1000, times=1))
    async with registry.serving() as base_url:
        result = await download(blobs, base_url=base_url, dest_dir=tmp_path)
    assert set(result.downloaded) == {b.digest for b in blobs}
    assert_exactly(tmp_path, registry, blobs)


async def test_own_client_asks_for_no_content_coding(registry: Registry, tmp_path: Path) -> None:
    [blob] = add_blobs(registry, 1000)
    async with registry.serving() as base_url:
        await download([blob], base_url=base_url, dest_dir=tmp_path)
    [get] = [r for r in registry.requests if r.method == "GET"]
    assert get.headers["accept-encoding"] == "identity"
    assert get.headers["user-agent"].startswith("trio-blobs/")


async def test_cancel_over_loopback_returns_within_a_second(
    registry: Registry, tmp_path: Path
) -> None:
    blobs = add_blobs(registry, *[500_000] * 4)
    registry.add_fault(Fault(stall_after=1000, times=None))
    async with registry.serving() as base_url:
        with trio.move_on_after(0.5):
            start = trio.current_time()
            await download(blobs, base_url=base_url, dest_dir=tmp_path)
        assert trio.current_time() - start < 1.0
    assert stored(tmp_path) == set()


async def test_stall_over_loopback_with_a_small_real_timeout(
    registry: Registry, tmp_path: Path
) -> None:
    [blob] = add_blobs(registry, 300_000)
    registry.add_fault(Fault(stall_after=100_000, times=1))
    async with registry.serving() as base_url:
        await download([blob], base_url=base_url, dest_dir=tmp_path, stall_timeout=0.3)
    assert len(blob_gets(registry)) >= 2  # the stalled one, then (on a busy machine, maybe
    # after another cut-off that a short real timeout allows) one that finished
    assert_exactly(tmp_path, registry, [blob])


# -- what leaks out: exceptions, cancellation -----------------------------------------------


async def test_cancellation_comes_out_as_a_bare_cancelled(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = add_blobs(registry, *[100_000] * 3)
    registry.add_fault(Fault(stall_after=10, times=None))
    seen: BaseException | None = None
    with trio.move_on_after(0.2):
        try:
            await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client)
        except BaseException as exc:
            seen = exc
            raise
    assert type(seen) is trio.Cancelled


@pytest.mark.parametrize("kind", [ValueError, KeyboardInterrupt])
async def test_a_raising_progress_callback_comes_out_unwrapped(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, kind: type[BaseException]
) -> None:
    blobs = add_blobs(registry, *[300_000] * 4)
    calls = 0

    def progress(done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise kind("from the callback")

    with pytest.raises(kind, match="from the callback"):
        await download(
            blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, progress=progress
        )
    assert calls == 5
    assert {p.name for p in tmp_path.iterdir() if p.name.startswith(".")} == set()


async def test_the_first_failure_cancels_the_other_blobs(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    stalled, missing = add_blobs(registry, 1000, 1000)
    registry.add_fault(Fault(digest=stalled.digest, stall_after=10, times=None))
    registry.add_fault(Fault(digest=missing.digest, status=404, delay=1.0))
    start = trio.current_time()
    with pytest.raises(RegistryError) as caught:
        await download([stalled, missing], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert caught.value.digest == missing.digest
    assert trio.current_time() - start == pytest.approx(1.0)


# -- Authorization: nothing from the caller's client leaks to storage either ---------------


@pytest.mark.parametrize(
    "client_options",
    [{"headers": {"Authorization": "Bearer from-client"}}, {"auth": httpx.BasicAuth("u", "p")}],
)
async def test_credentials_on_the_callers_client_never_reach_storage(
    tmp_path: Path, client_options: dict[str, object]
) -> None:
    registry = Registry(redirect_blobs_to="http://storage.test")
    blobs = add_blobs(registry, 100)
    async with httpx.AsyncClient(transport=registry.transport(), **client_options) as client:  # type: ignore[arg-type]
        await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client)
    [storage] = [r for r in registry.requests if r.url.startswith("http://storage.test/")]
    assert "authorization" not in storage.headers


async def test_identifies_itself_and_asks_for_unencoded_bytes(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = add_blobs(registry, 10)
    await download(
        blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, user_agent="model-store/2"
    )
    [request] = registry.requests
    assert request.headers["user-agent"] == "model-store/2"
    assert request.headers["accept-encoding"] == "identity"


# -- more redirect and token cases ----------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_every_redirect_status_is_followed(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, status: int
) -> None:
    [blob] = add_blobs(registry, 100)
    target = f"http://storage.test/_storage/{blob.digest}"
    registry.add_fault(Fault(status=status, headers={"location": target}))
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert [r.url for r in registry.requests][-1] == target
    assert_exactly(tmp_path, registry, [blob])


async def test_a_redirect_error_names_the_blob(tmp_path: Path) -> None:
    registry = Registry(redirect_blobs_to="http://storage.test")
    [blob] = add_blobs(registry, 100)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        with pytest.raises(ProtocolError) as caught:
            await download([blob], base_url="https://r.test", dest_dir=tmp_path, client=client)
    assert caught.value.digest == blob.digest


async def test_an_expired_storage_url_sends_the_download_back_to_the_registry(
    tmp_path: Path,
) -> None:
    registry = Registry(token="t", redirect_blobs_to="http://storage.test")
    [blob] = add_blobs(registry, 100)
    registry.add_fault(Fault(path="/_storage/", status=403, times=1))
    called = False

    async def get_token(challenge: AuthChallenge) -> str:
        nonlocal called
        called = True
        return "t"

    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await download(
            [blob],
            base_url=BASE_URL,
            dest_dir=tmp_path,
            client=client,
            token="t",
            get_token=get_token,
        )
    # registry, storage (403), registry, storage
    assert [r.url.split("/")[2] for r in registry.requests] == [
        "registry.test",
        "storage.test",
        "registry.test",
        "storage.test",
    ]
    assert not called
    assert_exactly(tmp_path, registry, [blob])


async def test_token_is_used_from_the_start_when_get_token_is_given_too(tmp_path: Path) -> None:
    registry = Registry(token="t")
    blobs = add_blobs(registry, 10)

    async def get_token(challenge: AuthChallenge) -> str:
        raise AssertionError("not needed")

    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await download(
            blobs,
            base_url=BASE_URL,
            dest_dir=tmp_path,
            client=client,
            token="t",
            get_token=get_token,
        )
    assert len(registry.requests) == 1


@pytest.mark.parametrize(
    ("challenge", "expected_scheme", "expected_scope", "header"),
    [
        # a challenge without scope, as /v2/ sends: the scope is built from the repository
        (
            'Bearer realm="http://registry.test/token",service="s"',
            "bearer",
            "repository:library/_:pull",
            "Bearer tok",
        ),
        ('Basic realm="registry"', "basic", "repository:library/_:pull", "Basic tok"),
    ],
)
async def test_challenges_are_answered_in_their_own_scheme(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    challenge: str,
    expected_scheme: str,
    expected_scope: str,
    header: str,
) -> None:
    blobs = add_blobs(registry, 10)
    registry.add_fault(Fault(status=401, headers={"www-authenticate": challenge}))
    seen: list[AuthChallenge] = []

    async def get_token(challenge: AuthChallenge) -> str:
        seen.append(challenge)
        return "tok"

    await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, get_token=get_token)
    assert [(c.scheme, c.scope) for c in seen] == [(expected_scheme, expected_scope)]
    assert registry.requests[-1].headers["authorization"] == header


async def test_a_failing_get_token_is_an_authentication_error(tmp_path: Path) -> None:
    registry = Registry(token="t")
    blobs = add_blobs(registry, 10)

    async def get_token(challenge: AuthChallenge) -> str:
        raise OSError("token server unreachable")

    async with httpx.AsyncClient(transport=registry.transport()) as client:
        with pytest.raises(AuthenticationError, match="token server unreachable") as caught:
            await download(
                blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, get_token=get_token
            )
    assert isinstance(caught.value.__cause__, OSError)


async def test_time_spent_fetching_a_token_is_not_a_stall(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    registry = Registry(token="t")
    blobs = add_blobs(registry, 10)

    async def get_token(challenge: AuthChallenge) -> str:
        await trio.sleep(2.5)
        return "t"

    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await download(
            blobs,
            base_url=BASE_URL,
            dest_dir=tmp_path,
            client=client,
            get_token=get_token,
            stall_timeout=2,
        )
    assert len(registry.requests) == 2


# -- more on the monitor --------------------------------------------------------------------


async def test_response_headers_count_as_activity(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    [blob] = add_blobs(registry, 1000)
    registry.add_fault(Fault(delay=8, stall_after=0))
    start = trio.current_time()
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, stall_timeout=10)
    assert 18 <= trio.current_time() - start <= 19  # headers at 8 s, then 10 s without bytes
    assert len(blob_gets(registry)) == 2


async def test_a_stall_error_names_the_url(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    [blob] = add_blobs(registry, 1000)
    registry.add_fault(Fault(stall_after=10, times=None))
    with pytest.raises(RetriesExhaustedError) as caught:
        await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, stall_timeout=1)
    assert caught.value.url == f"{BASE_URL}/v2/library/_/blobs/{blob.digest}"


_KILLED_MID_BLOB = """
import os, sys, httpx, trio, trio_blobs
from trio_blobs.testing import Fault, Registry

registry = Registry()
blob = registry.add_blob(os.urandom(100_000))
registry.add_fault(Fault(stall_after=50_000, times=None))

def progress(done, total):
    if done:
        print(sorted(os.listdir(sys.argv[1])), flush=True)

async def main():
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await trio_blobs.download(
            [blob], base_url="http://r.test", dest_dir=sys.argv[1], client=client, progress=progress
        )

trio.run(main)
"""


def has_unnamed_files(directory: Path) -> bool:
    """Whether files can be created in ``directory`` with no name (O_TMPFILE)."""
    fd = trio_blobs._download._unnamed_file(directory)
    if fd is None:
        return False
    os.close(fd)
    return True


def test_a_growing_blob_has_no_name_and_a_killed_download_leaves_nothing(tmp_path: Path) -> None:
    if not has_unnamed_files(tmp_path):
        pytest.skip("no O_TMPFILE files here")
    with subprocess.Popen(
        [sys.executable, "-c", _KILLED_MID_BLOB, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            seen_while_growing = child.stdout.readline()
        finally:
            child.kill()
    assert seen_while_growing == "[]\n"  # half a blob received, and no file to show for it
    assert stored(tmp_path) == set()


async def test_an_unnamed_file_that_cannot_be_linked_is_copied_into_place(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not has_unnamed_files(tmp_path):
        pytest.skip("no O_TMPFILE files here")
    real_link = os.link

    def link_without_proc(src: str, dst: str, **kwargs: Any) -> None:
        if src.startswith("/proc/self/fd/"):  # as on a FUSE filesystem without hard links
            raise OSError(errno.EPERM, "Operation not permitted")
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", link_without_proc)
    blobs = add_blobs(registry, 0, 1000, 300_000)
    await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, fsync=True)
    assert_exactly(tmp_path, registry, blobs)


async def test_a_directory_under_the_final_name_fails_clearly_and_leaves_nothing(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = add_blobs(registry, 1000)
    (tmp_path / blob.file_name).mkdir()
    with pytest.raises(LocalFileError, match=blob.file_name):
        await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert stored(tmp_path) == {blob.file_name}  # the directory, and no hidden copy beside it
    assert (tmp_path / blob.file_name).is_dir()


@pytest.fixture
def without_unnamed_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem with no O_TMPFILE, as NFS."""
    real_open = os.open

    def open_without_tmpfile(path: str, flags: int, *args: int, **kwargs: int) -> int:
        if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_without_tmpfile)


@pytest.mark.usefixtures("without_unnamed_files")
async def test_without_unnamed_files_a_growing_blob_is_a_hidden_file(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob, other] = add_blobs(registry, 100_000, 1000)
    registry.add_fault(Fault(digest=blob.digest, stall_after=50_000, times=None))
    names: set[str] = set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
        )
        await trio.sleep(0.1)
        names = stored(tmp_path)
        nursery.cancel_scope.cancel()
    [name] = names
    assert name.startswith(f".{blob.file_name}.")
    assert name.endswith(".partial")
    assert stored(tmp_path) == set()  # removed when cancelled
    await download([other], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert_exactly(tmp_path, registry, [other])


@pytest.mark.parametrize("unnamed_files", [True, False])
async def test_blobs_get_the_mode_of_new_files_whichever_way_they_were_written(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    unnamed_files: bool,
) -> None:
    if not unnamed_files:
        request.getfixturevalue("without_unnamed_files")
    blobs = add_blobs(registry, 1000, 5000)
    umask = os.umask(0o027)
    try:  # the second is big enough to be resumable, so it grows under a name of its own
        await download(
            blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, resume_threshold=5000
        )
    finally:
        os.umask(umask)
    assert {(tmp_path / blob.file_name).stat().st_mode & 0o777 for blob in blobs} == {0o640}


# -- bodies that do not match their headers -------------------------------------------------


class Reframed(httpx.AsyncBaseTransport):
    """Passes responses on with their Content-Length removed (as with chunked encoding) and
    any header overrides; bodies are otherwise untouched."""

    def __init__(self, inner: httpx.AsyncBaseTransport, **headers: str) -> None:
        self.inner = inner
        self.headers = headers

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        headers = httpx.Headers(response.headers)
        del headers["content-length"]
        headers.update(self.headers)
        return httpx.Response(response.status_code, headers=headers, stream=response.stream)


async def test_a_longer_body_without_length_is_never_written_past_the_size(
    registry: Registry, tmp_path: Path, file_size_limit: int, autojump_clock: trio.testing.MockClock
) -> None:
    [blob] = add_blobs(registry, file_size_limit)
    registry.add_fault(Fault(extra=b"x" * 100_000, times=None))
    async with httpx.AsyncClient(transport=Reframed(registry.transport())) as client:
        with pytest.raises(RetriesExhaustedError) as caught:
            await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    # a write past the size would have hit the file size limit as a LocalFileError
    assert isinstance(caught.value.last_error, IntegrityError)
    assert "longer than" in str(caught.value)


async def test_a_short_body_without_length_is_reported_as_such(
    registry: Registry, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    [blob] = add_blobs(registry, 1000)
    short = Blob(blob.digest, 2000)
    async with httpx.AsyncClient(transport=Reframed(registry.transport())) as client:
        with pytest.raises(RetriesExhaustedError, match="ended after 1000 of 2000 bytes"):
            await download([short], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert stored(tmp_path) == set()


@pytest.mark.parametrize(
    ("header", "value", "message"),
    [
        ("content-length", "999", "announced 999 bytes for a blob of 1000 bytes"),
        ("docker-content-digest", "sha256:" + "0" * 64, "announced digest"),
    ],
)
async def test_headers_that_contradict_the_blob_are_refused_before_reading(
    registry: Registry,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    header: str,
    value: str,
    message: str,
) -> None:
    [blob] = add_blobs(registry, 1000)
    async with httpx.AsyncClient(
        transport=Reframed(registry.transport(), **{header: value})
    ) as client:
        with pytest.raises(RetriesExhaustedError, match=message):
            await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)


async def test_a_blob_listed_twice_is_fetched_once(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = add_blobs(registry, 100)
    result = await download([blob, blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert result.downloaded == (blob.digest,)
    assert len(registry.requests) == 1


async def test_a_dest_dir_that_is_a_file_is_a_clear_error(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = add_blobs(registry, 10)
    (tmp_path / "file").write_bytes(b"keep me")
    with pytest.raises(LocalFileError, match="not a directory"):
        await download(blobs, base_url=BASE_URL, dest_dir=tmp_path / "file", client=client)
    assert (tmp_path / "file").read_bytes() == b"keep me"
    assert registry.requests == []


async def test_blob_progress_follows_each_blob(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    present, flaky, plain, empty = add_blobs(registry, 100, 300_000, 200, 0)
    (tmp_path / present.file_name).write_bytes(registry.blobs["library/_"][present.digest])
    registry.add_fault(Fault(digest=flaky.digest, truncate_at=200_000))
    seen: dict[str, list[int]] = {}
    await download(
        [present, flaky, plain, empty],
        base_url=BASE_URL,
        dest_dir=tmp_path,
        client=client,
        blob_progress=lambda blob, done: seen.setdefault(blob.digest, []).append(done),
    )
    assert seen[present.digest] == [100]
    assert seen[plain.digest][-1] == 200
    assert seen[empty.digest] == [0]  # done, though no byte moved
    flaky_calls = seen[flaky.digest]
    assert 0 in flaky_calls  # the failed attempt went back to nothing
    assert flaky_calls[-1] == 300_000
    assert all(0 <= done <= 300_000 for done in flaky_calls)


async def test_too_little_free_space_is_a_clear_error_before_any_request(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    present = add_blobs(registry, 100)[0]
    (tmp_path / present.file_name).write_bytes(registry.blobs["library/_"][present.digest])
    huge = Blob("sha256:" + "0" * 64, 2**62)  # more than any disk here
    with pytest.raises(LocalFileError, match=f"{tmp_path} has .* bytes free; .* need 4,611"):
        await download([present, huge], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert registry.requests == []
    assert stored(tmp_path) == {present.file_name}  # nothing already stored is touched


async def test_a_connection_error_says_why(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        try:
            raise OSError("the reason underneath")
        except OSError as exc:
            raise httpx.ConnectError("") from exc

    blob = Blob.from_bytes(b"x")
    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(RetriesExhaustedError, match="ConnectError: the reason underneath"):
            await download(
                [blob],
                base_url=BASE_URL,
                dest_dir=tmp_path,
                client=client,
                retry=trio_blobs.RetryPolicy(max_attempts=1),
            )


async def test_an_empty_blob_needs_no_request(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [empty] = add_blobs(registry, 0)
    result = await download([empty], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert result.downloaded == (empty.digest,)
    assert (tmp_path / empty.file_name).read_bytes() == b""
    assert registry.requests == []


async def test_a_blob_finished_meanwhile_by_another_download_is_not_rewritten(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    [blob] = add_blobs(registry, 1000)
    registry.add_fault(Fault(delay=2))

    inodes: list[int] = []

    async def other_download_finishes() -> None:
        await trio.sleep(1)
        other = tmp_path / blob.file_name
        other.write_bytes(registry.blobs["library/_"][blob.digest])
        inodes.append(other.stat().st_ino)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_download_finishes)
        await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert [(tmp_path / blob.file_name).stat().st_ino] == inodes  # the other copy, untouched
    assert stored(tmp_path) == {blob.file_name}
    assert (tmp_path / blob.file_name).read_bytes() == registry.blobs["library/_"][blob.digest]


async def test_a_wrong_sized_leftover_under_the_final_name_is_replaced(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    [blob] = add_blobs(registry, 1000)
    registry.add_fault(Fault(delay=2))

    async def leftover_appears() -> None:
        await trio.sleep(1)
        (tmp_path / blob.file_name).write_bytes(b"short")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leftover_appears)
        await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert_exactly(tmp_path, registry, [blob])


@pytest.mark.parametrize(("fsync", "calls"), [(False, 0), (True, 4)])
async def test_fsync_flushes_each_blob_and_its_directory(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fsync: bool,
    calls: int,
) -> None:
    synced: list[threading.Thread] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(threading.current_thread())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    blobs = add_blobs(registry, 10, 20)
    await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, fsync=fsync)
    assert len(synced) == calls  # a file and its directory, per blob
    assert threading.current_thread() not in synced  # never holding up the event loop
    assert_exactly(tmp_path, registry, blobs)


# -- big bodies: hashed and written on worker threads ---------------------------------------


class Appends:
    """What hashing and writing pieces looked like: the threads that did it, the most at once,
    the bytes appended, and appends to a closed file (there must be none). ``hook`` runs in the
    writing thread before each append."""

    def __init__(self) -> None:
        self.threads: set[str] = set()
        self.active = self.peak = self.appended = self.on_closed_file = 0
        self.hook: Callable[[], object] = lambda: None
        self.lock = threading.Lock()

    @property
    def workers(self) -> set[str]:
        return self.threads - {threading.main_thread().name}


@pytest.fixture
def appends(monkeypatch: pytest.MonkeyPatch) -> Appends:
    """Every body is big enough for a worker thread, and at most two run at once."""
    monkeypatch.setattr(trio_blobs._download, "THREADED_SIZE", 1)
    monkeypatch.setattr(trio_blobs._download, "WORKER_THREADS", 2)
    seen = Appends()
    real_append = trio_blobs._download._PartialFile.append

    def recording_append(self: trio_blobs._download._PartialFile, piece: bytes) -> None:
        with seen.lock:
            seen.threads.add(threading.current_thread().name)
            seen.active += 1
            seen.peak = max(seen.peak, seen.active)
        try:
            seen.hook()
            seen.on_closed_file += self._file.closed
            real_append(self, piece)
            seen.appended += len(piece)
        finally:
            with seen.lock:
                seen.active -= 1

    monkeypatch.setattr(trio_blobs._download._PartialFile, "append", recording_append)
    return seen


async def test_big_bodies_are_verified_on_worker_threads(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, appends: Appends
) -> None:
    blobs = add_blobs(registry, *[300_000] * 6)
    registry.add_fault(Fault(corrupt=True, times=2))
    registry.add_fault(Fault(truncate_at=100_000, times=2))
    await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert_exactly(tmp_path, registry, blobs)
    assert appends.workers
    assert len(blob_gets(registry)) == 10  # 4 failed attempts retried


async def test_under_a_mock_clock_big_bodies_stay_on_the_event_loop(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    appends: Appends,
    autojump_clock: trio.testing.MockClock,
) -> None:
    blobs = add_blobs(registry, *[300_000] * 3)
    await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert_exactly(tmp_path, registry, blobs)
    assert appends.threads == {threading.main_thread().name}


async def test_a_too_long_body_on_a_worker_thread_is_refused(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, appends: Appends
) -> None:
    [blob] = add_blobs(registry, 300_000)
    registry.add_fault(Fault(extra=b"x" * 1_000_000, times=None))
    seen: list[int] = []
    with pytest.raises(RetriesExhaustedError) as caught:
        await download(
            [blob],
            base_url=BASE_URL,
            dest_dir=tmp_path,
            client=client,
            blob_progress=lambda _, done: seen.append(done),
        )
    assert isinstance(caught.value.last_error, IntegrityError)
    assert stored(tmp_path) == set()
    assert all(done <= blob.size for done in seen)  # refused before it was counted


async def test_a_write_error_on_a_worker_thread_is_reported_and_not_retried(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    file_size_limit: int,
    appends: Appends,
) -> None:
    [blob] = add_blobs(registry, 8_000_000)
    seen: list[int] = []
    with pytest.raises(LocalFileError, match=os.strerror(errno.EFBIG)):
        await download(
            [blob],
            base_url=BASE_URL,
            dest_dir=tmp_path,
            client=client,
            blob_progress=lambda _, done: seen.append(done),
        )
    assert len(blob_gets(registry)) == 1
    assert max(seen) <= 3 * 2**20  # the body was not read on: the 1 MiB pieces in the queue
    assert stored(tmp_path) == set()
    assert appends.workers


async def test_cancelling_with_worker_threads_returns_promptly_and_cleans_up(
    registry: Registry, tmp_path: Path, appends: Appends
) -> None:
    blobs = add_blobs(registry, *[500_000] * 4)
    registry.add_fault(Fault(stall_after=200_000, times=None))
    async with registry.serving() as base_url:
        with trio.move_on_after(0.5):
            start = trio.current_time()
            await download(blobs, base_url=base_url, dest_dir=tmp_path)
        assert trio.current_time() - start < 1.0
    assert stored(tmp_path) == set()
    assert appends.workers


async def test_a_stalled_body_on_a_worker_thread_resumes_where_it_stopped(
    registry: Registry, tmp_path: Path, appends: Appends
) -> None:
    [blob] = add_blobs(registry, 3_000_000)
    registry.add_fault(Fault(stall_after=1_000_000, times=1))
    async with registry.serving() as base_url:
        await download(
            [blob], base_url=base_url, dest_dir=tmp_path, stall_timeout=0.3, resume_threshold=1
        )
    assert_exactly(tmp_path, registry, [blob])
    ranges = [r.headers.get("range") for r in registry.requests if r.method == "GET"]
    assert ranges[0] is None
    assert ranges[-1] == "bytes=1000000-"  # the rest, after what the stalled attempt kept


async def test_a_slow_disk_on_a_worker_thread_is_not_taken_for_a_stalled_peer(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, appends: Appends
) -> None:
    [blob] = add_blobs(registry, 5 * 2**20)  # five pieces
    appends.hook = lambda: time.sleep(0.15)
    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, stall_timeout=0.1)
    assert_exactly(tmp_path, registry, [blob])
    assert len(blob_gets(registry)) == 1
    assert appends.workers


async def test_a_write_error_on_a_worker_thread_outranks_the_body_failing_meanwhile(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    file_size_limit: int,
    appends: Appends,
) -> None:
    [blob] = add_blobs(registry, 300_000)
    registry.add_fault(Fault(truncate_at=200_000))
    with pytest.raises(LocalFileError, match=os.strerror(errno.EFBIG)):
        await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert len(blob_gets(registry)) == 1
    assert appends.workers


async def test_without_threads_to_be_had_big_bodies_are_written_on_the_event_loop(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    appends: Appends,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_thread(*args: object, **kwargs: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(trio.lowlevel, "start_thread_soon", no_thread)
    blobs = add_blobs(registry, *[300_000] * 3)
    registry.add_fault(Fault(truncate_at=100_000))  # the same task tries again
    await download(blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client)
    assert_exactly(tmp_path, registry, blobs)
    assert appends.threads == {threading.main_thread().name}


async def test_worker_threads_are_shared_by_all_downloads_in_a_run(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, appends: Appends
) -> None:
    blobs = add_blobs(registry, *[300_000] * 8)
    appends.hook = lambda: time.sleep(0.02)
    async with trio.open_nursery() as nursery:
        for half in (blobs[:4], blobs[4:]):
            nursery.start_soon(
                functools.partial(
                    download, half, base_url=BASE_URL, dest_dir=tmp_path, client=client
                )
            )
    assert_exactly(tmp_path, registry, blobs)
    assert appends.peak == 2  # WORKER_THREADS, for both calls together


async def test_cancelled_mid_write_the_thread_finishes_before_the_file_is_kept(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, appends: Appends
) -> None:
    [blob] = add_blobs(registry, 3 * 2**20)
    registry.add_fault(Fault(stall_after=2 * 2**20))
    gate = threading.Event()
    appends.hook = lambda: gate.wait(5) if appends.appended else None  # the second piece waits

    async def open_gate_later() -> None:
        await trio.sleep(0.3)
        gate.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_gate_later)
        with trio.move_on_after(0.1):
            await download(
                [blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, resume_threshold=1
            )
    assert gate.is_set()  # the cancelled call waited for the thread
    assert appends.on_closed_file == 0
    partial = tmp_path / f".{blob.file_name}.partial"
    assert partial.stat().st_size == appends.appended == 2 * 2**20  # both pieces it had

    await download([blob], base_url=BASE_URL, dest_dir=tmp_path, client=client, resume_threshold=1)
    assert_exactly(tmp_path, registry, [blob])
    assert registry.requests[-1].headers["range"] == f"bytes={2 * 2**20}-"
