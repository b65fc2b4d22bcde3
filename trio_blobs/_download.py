"""Parallel, verified blob downloads."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx

from ._digest import Blob, hashed_digest, new_hasher
from ._exceptions import IntegrityError, LocalFileError
from ._monitor import Watch
from ._protocol import check_announced_digest
from ._retry import RetryPolicy
from ._session import GetToken
from ._transfer import (
    BlobProgressCallback,
    Progress,
    ProgressCallback,
    Transfer,
    check_blobs,
    check_options,
    local_file_errors,
    open_session,
)

__all__ = ["DownloadResult", "download"]

_BLOB_HEADERS = {"accept-encoding": "identity"}


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
) -> DownloadResult:
    """Download ``blobs`` from ``repository`` at ``base_url`` into ``dest_dir``, in parallel.

    Each blob is streamed into a temporary file beside its final name ``sha256-<hex>``, hashed as
    it arrives, and renamed only once its size and digest match. A blob whose file already has
    the right size is skipped without a request. At most ``concurrency`` requests are in flight.

    ``client`` is an :class:`httpx.AsyncClient` you own (for proxies, CAs, limits); redirects are
    always followed here, never by httpx, and ``Authorization`` (from ``token``, or from
    ``await get_token(challenge)`` after a 401) is only ever sent to ``base_url``'s origin.
    ``progress(completed, total)`` is called as bytes arrive, and ``blob_progress(blob, done)``
    with each blob's own count (``blob.size`` once it is done). An attempt that receives nothing
    for ``stall_timeout`` seconds, or crawls far below recent transfers, is cancelled and retried
    as ``retry`` (a :class:`RetryPolicy`) allows.

    Raises :class:`TransferError` (naming the blob) when a blob cannot be fetched, and
    :class:`ValueError` / :class:`TypeError` for bad arguments, before any I/O.
    """
    todo = check_blobs(blobs)
    check_options(concurrency=concurrency, stall_timeout=stall_timeout)
    if not todo:
        return DownloadResult((), ())
    dest = Path(dest_dir)
    digests = [blob.digest for blob in todo]
    async with open_session(
        client=client,
        base_url=base_url,
        repository=repository,
        concurrency=concurrency,
        token=token,
        get_token=get_token,
        user_agent=user_agent,
        logger=logger,
        actions="pull",
    ) as session:
        present = _prepare(dest, todo)
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
        )

        async def fetch(blob: Blob) -> None:
            await transfer.with_retries(blob, lambda watch: _attempt(transfer, blob, dest, watch))

        await transfer.run_each(todo, fetch)
    return DownloadResult(
        downloaded=tuple(d for d in digests if d not in present),
        skipped=tuple(d for d in digests if d in present),
    )


def _prepare(dest: Path, blobs: list[Blob]) -> set[str]:
    """Create ``dest`` if needed; return the digests of blobs already there with the right size.

    Raises :class:`LocalFileError` when the others cannot fit in the space free there.
    """
    with local_file_errors(None, dest):
        if dest.exists() and not dest.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "dest_dir is not a directory")
        dest.mkdir(parents=True, exist_ok=True)
    present = set()
    for blob in blobs:
        path = dest / blob.file_name
        with local_file_errors(blob.digest, path):
            try:
                if path.stat().st_size == blob.size:
                    present.add(blob.digest)
            except FileNotFoundError:
                pass
    needed = sum(blob.size for blob in blobs if blob.digest not in present)
    with local_file_errors(None, dest):
        free = shutil.disk_usage(dest).free
    if needed > free:
        raise LocalFileError(
            f"{dest} has {free:,} bytes free; the blobs still to fetch need {needed:,}"
        )
    return present


async def _attempt(transfer: Transfer, blob: Blob, dest: Path, watch: Watch) -> None:
    """One GET of ``blob`` streamed into a verified file; a failure rolls its progress back."""
    session = transfer.session
    with transfer.progress.attempt(blob) as counted:
        async with session.stream(
            "GET",
            session.url(f"blobs/{blob.digest}"),
            expect=(200,),
            digest=blob.digest,
            what="blob",
            headers=_BLOB_HEADERS,
            watch=watch,
        ) as response:
            _check_length(blob, response)
            check_announced_digest(response, blob.digest)
            with _PartialFile(dest, blob) as partial:
                async for chunk in response.aiter_raw():
                    partial.write(chunk)
                    watch.progress(len(chunk))
                    counted.add(len(chunk))
                partial.commit()


def _check_length(blob: Blob, response: httpx.Response) -> None:
    """Reject a response whose Content-Length already says it is not this blob."""
    length = response.headers.get("content-length")
    if length is not None and length.strip() != str(blob.size):
        raise IntegrityError(
            f"server announced {length.strip()} bytes, the blob has {blob.size}",
            digest=blob.digest,
            url=str(response.request.url),
        )


class _PartialFile:
    """A blob being written: a hidden temporary file beside its final name, hashed as it grows.

    :meth:`commit` renames it to its final name after checking size and digest; leaving the
    ``with`` block any other way removes it.
    """

    def __init__(self, dest: Path, blob: Blob) -> None:
        self._blob = blob
        self._final = dest / blob.file_name
        self._hasher = new_hasher(blob.digest)
        self._received = 0
        with local_file_errors(blob.digest, dest):
            fd, name = tempfile.mkstemp(dir=dest, prefix=f".{blob.file_name}.", suffix=".partial")
        self._path = Path(name)
        self._file = os.fdopen(fd, "wb")

    def __enter__(self) -> _PartialFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._file.closed:
            self._file.close()
        self._path.unlink(missing_ok=True)

    def write(self, chunk: bytes) -> None:
        """Hash and write ``chunk``; a body that outgrows the blob is refused unwritten."""
        if self._received + len(chunk) > self._blob.size:
            raise IntegrityError(
                f"body is longer than the blob's {self._blob.size} bytes", digest=self._blob.digest
            )
        self._hasher.update(chunk)
        with local_file_errors(self._blob.digest, self._path):
            self._file.write(chunk)
        self._received += len(chunk)

    def commit(self) -> None:
        """Verify size and digest, then give the file its final name."""
        blob = self._blob
        if self._received != blob.size:
            raise IntegrityError(
                f"body ended after {self._received} of {blob.size} bytes", digest=blob.digest
            )
        actual = hashed_digest(blob.digest, self._hasher)
        if actual != blob.digest:
            raise IntegrityError(f"content has digest {actual}", digest=blob.digest)
        with local_file_errors(blob.digest, self._path):
            self._file.close()
            os.replace(self._path, self._final)
