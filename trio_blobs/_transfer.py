"""What downloads and uploads share: argument checks, the task tree, retries, progress."""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import resource
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from ._auth import merge_scopes
from ._digest import Blob
from ._exceptions import LocalFileError, TransferError
from ._monitor import Monitor, RateHistory, Watch
from ._protocol import check_base_url, check_int, check_repository
from ._retry import AttemptBudget, RetryPolicy
from ._session import CLEANUP_TIMEOUT, Credentials, GetToken, RegistrySession, TransferClient

ProgressCallback = Callable[[int, int], object]
"""``progress(completed, total)``, called with byte counts as a transfer advances; back to
fewer when an attempt fails (the next one counts its bytes again, from what it kept if it
resumes), ``total`` at the end."""

BlobProgressCallback = Callable[[Blob, int], object]
"""``blob_progress(blob, done)``: bytes of one blob so far; back to fewer when an attempt fails,
``blob.size`` once the blob is done (verified, committed, mounted, or found already there)."""

DEFAULT_LOGGER = logging.getLogger("trio_blobs")
FILES_PER_TRANSFER = 3  # a blob's file, its connection, and one to where a redirect leads
FILES_KEPT = 64  # open files left to the rest of the process
_LINE_BREAK = re.compile(r"[\r\n\0]")  # what no header value may hold


def check_blobs(blobs: Iterable[Blob]) -> list[Blob]:
    """The blobs to transfer, each digest once (with a ``mount_from``, if any listing has one);
    raises on anything that is not a :class:`Blob`."""
    if isinstance(blobs, Blob | str | bytes):
        raise TypeError("blobs must be an iterable of Blob, not a single value")
    unique: dict[str, Blob] = {}
    for blob in blobs:
        if not isinstance(blob, Blob):
            raise TypeError(f"blobs must contain Blob objects, got {blob!r}")
        seen = unique.setdefault(blob.digest, blob)
        if seen.size != blob.size:
            raise ValueError(f"{blob.digest} is listed with two sizes: {seen.size} and {blob.size}")
        if seen.mount_from is None and blob.mount_from is not None:
            unique[blob.digest] = blob  # listed again with a repository to mount it from
    return list(unique.values())


class local_file_errors:  # a class: cheaper than @contextmanager, and used a lot per blob
    """Report an :class:`OSError` on ``path`` as what it is: a local file problem, not retried."""

    __slots__ = ("digest", "path")

    def __init__(self, digest: str | None, path: Path) -> None:
        self.digest = digest
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _: object
    ) -> None:
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                reason += " (lower concurrency, or raise the limit: ulimit -n)"
            raise LocalFileError(f"{self.path}: {reason}", digest=self.digest) from exc


_FILE_SLOTS: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("trio_blobs.files")


def _file_slots(concurrency: int, logger: logging.Logger) -> trio.CapacityLimiter:
    """The places for transfers that every call of this trio run shares: as many as the process
    may open files for (each holds a file and a connection, and one more while a redirect's
    target answers), or no limit where there is none. Says so when ``concurrency`` is more."""
    try:
        slots = _FILE_SLOTS.get()
    except LookupError:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        fitting = max(1, (soft - FILES_KEPT) // FILES_PER_TRANSFER)
        slots = trio.CapacityLimiter(math.inf if soft == resource.RLIM_INFINITY else fitting)
        _FILE_SLOTS.set(slots)
    if concurrency > slots.total_tokens:
        logger.info(
            "concurrency %d would need about %d open files, more than this process may open "
            "(ulimit -n): %d transfers at a time, with those of other calls",
            concurrency,
            concurrency * FILES_PER_TRANSFER,
            slots.total_tokens,
        )
    return slots


def check_options(
    *,
    concurrency: int,
    stall_timeout: float,
    rate_limit: float | None,
    max_body_streams: int | None,
    retry: RetryPolicy | None,
    callbacks: dict[str, object],
) -> None:
    """Raise :class:`ValueError` / :class:`TypeError` for options no transfer can run with;
    ``callbacks`` maps names to the callbacks given (None or callable)."""
    check_int("concurrency", concurrency)
    if max_body_streams is not None:
        check_int("max_body_streams", max_body_streams)
    if rate_limit is not None and (
        isinstance(rate_limit, bool)
        or not isinstance(rate_limit, int | float)
        or not 0 < rate_limit < math.inf
    ):
        raise ValueError(
            f"rate_limit must be a finite number of bytes per second > 0, got {rate_limit!r}"
        )
    check_stall_and_retry(stall_timeout, retry)
    for name, callback in callbacks.items():
        if callback is not None and not callable(callback):
            raise TypeError(f"{name} must be callable, got {callback!r}")


def check_stall_and_retry(stall_timeout: float, retry: RetryPolicy | None) -> None:
    """Raise :class:`ValueError` / :class:`TypeError` for a ``stall_timeout`` or ``retry``
    that no transfer (or manifest fetch) can run with."""
    if (
        isinstance(stall_timeout, bool)
        or not isinstance(stall_timeout, int | float)
        or not stall_timeout > 0
    ):
        raise ValueError(f"stall_timeout must be a number of seconds > 0, got {stall_timeout!r}")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise TypeError(f"retry must be a RetryPolicy, got {retry!r}")


def check_path(name: str, value: object) -> Path:
    """``value`` as a path, or :class:`TypeError` / :class:`ValueError` naming it."""
    path = os.fspath(value) if isinstance(value, str | os.PathLike) else None
    if not isinstance(path, str):
        raise TypeError(
            f"{name} must be a path (a str, or an os.PathLike giving one), got {value!r}"
        )
    if not path:
        raise ValueError(f"{name} is empty")
    return Path(path)


class Progress:
    """Byte counts reported to the caller's callbacks; failed attempts roll theirs back.

    A callback that raises is not called again: its exception ends the transfer, and the
    clean-up that follows must not raise it a second time.
    """

    def __init__(
        self,
        callback: ProgressCallback | None,
        *,
        total: int,
        blob_callback: BlobProgressCallback | None = None,
    ) -> None:
        self._callback = callback
        self._blob_callback = blob_callback
        self.total = total
        self.completed = 0

    def attempt(self, blob: Blob) -> AttemptProgress:
        """Count one attempt's bytes (``with progress.attempt(blob) as counted``); if it fails
        (or is cancelled), take them all back."""
        return AttemptProgress(self, blob)

    def done_already(self, blobs: Iterable[Blob]) -> None:
        """Count ``blobs`` as done without moving them (present already): one call for all."""
        blobs = list(blobs)
        self.add(sum(blob.size for blob in blobs))
        for blob in blobs:
            self.blob(blob, blob.size)

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` more (negative to roll back) and tell the caller."""
        self.completed += nbytes
        if self._callback is not None:
            try:
                self._callback(self.completed, self.total)
            except BaseException:
                self._callback = None
                raise

    def blob(self, blob: Blob, done: int) -> None:
        """Tell the caller that ``done`` bytes of ``blob`` have moved."""
        if self._blob_callback is not None:
            try:
                self._blob_callback(blob, done)
            except BaseException:
                self._blob_callback = None
                raise


class RateLimit:
    """A token bucket shared by one call's streams: ``rate`` bytes per second on average.

    Each stream takes what it moved; when the bucket is in debt it sleeps until the debt is
    paid, so the streams together keep to the rate without sleeping whole seconds. Streams
    should move at most :attr:`piece` bytes at a time.
    """

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.piece = int(min(max(rate / 20, 4096), 1024 * 1024))  # about 50 ms worth
        self._burst = max(self.rate / 10, float(self.piece))
        self._tokens = self._burst
        self._last = trio.current_time()

    async def take(self, nbytes: int, watch: Watch) -> None:
        """Account for ``nbytes`` moved; wait (not judged a stall) while over the rate."""
        now = trio.current_time()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self.rate) - nbytes
        self._last = now
        if self._tokens < 0:
            with watch.paused():
                await trio.sleep(-self._tokens / self.rate)


class AttemptProgress:
    """The bytes one attempt has reported; see :meth:`Progress.attempt`."""

    __slots__ = ("_blob", "_progress", "value")

    def __init__(self, progress: Progress, blob: Blob) -> None:
        self._progress = progress
        self._blob = blob
        self.value = 0

    def __enter__(self) -> AttemptProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is not None:
            self.set(0)
        elif not self._blob.size:  # done, with no byte to have reported it
            self._progress.blob(self._blob, 0)

    def set(self, value: int) -> None:
        """This attempt has now moved ``value`` bytes (fewer after a rewind)."""
        if value != self.value:
            delta, self.value = value - self.value, value
            self._progress.add(delta)
            self._progress.blob(self._blob, value)

    def add(self, nbytes: int) -> None:
        """``nbytes`` more moved."""
        self.set(self.value + nbytes)


class Transfer:
    """One ``download`` or ``upload`` call: its session, limits, monitor and progress."""

    def __init__(
        self,
        *,
        session: RegistrySession,
        concurrency: int,
        stall_timeout: float,
        retry: RetryPolicy,
        progress: Progress,
        rate_limit: float | None = None,
        max_body_streams: int | None = None,
    ) -> None:
        self.session = session
        self.rate_limit = RateLimit(rate_limit) if rate_limit is not None else None
        self._bodies = trio.CapacityLimiter(max_body_streams) if max_body_streams else None
        self.limiter = trio.CapacityLimiter(concurrency)
        self._files = _file_slots(concurrency, session.logger)
        self.monitor = Monitor(stall_timeout=stall_timeout, history=RateHistory())
        self.retry = retry
        self.progress = progress
        self.logger = session.logger

    def body_stream(self, watch: Watch) -> AbstractAsyncContextManager[None]:
        """Hold one of the ``max_body_streams`` places while a blob body flows (waiting for a
        place is not judged a stall)."""
        return nullcontext() if self._bodies is None else self._body_place(watch, self._bodies)

    @asynccontextmanager
    async def _body_place(self, watch: Watch, bodies: trio.CapacityLimiter) -> AsyncIterator[None]:
        with watch.paused():
            await bodies.acquire()
        try:
            yield
        finally:
            bodies.release()

    async def run_each(self, blobs: Sequence[Blob], one: Callable[[Blob], Awaitable[None]]) -> None:
        """Run ``one(blob)`` for every blob in parallel, under the monitor.

        The first :class:`TransferError` cancels the rest and is raised alone; a single other
        exception (a bug, ``KeyboardInterrupt``, ``Cancelled``) comes out unwrapped.
        """
        errors: list[TransferError] = []

        async def guarded(blob: Blob, cancel_scope: trio.CancelScope) -> None:
            try:
                await one(blob)
            except TransferError as exc:
                errors.append(exc)
                cancel_scope.cancel()

        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(self.monitor.run)
                async with trio.open_nursery() as nursery:
                    for blob in blobs:
                        nursery.start_soon(guarded, blob, nursery.cancel_scope)
                outer.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
        if errors:
            raise errors[0]

    async def _take_file_slot(self) -> None:
        try:
            self._files.acquire_nowait()  # no checkpoint: as cheap as can be, per attempt
        except trio.WouldBlock:
            await self._files.acquire()

    async def with_retries(
        self,
        blob: Blob,
        attempt: Callable[[Watch], Awaitable[None]],
        *,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        """Run ``attempt(watch)`` until it succeeds, retrying as the retry policy allows.

        Each attempt holds ``limiter`` (the transfer's own by default) and runs under the monitor;
        the bytes it reports to its watch feed the median rate that slow attempts are judged by.
        """
        budget = AttemptBudget(self.retry)
        while True:
            watch: Watch | None = None
            try:
                async with limiter or self.limiter:
                    await self._take_file_slot()
                    try:
                        with self.monitor.watch() as watch:
                            await attempt(watch)
                    finally:
                        self._files.release()
                        if self._files.statistics().tasks_waiting:
                            # Out of files for now: keep none idle, here as in the other calls.
                            self.session.close_idle()
                error = watch.error(stall_timeout=self.monitor.stall_timeout, digest=blob.digest)
                if error is None:
                    self.monitor.history.add(
                        watch.transferred, watch.active_seconds(trio.current_time())
                    )
                    return
                raise error
            except TransferError as exc:
                if exc.digest is None:
                    exc.digest = blob.digest
                if exc.url is None and watch is not None and watch.url is not None:
                    exc.url = str(watch.url)
                delay = budget.after_failure(exc)
                self.logger.info(
                    "attempt %d for %s failed, retrying in %.2f s: %s",
                    budget.attempts,
                    blob.digest,
                    delay,
                    exc,
                )
                await trio.sleep(delay)


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What the caller should see of ``group``: a KeyboardInterrupt if there is one, else its
    one exception that is not a cancellation (or the first of several alike: same type and
    message), else one ``Cancelled`` if that is all there is; several different failures stay
    a group."""
    leaves = list(_leaves(group))
    for leaf in leaves:
        if isinstance(leaf, KeyboardInterrupt):
            return leaf
    failures = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
    if failures and len({(type(leaf), str(leaf)) for leaf in failures}) == 1:
        return failures[0]
    return leaves[0] if not failures else group


def _leaves(exc: BaseException) -> Iterable[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """What :func:`open_session` needs from a caller, checked by :func:`session_options`."""

    client: httpx.AsyncClient | None
    base_url: httpx.URL
    repository: str
    credentials: Credentials
    user_agent: str | None
    logger: logging.Logger


def session_options(
    *,
    client: httpx.AsyncClient | None,
    base_url: str,
    repository: str,
    token: str | None,
    get_token: GetToken | None,
    user_agent: str | None,
    logger: logging.Logger | None,
) -> SessionOptions:
    """The options of a registry session, or :class:`ValueError` / :class:`TypeError` for one
    that no session can run with."""
    url = check_base_url(base_url)
    check_repository(repository)
    for name, value in (("token", token), ("user_agent", user_agent)):
        if value is not None and (not isinstance(value, str) or _LINE_BREAK.search(value)):
            shown = "" if name == "token" else f", got {value!r}"  # a token is never shown
            raise ValueError(f"{name} must be a str with no line breaks or NUL{shown}")
    if get_token is not None and not callable(get_token):
        raise TypeError(f"get_token must be an async callable, got {get_token!r}")
    if logger is not None and not all(
        callable(getattr(logger, m, None)) for m in ("info", "debug")
    ):
        raise TypeError(f"logger must be a logging.Logger or alike, got {logger!r}")
    if client is not None:
        if not isinstance(client, httpx.AsyncClient):
            raise TypeError(f"client must be an httpx.AsyncClient, got {client!r}")
        if client.is_closed:
            raise ValueError("client is closed: pass an open httpx.AsyncClient, or none")
    return SessionOptions(
        client=client,
        base_url=url,
        repository=repository,
        credentials=Credentials(token=token, get_token=get_token),
        user_agent=user_agent,
        logger=logger or DEFAULT_LOGGER,
    )


@asynccontextmanager
async def open_session(
    options: SessionOptions, *, concurrency: int, actions: str, mount_from: Collection[str] = ()
) -> AsyncIterator[RegistrySession]:
    """A :class:`RegistrySession` over the caller's client, or over one of ours closed at exit,
    whose tokens cover ``actions`` on the repository and pulls from ``mount_from``."""
    client = options.client
    own = None
    if client is None:
        client = own = TransferClient(max_idle_connections=concurrency)
    try:
        yield RegistrySession(
            client=client,
            base_url=options.base_url,
            repository=options.repository,
            credentials=options.credentials,
            user_agent=options.user_agent,
            logger=options.logger,
            scope=merge_scopes(
                f"repository:{options.repository}:{actions}",
                *(f"repository:{source}:pull" for source in mount_from),
            ),
        )
    finally:
        if own is not None:
            with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                await own.aclose()
