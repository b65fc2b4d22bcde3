"""Parallel, verified blob downloads."""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import queue
import secrets
import shutil
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx
import trio

from ._digest import Blob, hashed_digest, new_hasher
from ._exceptions import IntegrityError, LocalFileError, TransferError
from ._monitor import Watch
from ._protocol import check_announced_digest, check_base_url, check_bool, check_int
from ._retry import RetryPolicy
from ._session import GetToken, RegistrySession
from ._transfer import (
    BlobProgressCallback,
    Progress,
    ProgressCallback,
    Transfer,
    check_blobs,
    check_options,
    check_path,
    local_file_errors,
    open_session,
    session_options,
)

__all__ = ["DownloadResult", "download"]

_BLOB_HEADERS = {"accept-encoding": "identity"}
RESUME_THRESHOLD = 64 * 1024 * 1024  # blobs this big keep their partial file for a resume
READ_SIZE = 1024 * 1024  # bytes read at a time when re-hashing a partial file
THREADED_SIZE = 16 * 1024 * 1024  # bodies this big are hashed and written on a worker thread
WORKER_THREADS = 4  # at most this many such threads at once per trio run
WORKER_QUEUE = 2  # pieces a worker thread may have waiting: what it holds beyond the loop's
_NO_HARD_LINKS = frozenset(
    {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK}
)
# Files with no name until they are linked (O_TMPFILE, Linux): named through /proc/self/fd.
_UNNAMED_FILES = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
# What open(2) fails with where a filesystem (or an old kernel) has no O_TMPFILE.
_NO_UNNAMED_FILES = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL})


@dataclass(frozen=True, slots=True)
class DownloadResult:
    """What a :func:`download` call did: digests fetched, and digests already present."""

    downloaded: tuple[str, ...]
    skipped: tuple[str, ...]


async def download(
    blobs: Iterable[Blob],
    *,
    base_url: str,
    dest_dir: str | os.PathLike[str],
    repository: str = "library/_",
    concurrency: int = 64,
    progress: ProgressCallback | None = None,
    blob_progress: BlobProgressCallback | None = None,
    client: httpx.AsyncClient | None = None,
    token: str | None = None,
    get_token: GetToken | None = None,
    user_agent: str | None = None,
    stall_timeout: float = 10.0,
    logger: logging.Logger | None = None,
    retry: RetryPolicy | None = None,
    resume_threshold: int = RESUME_THRESHOLD,
    fsync: bool = False,
    rate_limit: float | None = None,
    max_body_streams: int | None = None,
    mirrors: Sequence[str] = (),
    mirror_credentials: bool = False,
) -> DownloadResult:
    """Download ``blobs`` from ``repository`` at ``base_url`` into ``dest_dir``, in parallel.

    Each blob is streamed into a file beside its final name ``sha256-<hex>`` (with no name yet
    where the system allows, so that not even a killed process leaves it behind), hashed as
    it arrives, and given that name only once its size and digest match. A blob whose file
    already has the right size is skipped without a request. At most ``concurrency`` requests are
    in flight (fewer where the process may not open three files for each: ``ulimit -n``). A
    blob of ``resume_threshold`` bytes or more (64 MiB by default) keeps what it received when
    an attempt fails, in ``.sha256-<hex>.partial``: the next attempt, or a later call in any
    process, re-hashes it and asks only for the rest (``Range``). A finished blob is
    never rewritten, even by a concurrent download of the same blob (except on a filesystem
    without hard links, where that download renames its own verified copy over it, atomically:
    the name never holds anything else). ``rate_limit`` (bytes per second) caps the whole call's
    rate, smoothly, and ``max_body_streams`` how many blob bodies flow at once (``concurrency``
    still bounds the requests in flight). ``fsync=True`` flushes each blob and its directory to
    disk before the blob counts as done: safe against power loss, slower for many small blobs.

    ``client`` is an :class:`httpx.AsyncClient` you own (for proxies, CAs, limits); redirects are
    always followed here, never by httpx, its ``auth`` is not used, and ``Authorization`` (from
    ``token``, or from ``await get_token(challenge)`` after a 401) is only ever sent to
    ``base_url``'s origin. ``progress(completed, total)`` is called as bytes arrive (and with
    less when an attempt fails), and ``blob_progress(blob, done)`` with each blob's own count
    (``blob.size`` once it is done). An attempt that receives nothing for ``stall_timeout``
    seconds, or crawls far below recent transfers, is cancelled and retried as ``retry`` (a
    :class:`RetryPolicy`) allows.

    ``mirrors`` are base URLs (pull-through caches, peer-to-peer mirrors) tried in order before
    the registry for each blob: a miss (404), an error, a stall or content that does not verify
    there moves on to the next, and the blob's digest is what makes a mirror's bytes
    trustworthy. Credentials go to mirrors only with ``mirror_credentials=True``.

    Raises :class:`TransferError` (naming the blob) when a blob cannot be fetched, and
    :class:`ValueError` / :class:`TypeError` for bad arguments, before any I/O.

    ``repository`` defaults to ``library/_``, a placeholder that only the in-process test registry
    (:mod:`trio_blobs.testing`) accepts: real registries need the repository named.
    """
    todo = check_blobs(blobs)
    check_options(
        concurrency=concurrency,
        stall_timeout=stall_timeout,
        rate_limit=rate_limit,
        max_body_streams=max_body_streams,
        retry=retry,
        callbacks={"progress": progress, "blob_progress": blob_progress},
    )
    check_int("resume_threshold", resume_threshold, minimum=0)
    dest = check_path("dest_dir", dest_dir)
    if isinstance(mirrors, str):
        raise TypeError("mirrors must be a sequence of base URLs, not one string")
    mirror_urls = [check_base_url(mirror, "mirror") for mirror in mirrors]
    check_bool("fsync", fsync)
    check_bool("mirror_credentials", mirror_credentials)
    options = session_options(
        client=client,
        base_url=base_url,
        repository=repository,
        token=token,
        get_token=get_token,
        user_agent=user_agent,
        logger=logger,
    )
    if not todo:
        return DownloadResult((), ())
    digests = [blob.digest for blob in todo]
    async with open_session(options, concurrency=concurrency, actions="pull") as session:
        present = _prepare(dest, todo, resume_threshold)
        tracker = Progress(
            progress, total=sum(blob.size for blob in todo), blob_callback=blob_progress
        )
        tracker.done_already(blob for blob in todo if blob.digest in present)
        todo = [blob for blob in todo if blob.digest not in present]
        transfer = Transfer(
            session=session,
            concurrency=concurrency,
            stall_timeout=stall_timeout,
            retry=retry or RetryPolicy(),
            progress=tracker,
            rate_limit=rate_limit,
            max_body_streams=max_body_streams,
        )
        workers = _worker_threads()

        sources = [
            *(session.mirror(url, with_credentials=mirror_credentials) for url in mirror_urls),
            session,
        ]

        async def fetch(blob: Blob) -> None:
            resumable = blob.size >= resume_threshold
            source = 0  # which of sources this blob is fetched from
            failed_before = False

            async def attempt(watch: Watch) -> None:
                nonlocal source, failed_before
                if failed_before and source < len(mirror_urls):
                    source += 1  # the last attempt failed at a mirror (a stall, say)
                failed_before = True
                while True:
                    try:
                        await _attempt(
                            transfer,
                            sources[source],
                            blob,
                            dest,
                            watch,
                            resumable=resumable,
                            fsync=fsync,
                            workers=workers,
                        )
                        return
                    except TransferError as exc:
                        if source == len(mirror_urls) or isinstance(exc, LocalFileError):
                            raise
                        session.logger.info("mirror failed for %s, moving on: %s", blob.digest, exc)
                        source += 1

            await transfer.with_retries(blob, attempt)

        await transfer.run_each(todo, fetch)
    return DownloadResult(
        downloaded=tuple(d for d in digests if d not in present),
        skipped=tuple(d for d in digests if d in present),
    )


def _prepare(dest: Path, blobs: list[Blob], resume_threshold: int) -> set[str]:
    """Create ``dest`` if needed; return the digests of blobs already there with the right size.

    Raises :class:`LocalFileError` when the others cannot fit in the space free there, less
    what their partial files hold already.
    """
    with local_file_errors(None, dest):
        if dest.exists() and not dest.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "dest_dir is not a directory")
        if dest.is_symlink() and not dest.exists():
            raise FileNotFoundError(errno.ENOENT, "dest_dir is a symbolic link to nothing")
        dest.mkdir(parents=True, exist_ok=True)
    present = set()
    for blob in blobs:
        path = dest / blob.file_name
        with local_file_errors(blob.digest, path):
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(errno.EISDIR, "a directory has the blob's name")
            if stat.S_ISREG(info.st_mode) and info.st_size == blob.size:
                present.add(blob.digest)
    needed = sum(
        blob.size - (_kept(dest, blob) if blob.size >= resume_threshold else 0)
        for blob in blobs
        if blob.digest not in present
    )
    with local_file_errors(None, dest):
        free = shutil.disk_usage(dest).free
    if needed > free:
        raise LocalFileError(
            f"{dest} has {free:,} bytes free; the blobs still to fetch need {needed:,}"
        )
    return present


async def _attempt(
    transfer: Transfer,
    session: RegistrySession,
    blob: Blob,
    dest: Path,
    watch: Watch,
    *,
    resumable: bool,
    fsync: bool,
    workers: trio.CapacityLimiter | None,
) -> None:
    """One GET of ``blob`` from ``session`` (of the rest of it, when part is kept from before)
    streamed into a verified file; a failure rolls its progress back."""
    with transfer.progress.attempt(blob) as counted:
        with watch.paused():  # re-hashing kept bytes is not the peer's doing
            partial = await _PartialFile.open(dest, blob, resumable=resumable)
        with partial:
            counted.set(partial.have)
            if partial.have == blob.size:  # all there already, not yet verified
                await _commit(partial, watch, fsync=fsync)
                return
            headers = dict(_BLOB_HEADERS)
            if partial.have:
                headers["range"] = f"bytes={partial.have}-"
            async with (
                transfer.body_stream(watch),
                session.stream(
                    "GET",
                    session.url(f"blobs/{blob.digest}"),
                    expect=(200, 206) if partial.have else (200,),
                    digest=blob.digest,
                    what="blob",
                    headers=headers,
                    watch=watch,
                ) as response,
            ):
                if response.status_code == 200 and partial.have:  # the Range was ignored
                    partial.restart()
                    counted.set(0)
                _check_length(blob, partial.have, response)
                check_announced_digest(response, blob.digest)
                big = blob.size - partial.have >= THREADED_SIZE
                async with _BodyWriter(partial, workers if big else None, watch) as writer:
                    async for chunk in response.aiter_raw():
                        await writer.write(chunk)
                        watch.progress(len(chunk))
                        counted.add(len(chunk))
                        if transfer.rate_limit is not None:
                            await transfer.rate_limit.take(len(chunk), watch)
                await _commit(partial, watch, fsync=fsync)


async def _commit(partial: _PartialFile, watch: Watch, *, fsync: bool) -> None:
    """:meth:`_PartialFile.commit`; with ``fsync``, on a worker thread, as flushing to disk
    may take long enough to hold up every other transfer (and is not the peer's doing)."""
    if not fsync:
        partial.commit(fsync=False)
        return
    with watch.paused():
        await trio.to_thread.run_sync(functools.partial(partial.commit, fsync=True))


_WORKERS: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("trio_blobs.workers")


def _worker_threads() -> trio.CapacityLimiter | None:
    """The slots of the worker threads that big bodies are hashed and written on: at most
    :data:`WORKER_THREADS` at once per trio run, however many downloads share it.

    None under a virtual clock: a worker thread takes real time, and an autojumping
    :class:`trio.testing.MockClock` jumps ahead while the loop waits for one, which the stall
    and rate checks would take for a slow peer. (Without trio.testing imported, there is no
    MockClock; importing it here would cost every download call's process 9 MB.)
    """
    testing = sys.modules.get("trio.testing")
    if testing is not None and isinstance(trio.lowlevel.current_clock(), testing.MockClock):
        return None
    try:
        return _WORKERS.get()
    except LookupError:
        workers = trio.CapacityLimiter(WORKER_THREADS)
        _WORKERS.set(workers)
        return workers


class _BodyWriter:
    """Hands a body's pieces to a :class:`_PartialFile`: inline, or, when one of ``workers`` is
    free as the body starts, through a short queue to a worker thread, so that hashing and
    writing run on another core while the event loop receives. Leaving the ``async with``
    waits for the thread and raises what it raised (not in place of a cancellation).

    Waiting on the thread pauses ``watch``: a slow disk is not the peer's doing.
    """

    def __init__(
        self, partial: _PartialFile, workers: trio.CapacityLimiter | None, watch: Watch
    ) -> None:
        self._partial = partial
        self._workers = workers
        self._watch = watch
        self._slot: trio.CapacityLimiter | None = None  # workers, once a thread of theirs runs
        self._pieces: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._room = trio.Semaphore(WORKER_QUEUE)
        self._done = trio.Event()
        self._error: BaseException | None = None
        self._received = partial.have

    async def __aenter__(self) -> _BodyWriter:
        workers = self._workers
        if workers is None:
            return self
        try:
            workers.acquire_on_behalf_of_nowait(self)
        except trio.WouldBlock:
            return self
        token = trio.lowlevel.current_trio_token()
        try:
            trio.lowlevel.start_thread_soon(
                lambda: self._work(token),
                lambda _: token.run_sync_soon(self._done.set),
                name=f"trio_blobs writer {self._partial.blob.digest}",
            )
        except RuntimeError:  # no thread to be had (a pids limit, say): the loop does it
            workers.release_on_behalf_of(self)
        else:
            self._slot = workers
        return self

    def _work(self, token: trio.lowlevel.TrioToken) -> None:
        while (piece := self._pieces.get()) is not None:
            try:
                if self._error is None:
                    self._partial.append(piece)
            except BaseException as exc:  # raised in the loop's thread; the queue drains
                self._error = exc
            finally:
                token.run_sync_soon(self._room.release)

    async def write(self, piece: bytes) -> None:
        """Hash and append ``piece`` (by the time the ``async with`` is left, when threaded)."""
        if self._slot is None:
            self._partial.write(piece)
            return
        if self._error is not None:
            raise self._error
        self._received += len(piece)
        self._partial.check_fits(self._received)
        with self._watch.paused():
            await self._room.acquire()
        self._pieces.put(piece)

    async def __aexit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if self._slot is None:
            return
        try:
            self._pieces.put(None)
            # The file is the thread's until it is done.
            with self._watch.paused(), trio.CancelScope(shield=True):
                await self._done.wait()
        finally:
            self._slot.release_on_behalf_of(self)
        if self._error is not None and (kind is None or issubclass(kind, Exception)):
            raise self._error  # says more than the body failing meanwhile, if it did


def _check_length(blob: Blob, start: int, response: httpx.Response) -> None:
    """Reject a response whose headers already say it is not the blob from ``start`` on."""
    if response.status_code == 206:
        expected = f"bytes {start}-{blob.size - 1}/"
        content_range = response.headers.get("content-range", "").strip()
        if not content_range.startswith(expected):
            raise IntegrityError(
                f"asked for bytes {start}- and got {content_range or 'no Content-Range'}",
                digest=blob.digest,
                url=str(response.request.url),
            )
    length = response.headers.get("content-length")
    if length is not None and length.strip() != str(blob.size - start):
        rest = f" from byte {start}, which leaves {blob.size - start}," if start else ""
        raise IntegrityError(
            f"the registry announced {length.strip()} bytes{rest} for a blob of {blob.size} "
            f"bytes (is its size right?)",
            digest=blob.digest,
            url=str(response.request.url),
        )


class _PartialFile:
    """A blob being written: a file beside its final name, hashed as it grows.

    :meth:`commit` gives it its final name after checking size and digest. A resumable blob's
    file is ``.sha256-<hex>.partial`` (no finished blob has such a name), locked while in use and
    kept when an attempt fails for another reason than its content. Other blobs, and a blob whose
    partial file another download holds, get a file of their own that has no name at all until
    it is committed (``O_TMPFILE``), so that it vanishes even when the process is killed; where
    the filesystem has no such files, a hidden temporary file, removed unless committed.
    """

    def __init__(
        self, blob: Blob, final: Path, path: Path | None, file: BinaryIO, keep: bool
    ) -> None:
        self.blob = blob
        self._final = final
        self._path = path  # None: the file has no name yet
        self._shown = final if path is None else path  # in error messages
        self._file = file
        self._keep = keep
        self._hasher = new_hasher(blob.digest)
        self._committed = False
        self.have = 0  # bytes in the file, all hashed

    @classmethod
    async def open(cls, dest: Path, blob: Blob, *, resumable: bool) -> _PartialFile:
        """The file to write ``blob`` into, with what a failed attempt kept re-hashed."""
        final = dest / blob.file_name
        path = _partial_path(dest, blob)
        with local_file_errors(blob.digest, path):
            file = _open_partial(path) if resumable else None
        with local_file_errors(blob.digest, dest):
            if file is not None:
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another download has it: do without
                    file.close()
                else:
                    partial = cls(blob, final, path, file, keep=True)
                    try:
                        await partial._rehash()
                    except BaseException:
                        file.close()
                        raise
                    return partial
            fd = _unnamed_file(dest)
            if fd is not None:
                return cls(blob, final, None, os.fdopen(fd, "w+b"), keep=False)
            fd, path = hidden_file(final)
        return cls(blob, final, path, os.fdopen(fd, "w+b"), keep=False)

    async def _rehash(self) -> None:
        """Hash what the file holds already (nothing, if it is longer than the blob)."""
        with local_file_errors(self.blob.digest, self._shown):
            size = os.fstat(self._file.fileno()).st_size
            if size > self.blob.size:
                self.restart()
                return
            while self.have < size:
                piece = os.pread(self._file.fileno(), min(READ_SIZE, size - self.have), self.have)
                self._hasher.update(piece)
                self.have += len(piece)
                await trio.lowlevel.checkpoint()

    def __enter__(self) -> _PartialFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self._file.close()
        if self._path is None or self._committed:
            return
        if not self._keep or (kind and issubclass(kind, IntegrityError)):
            self._path.unlink(missing_ok=True)

    def restart(self) -> None:
        """Drop what the file holds: the data starts again from its first byte."""
        with local_file_errors(self.blob.digest, self._shown):
            self._file.truncate(0)
        self._hasher = new_hasher(self.blob.digest)
        self.have = 0

    def check_fits(self, end: int) -> None:
        """Refuse a body that would end at byte ``end``, past the blob's size."""
        if end > self.blob.size:
            raise IntegrityError(
                f"body is longer than the blob's {self.blob.size} bytes", digest=self.blob.digest
            )

    def write(self, chunk: bytes) -> None:
        """Hash and append ``chunk``; a body that outgrows the blob is refused unwritten."""
        self.check_fits(self.have + len(chunk))
        self.append(chunk)

    def append(self, chunk: bytes) -> None:
        """Hash and append ``chunk``, which :meth:`check_fits` let through."""
        self._hasher.update(chunk)
        with local_file_errors(self.blob.digest, self._shown):
            self._file.write(chunk)
        self.have += len(chunk)

    def commit(self, *, fsync: bool) -> None:
        """Verify size and digest, then give the file its final name (after flushing it and,
        with ``fsync``, its directory to disk)."""
        blob = self.blob
        if self.have != blob.size:
            raise IntegrityError(
                f"body ended after {self.have} of {blob.size} bytes", digest=blob.digest
            )
        actual = hashed_digest(blob.digest, self._hasher)
        if actual != blob.digest:
            raise IntegrityError(f"content has digest {actual}", digest=blob.digest)
        with local_file_errors(blob.digest, self._shown):
            self._file.flush()
            if fsync:
                os.fsync(self._file.fileno())
            _publish(self._file, self._path, self._final, blob.size, fsync=fsync)
            if fsync:
                _fsync_directory(self._final.parent)
        self._committed = True


def _partial_path(dest: Path, blob: Blob) -> Path:
    return dest / f".{blob.file_name}.partial"


def _kept(dest: Path, blob: Blob) -> int:
    """Bytes of ``blob`` that its partial file holds, to resume from (0 if none usable)."""
    try:
        info = _partial_path(dest, blob).lstat()
    except OSError:
        return 0
    return info.st_size if _usable_partial(info) and info.st_size <= blob.size else 0


def _usable_partial(info: os.stat_result) -> bool:
    """Whether a partial file may be written to: a regular file of no other name (a hard link
    to a file elsewhere would be written through, as a symbolic link would)."""
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1


def _open_partial(path: Path) -> BinaryIO | None:
    """The partial file ``path``, opened (or created) to append to; None when something else
    has that name: neither a symbolic nor a hard link is written through, a FIFO never waited
    on."""
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            return None
        raise
    if not _usable_partial(os.fstat(fd)):
        os.close(fd)
        return None
    os.set_blocking(fd, True)  # a regular file: I/O as usual from here on
    return os.fdopen(fd, "a+b")


def _unnamed_file(dest: Path) -> int | None:
    """A descriptor of a new file in ``dest`` that has no name yet, or None where the system or
    the filesystem has no such files."""
    if not _UNNAMED_FILES:
        return None
    try:
        return os.open(dest, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno in _NO_UNNAMED_FILES:
            return None
        raise


def _link(file: BinaryIO, path: Path | None, name: Path) -> None:
    """Hard-link the file (``path``, or the unnamed ``file`` when None) as ``name``."""
    if path is not None:
        os.link(path, name)
        return
    # As open(2) shows for O_TMPFILE: linkat through /proc, following the magic link. Python
    # calls linkat, which can follow it, only when given a directory descriptor; an absolute
    # path makes linkat ignore it.
    fd = file.fileno()
    os.link(f"/proc/self/fd/{fd}", name, src_dir_fd=fd, follow_symlinks=True)


def _publish(file: BinaryIO, path: Path | None, final: Path, size: int, *, fsync: bool) -> None:
    """Give the verified file (``path``, or the unnamed ``file`` when None) the name ``final``,
    never replacing a finished blob.

    A hard link fails if ``final`` exists: another download finished first, and its copy is as
    good. A leftover of the wrong size is replaced: renamed over, or, as an unnamed file has no
    name to rename, removed before linking again. Where hard links are not supported, an atomic
    rename does (of a hidden copy, for an unnamed file).
    """
    try:
        for _ in range(2):
            try:
                _link(file, path, final)
                break
            except FileExistsError:
                info = final.lstat()  # a link there is replaced, not followed
                if stat.S_ISREG(info.st_mode) and info.st_size == size:
                    break
                if path is not None:
                    os.replace(path, final)
                    return
                final.unlink()
        else:
            raise FileExistsError(errno.EEXIST, "a file of the wrong size keeps coming back")
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if path is not None:
            os.replace(path, final)
            return
        copy = _named_copy(file, final, fsync=fsync)  # O_TMPFILE but no linkat: some FUSE
        try:
            os.replace(copy, final)
        except BaseException:
            copy.unlink(missing_ok=True)
            raise
        return
    if path is not None:
        path.unlink()


def _named_copy(file: BinaryIO, final: Path, *, fsync: bool) -> Path:
    """A hidden copy of the unnamed ``file`` beside ``final``."""
    fd, name = hidden_file(final)
    try:
        with os.fdopen(fd, "wb") as copy:
            file.seek(0)
            shutil.copyfileobj(file, copy)
            copy.flush()
            if fsync:
                os.fsync(copy.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return name


def hidden_file(final: Path) -> tuple[int, Path]:
    """A new file beside ``final``, hidden (``.<name>.<random>.partial``) and open for reading
    and writing, with the mode open(2) gives new files: 0666 less the umask."""
    while True:
        path = final.with_name(f".{final.name}.{secrets.token_hex(4)}.partial")
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), path
        except FileExistsError:
            continue


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
