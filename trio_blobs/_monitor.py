"""The watchdog that cuts off stalled and slow attempts.

Each attempt runs inside a :class:`Watch`, a cancel scope plus byte counters. One monitor task
per transfer call looks at every active watch a few times a second and cancels the ones that
made no progress for ``stall_timeout`` seconds, or that, after a grace period, run below a
fraction of the median rate of recently completed transfers.
"""

from __future__ import annotations

import statistics
from collections import deque
from types import TracebackType

import httpx
import trio

from ._exceptions import SlowTransferError, StallError, TransferError

SLOW_GRACE = 5.0  # seconds before an attempt may be judged slow
SLOW_FRACTION = 0.1  # slow: below this fraction of the median rate
RATE_WINDOW = 30  # completed transfers the median is taken over
RATE_MIN_SAMPLES = 5  # no slowness verdict before this many samples
RATE_MIN_SIZE = 100_000  # transfers smaller than this say little about the link's rate


class RateHistory:
    """Rates (bytes per second) of recently completed transfers large enough to be telling."""

    def __init__(self) -> None:
        self._rates: deque[float] = deque(maxlen=RATE_WINDOW)

    def add(self, size: int, seconds: float) -> None:
        """Record a completed transfer of ``size`` bytes that took ``seconds``."""
        if size >= RATE_MIN_SIZE and seconds > 0:
            self._rates.append(size / seconds)

    def median(self) -> float | None:
        """The median rate, or None while there are too few samples."""
        if len(self._rates) < RATE_MIN_SAMPLES:
            return None
        return statistics.median(self._rates)


class Watch:
    """One attempt under watch: call :meth:`progress` whenever bytes (or headers) arrive."""

    __slots__ = (
        "cancel_scope",
        "grace",
        "last_activity",
        "paused_at",
        "paused_seconds",
        "pauses",
        "started",
        "transferred",
        "url",
        "verdict",
    )

    def __init__(self) -> None:
        self.cancel_scope = trio.CancelScope()
        self.started = self.last_activity = trio.current_time()
        self.transferred = 0
        self.url: httpx.URL | None = None  # the URL last asked for, to name in errors
        self.pauses = 0  # while above 0, the attempt waits on something that is not the peer
        self.paused_at = 0.0  # when the current pause began
        self.paused_seconds = 0.0  # time spent in pauses that ended
        self.grace = 0.0  # extra seconds the peer may take: set when it has all it needs
        self.verdict: str | None = None  # "stall" or "slow" once tripped

    def progress(self, nbytes: int) -> None:
        """Note that ``nbytes`` (possibly 0, for a response head) just arrived."""
        self.transferred += nbytes
        self.last_activity = trio.current_time()

    def paused(self) -> _Pause:
        """Not judged meanwhile (``with watch.paused():`` waiting for a token, say); the stall
        clock restarts after, and the time does not count in the attempt's rate."""
        return _Pause(self)

    def active_seconds(self, now: float) -> float:
        """Seconds since the attempt started, leaving out the pauses that ended."""
        return now - self.started - self.paused_seconds

    def rate(self, now: float) -> float:
        """Bytes per second so far, over :meth:`active_seconds`."""
        seconds = self.active_seconds(now)
        return self.transferred / seconds if seconds > 0 else 0.0

    def trip(self, verdict: str) -> None:
        """Cancel the attempt, recording why."""
        if self.verdict is None:
            self.verdict = verdict
            self.cancel_scope.cancel()

    def error(self, *, stall_timeout: float, digest: str | None) -> TransferError | None:
        """The error that describes why the monitor cut this attempt off, if it did (an
        attempt that finished before the cancellation could reach it was not cut off)."""
        if not self.cancel_scope.cancelled_caught:
            return None
        url = None if self.url is None else str(self.url)
        if self.verdict == "stall":
            waited = f"no data for {stall_timeout:g} s after {self.transferred} bytes"
            if self.grace:
                waited = f"no answer for {stall_timeout + self.grace:g} s after the last byte"
            return StallError(waited, digest=digest, url=url)
        if self.verdict == "slow":
            rate = self.rate(self.last_activity)
            return SlowTransferError(
                f"cut off at {rate / 1e6:.3f} MB/s, far below recent transfers",
                digest=digest,
                url=url,
            )
        return None


class _Pause:
    """See :meth:`Watch.paused` (a class: cheaper than @contextmanager, and used per blob)."""

    __slots__ = ("_watch",)

    def __init__(self, watch: Watch) -> None:
        self._watch = watch

    def __enter__(self) -> None:
        watch = self._watch
        if not watch.pauses:
            watch.paused_at = trio.current_time()
        watch.pauses += 1

    def __exit__(self, *exc_info: object) -> None:
        watch = self._watch
        watch.pauses -= 1
        watch.progress(0)
        if not watch.pauses:
            watch.paused_seconds += watch.last_activity - watch.paused_at


class _Watching:
    """See :meth:`Monitor.watch` (a class: cheaper than @contextmanager, and used per attempt)."""

    __slots__ = ("_watch", "_watches")

    def __init__(self, watches: set[Watch]) -> None:
        self._watches = watches
        self._watch = Watch()

    def __enter__(self) -> Watch:
        watch = self._watch
        self._watches.add(watch)
        try:
            watch.cancel_scope.__enter__()
        except BaseException:
            self._watches.discard(watch)
            raise
        return watch

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        try:
            return self._watch.cancel_scope.__exit__(kind, exc, tb)
        finally:
            self._watches.discard(self._watch)


class Monitor:
    """Watches attempts; :meth:`run` must be started in a nursery that outlives them."""

    def __init__(self, *, stall_timeout: float, history: RateHistory) -> None:
        self.stall_timeout = stall_timeout
        self.history = history
        self._watches: set[Watch] = set()
        self._tick = min(0.5, stall_timeout / 4)

    def watch(self) -> _Watching:
        """``with`` it: a cancel scope that the monitor trips when the attempt stalls or
        crawls, entered around the attempt, and the :class:`Watch` it reports to."""
        return _Watching(self._watches)

    def check(self, now: float) -> None:
        """Trip every watch that is stalled or too slow at time ``now``."""
        median = self.history.median()
        for watch in list(self._watches):
            if watch.pauses:
                continue
            if now - watch.last_activity >= self.stall_timeout + watch.grace:
                watch.trip("stall")
            elif (
                median is not None
                and not watch.grace
                and watch.active_seconds(now) >= SLOW_GRACE
                and watch.rate(now) < SLOW_FRACTION * median
            ):
                watch.trip("slow")

    async def run(self) -> None:
        """Check the active attempts a few times a second, forever."""
        while True:
            await trio.sleep(self._tick)
            self.check(trio.current_time())
