"""The stall and slow-transfer watchdog, on virtual time."""

import logging
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from trio_blobs import Blob, RetryPolicy
from trio_blobs._monitor import Monitor, RateHistory, Watch
from trio_blobs._transfer import Progress, Transfer


def test_rate_history_ignores_small_transfers_and_needs_five_samples() -> None:
    history = RateHistory()
    for _ in range(10):
        history.add(99_999, 0.001)
    assert history.median() is None
    for rate in (1, 2, 3, 4):
        history.add(1_000_000, 1_000_000 / (rate * 1e6))
    assert history.median() is None
    history.add(1_000_000, 1 / 100)
    assert history.median() == 3e6


def test_rate_history_keeps_the_last_thirty() -> None:
    history = RateHistory()
    for _ in range(30):
        history.add(1_000_000, 1.0)  # 1 MB/s
    for _ in range(15):
        history.add(1_000_000, 0.1)  # 10 MB/s
    # 15 of each in the window; a 31st sample would tip the median to 1 MB/s
    assert history.median() == 5.5e6


def _monitor(samples: int = 5) -> Monitor:
    """A monitor whose median rate is 10 MB/s (with enough samples for a verdict at 5)."""
    history = RateHistory()
    for _ in range(samples):
        history.add(10_000_000, 1.0)
    return Monitor(stall_timeout=10, history=history)


async def _watched(monitor: Monitor, feed: list[tuple[float, int]]) -> str | None:
    """Run an attempt that receives ``feed`` (delay, nbytes) and then idles; its verdict."""
    with monitor.watch() as watch:
        for delay, nbytes in feed:
            await trio.sleep(delay)
            watch.progress(nbytes)
        await trio.sleep(1000)
    return watch.verdict


async def test_stall_trips_after_stall_timeout_without_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    monitor = Monitor(stall_timeout=10, history=RateHistory())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor.run)
        start = trio.current_time()
        assert await _watched(monitor, [(9, 100), (9, 100)]) == "stall"
        assert 28 <= trio.current_time() - start <= 28.5
        nursery.cancel_scope.cancel()


async def test_slow_attempt_trips_after_grace_when_below_a_tenth_of_median(
    autojump_clock: trio.testing.MockClock,
) -> None:
    monitor = _monitor()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor.run)
        start = trio.current_time()
        # 0.5 MB/s: steady bytes, never stalled, but 5% of the median
        assert await _watched(monitor, [(0.1, 50_000)] * 200) == "slow"
        assert 5 <= trio.current_time() - start <= 5.5
        # 2 MB/s is 20% of the median: left alone until it stops
        assert await _watched(monitor, [(0.1, 200_000)] * 100) == "stall"
        nursery.cancel_scope.cancel()


async def test_no_slow_verdict_without_enough_history(
    autojump_clock: trio.testing.MockClock,
) -> None:
    monitor = _monitor(samples=4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor.run)
        assert await _watched(monitor, [(1, 1)] * 20) == "stall"
        nursery.cancel_scope.cancel()


async def test_paused_time_does_not_count_in_an_attempts_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    monitor = _monitor()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor.run)
        with monitor.watch() as watch:
            with watch.paused():  # waiting 30 s for a token, say: not the peer's doing
                await trio.sleep(30)
            for _ in range(100):  # then 2 MB/s, 20% of the median, for 10 s
                await trio.sleep(0.1)
                watch.progress(200_000)
            now = trio.current_time()
        assert watch.verdict is None
        assert watch.active_seconds(now) == pytest.approx(10)
        assert watch.rate(now) == pytest.approx(2e6)
        nursery.cancel_scope.cancel()


async def test_a_finished_attempts_rate_in_the_history_leaves_its_pauses_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    session = SimpleNamespace(logger=logging.getLogger("test"))
    transfer = Transfer(
        session=session,  # type: ignore[arg-type]
        concurrency=1,
        stall_timeout=10,
        retry=RetryPolicy(),
        progress=Progress(None, total=0),
    )

    async def attempt(watch: Watch) -> None:
        with watch.paused():  # 9 s waiting for a body stream, say
            await trio.sleep(9)
        await trio.sleep(1)
        watch.progress(1_000_000)

    for _ in range(5):
        await transfer.with_retries(Blob("sha256:" + "0" * 64, 1_000_000), attempt)
    assert transfer.monitor.history.median() == pytest.approx(1e6)  # not 1e5
