"""Parallel, verified blob uploads, and the manifest that ties them together."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from ._digest import Blob, new_hasher
from ._exceptions import IntegrityError, LocalFileError, ProtocolError, TransferError
from ._monitor import Watch
from ._retry import RetryPolicy
from ._session import CLEANUP_TIMEOUT, GetToken, RegistrySession
from ._transfer import (
    Progress,
    ProgressCallback,
    Transfer,
    check_blobs,
    check_int,
    check_options,
    local_file_errors,
    open_session,
)

__all__ = ["UploadResult", "upload"]

READ_SIZE = 1024 * 1024  # bytes read from a source file at a time
DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_CHUNK_THRESHOLD = 1024 * 1024 * 1024
HEAD_CONCURRENCY = 128
DOCKER_MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST_REF_RE = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


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
) -> UploadResult:
    """Upload ``blobs`` from ``src_dir/sha256-<hex>`` to ``repository`` at ``base_url``, then
    push ``manifest`` (if given) once every blob is there.

    Blobs the repository already has (``HEAD``, ``head_concurrency`` at a time) are skipped;
    blobs with ``mount_from`` are mounted from that repository when the registry agrees. The
    others are pushed in one ``PUT``, or in ``PATCH`` chunks of ``chunk_size`` bytes when
    ``chunk_size`` is given, the blob is larger than ``chunk_threshold``, or the registry asks
    for a minimum chunk length. Bodies stream from the files, hashed on the way: a file whose
    bytes do not match its digest is never committed.

    ``manifest`` is pushed as given to ``manifests/<manifest_ref>`` (its own sha256 digest by
    default) with ``manifest_media_type``, else its ``mediaType`` field, else Docker's v2
    manifest type. Credentials, redirects, retries, stalls and progress work as in
    :func:`download`. Raises :class:`TransferError` (naming the blob or manifest), and
    :class:`ValueError` / :class:`TypeError` for bad arguments before any I/O.
    """
    todo = check_blobs(blobs)
    check_options(concurrency=concurrency, stall_timeout=stall_timeout)
    check_int("head_concurrency", head_concurrency)
    check_int("chunk_threshold", chunk_threshold, minimum=0)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size)
    manifest_plan = _check_manifest(manifest, manifest_ref, manifest_media_type)
    if not todo and manifest_plan is None:
        return UploadResult((), (), (), None)
    src = Path(src_dir)
    _check_sources(src, todo)
    async with open_session(
        client=client,
        base_url=base_url,
        repository=repository,
        concurrency=concurrency,
        token=token,
        get_token=get_token,
        user_agent=user_agent,
        logger=logger,
        actions="pull,push",
    ) as session:
        transfer = Transfer(
            session=session,
            concurrency=concurrency,
            stall_timeout=stall_timeout,
            retry=retry or RetryPolicy(),
            progress=Progress(progress, total=sum(blob.size for blob in todo)),
        )
        pusher = _Pusher(transfer, src, chunk_size=chunk_size, chunk_threshold=chunk_threshold)
        present = await pusher.find_present(todo, trio.CapacityLimiter(head_concurrency))
        transfer.progress.add(sum(blob.size for blob in todo if blob.digest in present))
        await transfer.run_each([b for b in todo if b.digest not in present], pusher.push)
        manifest_digest = None
        if manifest_plan is not None:
            manifest_digest = await pusher.push_manifest(*manifest_plan)
    digests = [blob.digest for blob in todo]
    return UploadResult(
        uploaded=tuple(d for d in digests if d in pusher.uploaded),
        skipped=tuple(d for d in digests if d in present),
        mounted=tuple(d for d in digests if d in pusher.mounted),
        manifest_digest=manifest_digest,
    )


def _check_manifest(
    manifest: bytes | None, ref: str | None, media_type: str | None
) -> tuple[bytes, str, str] | None:
    """``(bytes, reference, media type)`` of the manifest to push, or None; checks arguments."""
    if manifest is None:
        if ref is not None or media_type is not None:
            raise ValueError("manifest_ref and manifest_media_type need a manifest")
        return None
    if not isinstance(manifest, bytes):
        raise TypeError(f"manifest must be bytes, got {type(manifest).__name__}")
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    ref = digest if ref is None else ref
    if not isinstance(ref, str) or not (_TAG_RE.fullmatch(ref) or _DIGEST_REF_RE.fullmatch(ref)):
        raise ValueError(f"manifest_ref must be a tag or a digest, got {ref!r}")
    if ref.startswith("sha") and ":" in ref and ref != digest:
        raise ValueError(f"manifest_ref {ref} is not the manifest's digest {digest}")
    if media_type is None:
        media_type = _declared_media_type(manifest) or DOCKER_MANIFEST_V2
    if not isinstance(media_type, str) or not media_type or "\n" in media_type:
        raise ValueError(f"manifest_media_type must be a media type, got {media_type!r}")
    return manifest, ref, media_type


def _declared_media_type(manifest: bytes) -> str | None:
    try:
        declared = json.loads(manifest).get("mediaType")
    except (ValueError, AttributeError):
        return None
    return declared if isinstance(declared, str) and declared else None


def _check_sources(src: Path, blobs: list[Blob]) -> None:
    """Every blob's file exists with the blob's size, or nothing is pushed."""
    for blob in blobs:
        path = src / blob.file_name
        with local_file_errors(blob.digest, path):
            size = path.stat().st_size
        if size != blob.size:
            raise LocalFileError(
                f"{path} has {size} bytes, the blob has {blob.size}", digest=blob.digest
            )


def _with_digest(location: httpx.URL, digest: str) -> httpx.URL:
    """``location`` with ``digest=`` added to its query, which is otherwise kept as it is."""
    url = str(location)
    return httpx.URL(f"{url}{'&' if location.query else '?'}digest={digest}")


def _upload_location(
    response: httpx.Response, digest: str, current: httpx.URL | None = None
) -> httpx.URL:
    """Where an upload session continues, from a POST, PATCH or status answer; ``current``
    when the answer names no new place."""
    location = response.headers.get("location") or response.headers.get("docker-upload-location")
    if not location and current is not None:
        return current
    if not location:
        raise ProtocolError(
            f"upload answer {response.status_code} without a Location",
            digest=digest,
            url=str(response.request.url),
        )
    return response.request.url.join(location)


def _range_end(response: httpx.Response) -> int | None:
    """The last byte offset a ``Range: 0-<end>`` answer says the registry holds, if any."""
    match = re.fullmatch(r"\s*(?:bytes=)?0-(\d+)\s*", response.headers.get("range", ""))
    return int(match[1]) if match else None


class _FileBody:
    """The request body of one blob's upload: its file's bytes, hashed on the way.

    :meth:`part` picks the range the next request sends; calling the body makes a fresh stream
    of that range (again after a redirect or a token refresh). Bytes are hashed once, in order,
    and when the last byte of the blob has been hashed the digest is checked before that byte
    leaves, so a file that changed can never complete an upload. Bytes sent count for progress
    until :meth:`rollback` takes back those not :meth:`commit`-ted.
    """

    def __init__(self, transfer: Transfer, blob: Blob, path: Path, watch: Watch) -> None:
        self.blob = blob
        self.path = path
        self._transfer = transfer
        self._watch = watch
        self._hasher = new_hasher(blob.digest)
        self._hashed = 0  # bytes [0, _hashed) went into the hasher
        self._counted = 0  # bytes reported to progress and not committed yet
        self._range = (0, 0)

    def part(self, offset: int, length: int) -> _FileBody:
        """Send ``length`` bytes from ``offset`` in the next requests."""
        self._range = (offset, offset + length)
        return self

    def __call__(self) -> AsyncIterator[bytes]:
        self.rollback()
        return _FileStream(self, *self._range)

    def sent(self, nbytes: int) -> None:
        """``nbytes`` more went out."""
        self._watch.progress(nbytes)
        self._counted += nbytes
        self._transfer.progress.add(nbytes)

    def commit(self) -> None:
        """The registry accepted what was sent: it stays counted."""
        self._counted = 0

    def rollback(self) -> None:
        """Take back the progress of bytes sent since the last commit."""
        if self._counted:
            self._transfer.progress.add(-self._counted)
            self._counted = 0

    def hash(self, position: int, chunk: bytes) -> None:
        """Hash the part of ``chunk`` (read at ``position``) not hashed yet."""
        skip = self._hashed - position
        if skip < len(chunk):
            self._hasher.update(memoryview(chunk)[max(skip, 0) :])
            self._hashed = position + len(chunk)
            if self._hashed == self.blob.size:
                self.verify()

    def verify(self) -> None:
        """Raise unless the whole file was hashed and matches the blob's digest."""
        blob = self.blob
        actual = f"{blob.digest.partition(':')[0]}:{self._hasher.hexdigest()}"
        if self._hashed != blob.size or actual != blob.digest:
            raise LocalFileError(
                f"{self.path} does not match its digest (it hashes to {actual}): "
                "the file changed or is corrupt",
                digest=blob.digest,
            )


class _FileStream:
    """Bytes ``[start, end)`` of a blob's file, read a buffer at a time.

    An iterator rather than an async generator, so that a request that stops early leaves
    nothing suspended; the file is closed at the end, on error, or when the stream is dropped.
    """

    def __init__(self, body: _FileBody, start: int, end: int) -> None:
        self._body = body
        self._position = start
        self._end = end
        self._pending = 0  # bytes handed out and not yet known to be sent
        with local_file_errors(body.blob.digest, body.path):
            self._file = body.path.open("rb", buffering=0)
            self._file.seek(start)

    def __aiter__(self) -> _FileStream:
        return self

    async def __anext__(self) -> bytes:
        # Being asked for more means the previous buffer went out.
        if self._pending:
            self._body.sent(self._pending)
            self._pending = 0
        if self._position >= self._end:
            self._file.close()
            raise StopAsyncIteration
        body = self._body
        try:
            with local_file_errors(body.blob.digest, body.path):
                chunk = self._file.read(min(READ_SIZE, self._end - self._position))
            if not chunk:
                raise LocalFileError(
                    f"{body.path} ended at {self._position} of {body.blob.size} bytes",
                    digest=body.blob.digest,
                )
            body.hash(self._position, chunk)
        except BaseException:
            self._file.close()
            raise
        self._position += len(chunk)
        self._pending = len(chunk)
        return chunk


class _Pusher:
    """Pushes the blobs of one :func:`upload` call and records what happened to each."""

    def __init__(
        self, transfer: Transfer, src: Path, *, chunk_size: int | None, chunk_threshold: int
    ) -> None:
        self._transfer = transfer
        self._session: RegistrySession = transfer.session
        self._src = src
        self._chunk_size = chunk_size
        self._chunk_threshold = chunk_threshold
        self.uploaded: set[str] = set()
        self.mounted: set[str] = set()

    async def find_present(self, blobs: list[Blob], limiter: trio.CapacityLimiter) -> set[str]:
        """The digests among ``blobs`` that the repository already has."""
        present: set[str] = set()

        async def check(blob: Blob) -> None:
            async def attempt(watch: Watch) -> None:
                response = await self._session.request(
                    "HEAD",
                    self._session.url(f"blobs/{blob.digest}"),
                    expect=(200, 404),
                    digest=blob.digest,
                    what="blob check",
                    watch=watch,
                )
                if response.status_code == 200:
                    present.add(blob.digest)

            await self._transfer.with_retries(blob, attempt, limiter=limiter)

        await self._transfer.run_each(blobs, check)
        return present

    async def push(self, blob: Blob) -> None:
        """Mount or upload one blob, retrying as the policy allows."""

        async def attempt(watch: Watch) -> None:
            await self._attempt(blob, watch)

        await self._transfer.with_retries(blob, attempt)

    async def _attempt(self, blob: Blob, watch: Watch) -> None:
        body = _FileBody(self._transfer, blob, self._src / blob.file_name, watch)
        location: httpx.URL | None = None
        try:
            started = await self._start(blob, watch)
            if started.status_code == 201:
                self.mounted.add(blob.digest)
                self._transfer.progress.add(blob.size)
                return
            location = _upload_location(started, blob.digest)
            min_chunk = int(started.headers.get("oci-chunk-min-length", "0") or 0)
            if self._chunk_size or min_chunk or blob.size > self._chunk_threshold:
                chunk = max(self._chunk_size or DEFAULT_CHUNK_SIZE, min_chunk)
                location = await self._send_chunks(blob, body, location, chunk, watch)
                body.verify()
                await self._put(blob, _with_digest(location, blob.digest), b"", 0, watch)
            else:
                await self._put(
                    blob,
                    _with_digest(location, blob.digest),
                    body.part(0, blob.size),
                    blob.size,
                    watch,
                )
            location = None
            body.commit()
            self.uploaded.add(blob.digest)
        finally:
            body.rollback()
            if location is not None:
                await self._abandon(location)

    async def _start(self, blob: Blob, watch: Watch) -> httpx.Response:
        """POST a new upload session, or a mount when the blob names a source repository."""
        url = self._session.url("blobs/uploads/")
        expect: tuple[int, ...] = (202,)
        if blob.mount_from is not None:
            # Both are validated to URL-safe characters: sent as registries document them.
            url = url.copy_with(query=f"mount={blob.digest}&from={blob.mount_from}".encode())
            expect = (201, 202)
        return await self._session.request(
            "POST", url, expect=expect, digest=blob.digest, what="upload start", watch=watch
        )

    async def _put(
        self, blob: Blob, url: httpx.URL, body: _FileBody | bytes, length: int, watch: Watch
    ) -> None:
        await self._session.request(
            "PUT",
            url,
            expect=(201,),
            digest=blob.digest,
            what="upload",
            headers={"content-type": "application/octet-stream", "content-length": str(length)},
            body=body,
            watch=watch,
        )

    async def _send_chunks(
        self, blob: Blob, body: _FileBody, location: httpx.URL, chunk: int, watch: Watch
    ) -> httpx.URL:
        """PATCH the blob in chunks to the newest Location; returns where to close it."""
        session = self._session
        offset = 0
        while offset < blob.size:
            length = min(chunk, blob.size - offset)
            response = await session.request(
                "PATCH",
                location,
                expect=(201, 202, 416),
                digest=blob.digest,
                what="upload chunk",
                headers={
                    "content-type": "application/octet-stream",
                    "content-length": str(length),
                    "content-range": f"{offset}-{offset + length - 1}",
                },
                body=body.part(offset, length),
                watch=watch,
            )
            if response.status_code == 416:
                body.rollback()
                location, held = await self._upload_status(blob, location, watch)
                self._transfer.progress.add(held - offset)  # the registry holds more, or less
                offset = held
                continue
            body.commit()  # 202, or a 201 (some registries answer so, with a stale Range)
            location = _upload_location(response, blob.digest, location)
            offset += length
        return location

    async def _upload_status(
        self, blob: Blob, location: httpx.URL, watch: Watch
    ) -> tuple[httpx.URL, int]:
        """Ask where an upload session stands (after a 416): its Location and next offset."""
        response = await self._session.request(
            "GET", location, expect=(204,), digest=blob.digest, what="upload status", watch=watch
        )
        end = _range_end(response)
        return _upload_location(response, blob.digest, location), 0 if end is None else end + 1

    async def _abandon(self, location: httpx.URL) -> None:
        """Delete an unfinished upload session: best effort, shielded and short."""
        with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
            try:
                await self._session.request(
                    "DELETE", location, expect=range(200, 600), digest=None, what="upload cancel"
                )
            except TransferError as exc:
                self._session.logger.debug("could not abandon upload %s: %s", location, exc)

    async def push_manifest(self, manifest: bytes, ref: str, media_type: str) -> str:
        """PUT the manifest as given; returns its digest, checked against the registry's."""
        blob = Blob.from_bytes(manifest)

        async def attempt(watch: Watch) -> None:
            response = await self._session.request(
                "PUT",
                self._session.url(f"manifests/{ref}"),
                expect=(200, 201),
                digest=blob.digest,
                what="manifest",
                headers={"content-type": media_type},
                body=manifest,
                watch=watch,
            )
            announced = response.headers.get("docker-content-digest")
            if announced is not None and announced.strip() != blob.digest:
                raise IntegrityError(
                    f"registry stored the manifest as {announced.strip()}",
                    digest=blob.digest,
                    url=str(response.request.url),
                )

        await self._transfer.with_retries(blob, attempt)
        return blob.digest
