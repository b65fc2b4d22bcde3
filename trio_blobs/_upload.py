"""Parallel, verified blob uploads, and the manifest that ties them together."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from ._digest import Blob, Hasher, hashed_digest, new_hasher
from ._exceptions import LocalFileError, ProtocolError, RegistryError, TransferError
from ._manifest import OCI_MANIFEST, untyped_media_type
from ._monitor import Watch
from ._protocol import TAG_RE, add_query, check_int, location_target
from ._retry import RetryPolicy
from ._session import Body, GetToken, RegistrySession
from ._transfer import (
    AttemptProgress,
    BlobProgressCallback,
    Progress,
    ProgressCallback,
    RateLimit,
    Transfer,
    check_blobs,
    check_options,
    check_path,
    local_file_errors,
    open_session,
    session_options,
)

__all__ = ["UploadResult", "upload"]

READ_SIZE = 256 * 1024  # bytes read from a source file at a time
DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_CHUNK_THRESHOLD = 1024 * 1024 * 1024
HEAD_CONCURRENCY = 128
DAMAGED = "the file changed or is corrupt"  # ends the error for a source not matching its digest
PROBE_COUNT = 16  # small blobs asked about before the others are taken to be missing too
SMALL_BLOB = 4 * 1024 * 1024  # pushing such a blob that was there after all costs little
ABANDON_TIMEOUT = 0.5  # seconds a best-effort DELETE of a failed upload session may take
MAX_416_RECOVERIES = 3  # per attempt, before the attempt starts over with a new session
# Blobs smaller than this are offered whole in their upload's POST. A registry that ignores such
# a body (the distribution registry, a Go server) reads and drops less than 256 KiB of it, and
# otherwise closes the connection, half a second later.
WHOLE_POST_LIMIT = 256 * 1024
# What a registry may answer a POST that carries a whole blob, when it does not take that form.
_WHOLE_POST_REFUSALS = frozenset({400, 405, 411, 413, 415, 501})
COMMIT_GRACE = 60.0  # extra seconds a registry may take to answer once a blob is all sent,
COMMIT_RATE = 20e6  # plus its size at this many bytes per second (it may hash or move it)
_MEDIA_TYPE_RE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)


@dataclass(frozen=True, slots=True)
class UploadResult:
    """What an :func:`upload` call did, as tuples of digests, and the manifest's digest if any."""

    uploaded: tuple[str, ...]
    skipped: tuple[str, ...]
    mounted: tuple[str, ...]
    manifest_digest: str | None


async def upload(
    blobs: Iterable[Blob],
    *,
    base_url: str,
    src_dir: str | os.PathLike[str],
    repository: str = "library/_",
    concurrency: int = 32,
    progress: ProgressCallback | None = None,
    blob_progress: BlobProgressCallback | None = None,
    client: httpx.AsyncClient | None = None,
    token: str | None = None,
    get_token: GetToken | None = None,
    user_agent: str | None = None,
    stall_timeout: float = 10.0,
    logger: logging.Logger | None = None,
    manifest: bytes | None = None,
    manifest_ref: str | None = None,
    manifest_media_type: str | None = None,
    chunk_size: int | None = None,
    chunk_threshold: int = DEFAULT_CHUNK_THRESHOLD,
    head_concurrency: int = HEAD_CONCURRENCY,
    retry: RetryPolicy | None = None,
    rate_limit: float | None = None,
    max_body_streams: int | None = None,
) -> UploadResult:
    """Upload ``blobs`` from ``src_dir/sha256-<hex>`` to ``repository`` at ``base_url``, then
    push ``manifest`` (if given) once every blob is there.

    Blobs the repository already has (``HEAD``, ``head_concurrency`` at a time) are skipped,
    except that blobs under 4 MiB are not asked about when none of the first 16 is there;
    blobs with ``mount_from`` are mounted from that repository when the registry agrees. The
    others are pushed in one ``PUT``, or in ``PATCH`` chunks of ``chunk_size`` bytes when
    ``chunk_size`` is given, the blob is larger than ``chunk_threshold``, or the registry asks
    for a minimum chunk length. Without ``chunk_size``, a blob under 256 KiB goes with the
    upload's ``POST`` itself (``?digest=``), one request instead of two, where the registry
    stores it so: the first such blob finds out while the others wait, and when the registry
    opens a session instead (as the distribution registry does), that blob goes on with a
    ``PUT`` and the others with the usual ``POST`` and ``PUT``. Bodies stream from the files,
    hashed on the way: a file whose bytes do not match its digest is never committed.

    ``manifest`` is pushed as given to ``manifests/<manifest_ref>`` (its own sha256 digest by
    default) with ``manifest_media_type``, else its ``mediaType`` field, else the OCI type its
    fields make it (an index if it lists ``manifests``). Credentials, redirects, retries,
    stalls and progress work as in :func:`download`, except that once a blob's last byte is
    sent the registry may take 60 s more than ``stall_timeout``, plus a second per 20 MB, to
    answer: it may be verifying or moving the blob. Raises :class:`TransferError` (naming the
    blob or manifest), and :class:`ValueError` / :class:`TypeError` for bad arguments before
    any I/O.

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
    check_int("head_concurrency", head_concurrency)
    check_int("chunk_threshold", chunk_threshold, minimum=0)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size)
    manifest_plan = _check_manifest(manifest, manifest_ref, manifest_media_type)
    src = check_path("src_dir", src_dir)
    options = session_options(
        client=client,
        base_url=base_url,
        repository=repository,
        token=token,
        get_token=get_token,
        user_agent=user_agent,
        logger=logger,
    )
    if not todo and manifest_plan is None:
        return UploadResult((), (), (), None)
    _check_sources(src, todo)
    sources = {blob.mount_from for blob in todo if blob.mount_from is not None}
    async with open_session(
        options, concurrency=concurrency, actions="pull,push", mount_from=sources
    ) as session:
        transfer = Transfer(
            session=session,
            concurrency=concurrency,
            stall_timeout=stall_timeout,
            retry=retry or RetryPolicy(),
            rate_limit=rate_limit,
            max_body_streams=max_body_streams,
            progress=Progress(
                progress, total=sum(blob.size for blob in todo), blob_callback=blob_progress
            ),
        )
        pusher = _Pusher(transfer, src, chunk_size=chunk_size, chunk_threshold=chunk_threshold)
        present = await pusher.find_present(todo, trio.CapacityLimiter(head_concurrency))
        transfer.progress.done_already(blob for blob in todo if blob.digest in present)
        await transfer.run_each([b for b in todo if b.digest not in present], pusher.push)
        manifest_digest = None
        if manifest_plan is not None:
            await pusher.push_manifest(*manifest_plan)
            manifest_digest = manifest_plan[3]
    digests = [blob.digest for blob in todo]
    return UploadResult(
        uploaded=tuple(d for d in digests if d in pusher.uploaded),
        skipped=tuple(d for d in digests if d in present),
        mounted=tuple(d for d in digests if d in pusher.mounted),
        manifest_digest=manifest_digest,
    )


def _check_manifest(
    manifest: bytes | None, ref: str | None, media_type: str | None
) -> tuple[bytes, str, str, str] | None:
    """``(bytes, reference, media type, digest)`` of the manifest to push, or None."""
    if manifest is None:
        if ref is not None or media_type is not None:
            raise ValueError("manifest_ref and manifest_media_type need a manifest")
        return None
    if not isinstance(manifest, bytes):
        raise TypeError(f"manifest must be bytes, got {type(manifest).__name__}")
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    ref = digest if ref is None else ref
    if not isinstance(ref, str) or not (TAG_RE.fullmatch(ref) or ref == digest):
        raise ValueError(
            f"manifest_ref must be a tag or the manifest's digest {digest}, got {ref!r}"
        )
    if media_type is None:
        media_type = _media_type_of(manifest)
    if not isinstance(media_type, str) or not _MEDIA_TYPE_RE.fullmatch(media_type):
        raise ValueError(f"the manifest's media type must be type/subtype, got {media_type!r}")
    return manifest, ref, media_type, digest


def _media_type_of(manifest: bytes) -> str:
    """The manifest's own ``mediaType``, else the one :meth:`Manifest.parse` would read it as."""
    try:
        document = json.loads(manifest)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return OCI_MANIFEST
    declared = document.get("mediaType")
    return declared if isinstance(declared, str) else untyped_media_type(document)


def _check_sources(src: Path, blobs: list[Blob]) -> None:
    """Every blob's file is a readable regular file of the blob's size, or nothing is pushed."""
    for blob in blobs:
        path = src / blob.file_name
        with local_file_errors(blob.digest, path):
            fd = _open_source(path)
            try:
                info = os.fstat(fd)
            finally:
                os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LocalFileError(f"{path} is not a regular file", digest=blob.digest)
        if info.st_size != blob.size:
            raise LocalFileError(
                f"{path} has {info.st_size} bytes, the blob has {blob.size}", digest=blob.digest
            )


def _open_source(path: Path) -> int:
    """A descriptor to read ``path`` with, opened without waiting (a FIFO put there would
    otherwise hold up the event loop until a writer came), then blocking as usual."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(fd, True)
    return fd


def _with_digest(location: httpx.URL, digest: str) -> httpx.URL:
    """``location`` with ``digest=`` added to its query, which is otherwise kept as it is."""
    return httpx.URL(add_query(str(location), f"digest={digest}"))


def _session_location(
    response: httpx.Response, current: httpx.URL | None = None, *, digest: str | None = None
) -> httpx.URL:
    """Where an upload session goes on, from a POST, PATCH or status answer (``current`` when a
    PATCH answer names no new place); with ``digest``, the URL that closes it with that digest."""
    return location_target(
        response.request.url,
        response,
        headers=("location", "docker-upload-location"),
        fallback=current,
        query=None if digest is None else f"digest={digest}",
    )


def _held(response: httpx.Response) -> int:
    """How many bytes an upload session holds, from a ``Range: 0-<end>`` status answer.

    ``0-0`` is what registries say of an empty session (it could mean one byte: then the next
    PATCH is refused again, and the attempt ends after a few such rounds)."""
    match = re.fullmatch(r"\s*(?:bytes=)?0-(\d+)\s*", response.headers.get("range", ""))
    if match is None or match[1] == "0":
        return 0
    return int(match[1]) + 1


def _chunk_min_length(response: httpx.Response) -> int:
    """The registry's ``OCI-Chunk-Min-Length``, or 0 when absent or not a number."""
    value = response.headers.get("oci-chunk-min-length", "").strip()
    return int(value) if value.isascii() and value.isdigit() else 0


class _Source:
    """One blob's file during one push attempt.

    Streams of its bytes hash what they send and check the digest before the blob's last byte
    leaves, so a file that changed can never complete an upload: not the first time, and not
    when a range is sent again after a redirect, a token refresh or a 416. The hash state at the
    offset the registry acknowledged last lets a chunked upload go on from there.
    """

    def __init__(
        self,
        blob: Blob,
        path: Path,
        watch: Watch,
        counted: AttemptProgress,
        rate_limit: RateLimit | None,
    ) -> None:
        self.blob = blob
        self.rate_limit = rate_limit
        self.read_size = READ_SIZE if rate_limit is None else min(READ_SIZE, rate_limit.piece)
        self.path = path
        self.watch = watch
        self.counted = counted
        self._fd: int | None = None
        self._acked: tuple[int, Hasher] = (0, new_hasher(blob.digest))
        self._finished: tuple[int, Hasher] | None = None

    def body(
        self, start: int, end: int, *, counted: bool = True
    ) -> Callable[[], AsyncIterator[bytes]]:
        """A request body of bytes ``[start, end)``: a fresh stream each time it is sent. Its
        bytes count for the attempt's progress as they go, unless not ``counted``."""
        return lambda: _FileStream(self, start, end, counted)

    def read(self, position: int, size: int) -> bytes:
        """``size`` bytes from ``position``; the file is opened on first use."""
        with local_file_errors(self.blob.digest, self.path):
            if self._fd is None:
                self._fd = _open_source(self.path)
            data = os.pread(self._fd, size, position)
        if len(data) != size:
            raise LocalFileError(
                f"{self.path} ended at {position + len(data)} of {self.blob.size} bytes",
                digest=self.blob.digest,
            )
        return data

    def close(self) -> None:
        """Close the file, if it was opened."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def hasher_at(self, offset: int) -> Hasher:
        """A hasher that has hashed bytes ``[0, offset)``."""
        acked_offset, acked = self._acked
        if offset == acked_offset:
            return acked.copy()
        hasher = new_hasher(self.blob.digest)  # the registry holds other than what we know
        for position in range(0, offset, READ_SIZE):
            hasher.update(self.read(position, min(READ_SIZE, offset - position)))
        return hasher

    def finished(self, end: int, hasher: Hasher) -> None:
        """A stream sent everything up to ``end``, hashed by ``hasher``."""
        self._finished = (end, hasher)

    def acknowledge(self, offset: int) -> None:
        """The registry holds bytes ``[0, offset)``."""
        if self._finished is not None and self._finished[0] == offset:
            self._acked = self._finished
        else:
            self._acked = (offset, self.hasher_at(offset))

    def verify(self, hasher: Hasher | None = None) -> None:
        """Raise unless ``hasher`` (default: the acknowledged state) covers the whole file and
        matches the blob's digest."""
        offset, hasher = (self.blob.size, hasher) if hasher is not None else self._acked
        actual = hashed_digest(self.blob.digest, hasher)
        if offset != self.blob.size or actual != self.blob.digest:
            raise LocalFileError(
                f"{os.path.realpath(self.path)} does not match its digest (it hashes to {actual}): "
                + DAMAGED,
                digest=self.blob.digest,
            )


class _FileStream:
    """Bytes ``[start, end)`` of a :class:`_Source`, read a buffer at a time.

    An iterator rather than an async generator, so that a request that stops early leaves
    nothing suspended. The attempt's progress follows the position of the newest ``counted``
    stream.
    """

    def __init__(self, source: _Source, start: int, end: int, counted: bool) -> None:
        self._source = source
        self._position = start
        self._end = end
        self._counted = counted
        self._pending = 0  # bytes handed out, not yet known to be sent
        self._hasher = source.hasher_at(start)
        if counted:
            source.counted.set(start)

    def __aiter__(self) -> _FileStream:
        return self

    async def __anext__(self) -> bytes:
        source = self._source
        if self._pending:  # being asked for more means the last buffer went out
            source.watch.progress(self._pending)
            if self._counted:
                source.counted.set(self._position)
            self._pending = 0
        if self._position >= self._end:
            if self._end == source.blob.size:
                source.watch.grace = COMMIT_GRACE + source.blob.size / COMMIT_RATE
            source.finished(self._end, self._hasher)
            raise StopAsyncIteration
        chunk = source.read(self._position, min(source.read_size, self._end - self._position))
        if source.rate_limit is not None:
            await source.rate_limit.take(len(chunk), source.watch)
        self._hasher.update(chunk)
        self._position += len(chunk)
        if self._position == source.blob.size:
            source.verify(self._hasher)
        self._pending = len(chunk)
        return chunk


class _WholePosts:
    """Whether the registry stores a blob sent whole with its upload's ``POST`` (``?digest=``),
    which registries may do or not. While that is not known, one blob at a time asks, so that a
    registry that ignores the body is sent one blob in vain, not one per blob in flight."""

    def __init__(self) -> None:
        self.taken: bool | None = None
        self._answered: trio.Event | None = None  # set when the blob asking has its answer

    async def offer(self, watch: Watch) -> bool:
        """Whether to send a blob with its ``POST``. While that is not known, the caller that
        gets True asks, and must report what came of it with :meth:`answer`; the others wait,
        ``watch`` paused (they are not the registry's to judge meanwhile)."""
        while self.taken is None:
            if self._answered is None:
                self._answered = trio.Event()
                return True
            with watch.paused():
                await self._answered.wait()
        return self.taken

    def answer(self, taken: bool | None) -> None:
        """What came of a blob sent with its ``POST``: stored, not, or no answer that says
        (the request failed), in which case another blob asks."""
        if self.taken is not None:
            return
        self.taken = taken
        answered, self._answered = self._answered, None
        if answered is not None:
            answered.set()


class _Pusher:
    """Pushes the blobs of one :func:`upload` call and records what happened to each."""

    def __init__(
        self, transfer: Transfer, src: Path, *, chunk_size: int | None, chunk_threshold: int
    ) -> None:
        self.transfer = transfer
        self._session: RegistrySession = transfer.session
        self._src = src
        self._chunk_size = chunk_size
        self._chunk_threshold = chunk_threshold
        self.uploaded: set[str] = set()
        self.mounted: set[str] = set()
        self.uploads_url = self._session.url("blobs/uploads/")
        self.whole_posts = _WholePosts()

    async def find_present(self, blobs: list[Blob], limiter: trio.CapacityLimiter) -> set[str]:
        """The digests among ``blobs`` that the repository has, as far as worth asking.

        Every blob of :data:`SMALL_BLOB` bytes or more is asked about, and the first
        :data:`PROBE_COUNT` smaller ones. If none of those is there, this is taken for a first
        push and the other small blobs are pushed without asking: a first push has none to
        skip, each ``HEAD`` costs the registry about as much CPU as receiving a 64 KiB blob,
        and a wrong guess costs no more than sending a small blob it had. Otherwise the other
        small blobs are asked about too.
        """
        small = [blob for blob in blobs if blob.size < SMALL_BLOB]
        unasked = {blob.digest for blob in small[PROBE_COUNT:]}
        probed = small[:PROBE_COUNT]
        present = await self._heads([b for b in blobs if b.digest not in unasked], limiter)
        if unasked and any(blob.digest in present for blob in probed):
            present |= await self._heads([b for b in blobs if b.digest in unasked], limiter)
        return present

    async def _heads(self, blobs: list[Blob], limiter: trio.CapacityLimiter) -> set[str]:
        """The digests among ``blobs`` that the repository has, asking about each."""
        present: set[str] = set()

        async def check(blob: Blob) -> None:
            async def attempt(watch: Watch) -> None:
                if await self._exists(blob, watch):
                    present.add(blob.digest)

            await self.transfer.with_retries(blob, attempt, limiter=limiter)

        await self.transfer.run_each(blobs, check)
        return present

    async def _exists(self, blob: Blob, watch: Watch) -> bool:
        response = await self._session.request(
            "HEAD",
            self._session.url(f"blobs/{blob.digest}"),
            expect=(200, 404),
            digest=blob.digest,
            what="blob check",
            watch=watch,
        )
        return response.status_code == 200

    async def push(self, blob: Blob) -> None:
        """Mount or upload one blob, retrying as the policy allows. An attempt after a failed
        one asks first whether the blob arrived after all (its answer may be what was lost)."""
        tried = False

        async def attempt(watch: Watch) -> None:
            nonlocal tried
            if tried and await self._exists(blob, watch):
                self.transfer.progress.done_already([blob])
                self.uploaded.add(blob.digest)
                return
            tried = True
            with self.transfer.progress.attempt(blob) as counted:
                source = _Source(
                    blob, self._src / blob.file_name, watch, counted, self.transfer.rate_limit
                )
                push = _Push(self, source)
                try:
                    mounted = await push.run()
                finally:
                    source.close()
                    unfinished = push.unfinished()
                    if unfinished is not None:
                        await self._abandon(unfinished)
            (self.mounted if mounted else self.uploaded).add(blob.digest)

        await self.transfer.with_retries(blob, attempt)

    async def post_whole(self, blob: Blob, watch: Watch) -> bool:
        """Whether to send ``blob`` with its upload's ``POST``."""
        eligible = (
            blob.size < WHOLE_POST_LIMIT
            and blob.size <= self._chunk_threshold
            and not self._chunk_size
            and blob.mount_from is None
        )
        return eligible and await self.whole_posts.offer(watch)

    def chunk_size(self, blob: Blob, started: httpx.Response) -> int | None:
        """The chunk size to push ``blob`` with, or None for one PUT."""
        min_chunk = _chunk_min_length(started)
        if self._chunk_size or min_chunk or blob.size > self._chunk_threshold:
            return max(self._chunk_size or DEFAULT_CHUNK_SIZE, min_chunk)
        return None

    async def _abandon(self, location: httpx.URL) -> None:
        """Delete an unfinished upload session: best effort, shielded and short."""
        with trio.move_on_after(ABANDON_TIMEOUT, shield=True):
            try:
                await self._session.request(
                    "DELETE", location, expect=range(200, 600), digest=None, what="upload cancel"
                )
            except TransferError as exc:
                self._session.logger.debug("could not abandon upload %s: %s", location, exc)

    async def push_manifest(self, manifest: bytes, ref: str, media_type: str, digest: str) -> None:
        """PUT the manifest as given, and check the digest the registry stored it under."""

        async def attempt(watch: Watch) -> None:
            response = await self._session.request(
                "PUT",
                self._session.url(f"manifests/{ref}"),
                expect=(200, 201),
                digest=digest,
                what="manifest",
                headers={"content-type": media_type},
                body=manifest,
                watch=watch,
            )
            announced = response.headers.get("docker-content-digest", digest).strip()
            if announced != digest:  # it changed the manifest: sending it again changes nothing
                raise ProtocolError(
                    f"the registry stored the manifest as {announced}",
                    digest=digest,
                    url=str(response.request.url),
                )

        await self.transfer.with_retries(Blob(digest, len(manifest)), attempt)


class _Push:
    """One attempt at pushing one blob: a mount, or an upload session and its requests."""

    def __init__(self, pusher: _Pusher, source: _Source) -> None:
        self._pusher = pusher
        self._session = pusher._session
        self._source = source
        # The open upload session: its newest place, or the answer that names it.
        self._open: httpx.URL | httpx.Response | None = None

    async def run(self) -> bool:
        """Push the blob; True if the registry mounted it instead."""
        source, blob = self._source, self._source.blob
        url = self._pusher.uploads_url
        if blob.mount_from is not None:
            # Both are validated to URL-safe characters: sent as registries document them.
            url = url.copy_with(query=f"mount={blob.digest}&from={blob.mount_from}".encode())
        if await self._pusher.post_whole(blob, source.watch):
            started = await self._post_whole()
            if started is None:
                return False
        else:
            started = await self._request("POST", url, (201, 202), "upload start")
        if started.status_code == 201:
            source.counted.set(blob.size)
            return True
        chunk_size = self._pusher.chunk_size(blob, started)
        if chunk_size is None:
            # Parsed once, with the digest: a session's URL can be long, and parsing costs.
            url = _session_location(started, digest=blob.digest)
            self._open = started
            body: Body = source.body(0, blob.size)
        else:
            location = self._open = _session_location(started)
            location = await self._send_chunks(location, chunk_size)
            source.verify()
            source.watch.grace = COMMIT_GRACE + blob.size / COMMIT_RATE
            url, body = _with_digest(location, blob.digest), b""
        await self._request(
            "PUT",
            url,
            (201,),
            "upload",
            body=body,
            length=0 if chunk_size is not None else blob.size,
        )
        self._open = None
        return False

    async def _post_whole(self) -> httpx.Response | None:
        """Send the blob with its upload's ``POST``: None when the registry stored it, else the
        answer that opened an upload session in its place."""
        source, blob, offers = self._source, self._source.blob, self._pusher.whole_posts
        uploads_url = self._pusher.uploads_url
        asking = offers.taken is None
        taken: bool | None = None
        started: httpx.Response | None = None
        try:
            started = await self._request(
                "POST",
                _with_digest(uploads_url, blob.digest),
                (201, 202),
                "upload",
                # Counted once stored: a registry that ignores it is sent the blob again.
                body=source.body(0, blob.size, counted=False),
                length=blob.size,
            )
            taken = started.status_code == 201
        except RegistryError as exc:
            if not (asking and exc.status in _WHOLE_POST_REFUSALS):
                raise
            taken = False  # refused rather than ignored: start a session as usual
            self._session.logger.debug("whole-blob POST refused: %s", exc)
        finally:
            offers.answer(taken)
        if started is None:
            return await self._request("POST", uploads_url, (202,), "upload start")
        if taken:
            source.counted.set(blob.size)
            return None
        source.watch.grace = 0.0  # given for the POST's answer: the PUT has yet to send the blob
        return started

    def unfinished(self) -> httpx.URL | None:
        """Where the upload session is that this attempt leaves open, if it does."""
        if isinstance(self._open, httpx.Response):
            return _session_location(self._open)
        return self._open

    async def _send_chunks(self, location: httpx.URL, chunk_size: int) -> httpx.URL:
        """PATCH the blob in chunks, each to the session's newest location (returned at the
        end); after a 416, ask the session where it stands and go on from there."""
        source, size = self._source, self._source.blob.size
        offset = refusals = 0
        while offset < size:
            end = min(offset + chunk_size, size)
            response = await self._request(
                "PATCH",
                location,
                (201, 202, 416),  # 201: some registries say so, with a stale Range
                "upload chunk",
                body=source.body(offset, end),
                length=end - offset,
                extra={"content-range": f"{offset}-{end - 1}"},
            )
            if response.status_code == 416:
                refusals += 1
                if refusals > MAX_416_RECOVERIES:  # start over with a new session
                    raise RegistryError(
                        f"upload chunk refused {refusals} times with 416 Range Not Satisfiable",
                        status=416,
                        retryable=True,
                        digest=source.blob.digest,
                        url=str(location),
                    )
                status = await self._request("GET", location, (204,), "upload status")
                location = self._open = _session_location(status, location)
                offset = _held(status)
            else:
                location = self._open = _session_location(response, location)
                offset = end
            source.acknowledge(offset)
        return location

    async def _request(
        self,
        method: str,
        url: httpx.URL,
        expect: tuple[int, ...],
        what: str,
        *,
        body: Body = None,
        length: int | None = None,
        extra: dict[str, str] | None = None,
    ) -> httpx.Response:
        headers = dict(extra or {})
        if length is not None:
            headers["content-type"] = "application/octet-stream"
            headers["content-length"] = str(length)
        watch = self._source.watch
        # Only requests that carry blob bytes take one of the max_body_streams places.
        async with self._pusher.transfer.body_stream(watch) if length else nullcontext():
            return await self._session.request(
                method,
                url,
                expect=expect,
                digest=self._source.blob.digest,
                what=what,
                headers=headers,
                body=body,
                watch=watch,
            )
