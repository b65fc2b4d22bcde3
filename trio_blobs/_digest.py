"""Content digests, the blobs they name, and the file names blobs are stored under."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

from ._protocol import check_repository

__all__ = ["Blob", "digest_to_path", "path_to_digest"]

# algorithm -> number of lowercase hex characters in its encoded form
_ALGORITHMS = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"(sha256):([0-9a-f]{64})|(sha512):([0-9a-f]{128})")
_PATH_RE = re.compile(r"(sha256)-([0-9a-f]{64})|(sha512)-([0-9a-f]{128})")
_EMPTY = {name: f"{name}:{hashlib.new(name).hexdigest()}" for name in _ALGORITHMS}


class Hasher(Protocol):
    """The part of a :mod:`hashlib` object that transfers use."""

    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...
    def copy(self) -> Hasher: ...


def _split(pattern: re.Pattern[str], value: object, what: str) -> tuple[str, str]:
    match = pattern.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            f"{value!r} is not a valid {what}: expected sha256 with 64 or sha512 with "
            "128 lowercase hex characters"
        )
    algorithm, hex_ = (g for g in match.groups() if g is not None)
    return algorithm, hex_


def check_digest(digest: object) -> str:
    """Return ``digest`` if it is a well-formed digest, else raise :class:`ValueError`."""
    algorithm, hex_ = _split(_DIGEST_RE, digest, "digest")
    return f"{algorithm}:{hex_}"


def digest_to_path(digest: str) -> str:
    """Map ``sha256:<hex>`` to the file name ``sha256-<hex>``.

    The result is always a single, safe path component. Anything that is not a valid
    digest raises :class:`ValueError`, so no caller input can ever become a path.
    """
    algorithm, hex_ = _split(_DIGEST_RE, digest, "digest")
    return f"{algorithm}-{hex_}"


def path_to_digest(name: str) -> str:
    """Map a file name ``sha256-<hex>`` back to ``sha256:<hex>``; see :func:`digest_to_path`."""
    algorithm, hex_ = _split(_PATH_RE, name, "blob file name")
    return f"{algorithm}:{hex_}"


def new_hasher(digest: str) -> Hasher:
    """A fresh hash object of the algorithm ``digest`` names."""
    return hashlib.new(digest.partition(":")[0])


def hashed_digest(digest: str, hasher: Hasher) -> str:
    """What ``hasher`` (made by :func:`new_hasher` for ``digest``) has hashed, as a digest."""
    return f"{digest.partition(':')[0]}:{hasher.hexdigest()}"


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    """The digest of ``data`` (``sha256:<hex>`` by default)."""
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


@dataclass(frozen=True, slots=True)
class Blob:
    """A blob to transfer: its digest, its size in bytes, and maybe a repository to mount it from.

    Construction validates: a malformed digest, a negative size, or size 0 with a digest other
    than that of no bytes raises :class:`ValueError`.
    """

    digest: str
    size: int
    mount_from: str | None = None

    def __post_init__(self) -> None:
        check_digest(self.digest)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"blob size must be a non-negative int, got {self.size!r}")
        empty = _EMPTY[self.digest.partition(":")[0]]
        if self.size == 0 and self.digest != empty:
            raise ValueError(f"size 0 means no bytes, whose digest is {empty}, not {self.digest}")
        if self.mount_from is not None:
            try:
                check_repository(self.mount_from)
            except ValueError as exc:
                raise ValueError(f"mount_from: {exc}") from None

    @property
    def file_name(self) -> str:
        """The name this blob is stored under in a directory: ``sha256-<hex>``."""
        algorithm, _, hex_ = self.digest.partition(":")  # checked when the blob was made
        return f"{algorithm}-{hex_}"

    @classmethod
    def from_bytes(cls, data: bytes, *, algorithm: str = "sha256") -> Blob:
        """The blob that ``data`` is."""
        return cls(compute_digest(data, algorithm), len(data))
