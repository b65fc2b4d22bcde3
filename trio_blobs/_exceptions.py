"""The errors trio_blobs raises.

Every failure of a transfer is a :class:`TransferError`; it names the blob (``digest``) and the
URL it concerns where there is one, and keeps the underlying error as ``__cause__``::

    TransferError
    ├── RegistryError            the registry (or its storage) answered with an error status
    │   └── AuthenticationError  a 401 that no (new) token could resolve
    ├── ProtocolError            a response no client should accept (bad redirect, no Location)
    ├── IntegrityError           the bytes are not the blob: wrong size or wrong digest
    ├── StallError               no bytes arrived for ``stall_timeout`` seconds
    ├── SlowTransferError        the transfer ran far below the recent median rate
    ├── ConnectionFailedError    the connection failed or dropped (``__cause__`` is httpx's error)
    ├── LocalFileError           reading or writing a local file failed (disk full, permissions)
    ├── PlatformNotFoundError    an index has no image for the platform asked for
    └── RetriesExhaustedError    every attempt failed; ``last_error`` is the final one

``trio.Cancelled`` and ``KeyboardInterrupt`` are never wrapped.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ConnectionFailedError",
    "IntegrityError",
    "LocalFileError",
    "ProtocolError",
    "RegistryError",
    "RetriesExhaustedError",
    "SlowTransferError",
    "StallError",
    "TransferError",
]


class TransferError(Exception):
    """Root of all trio_blobs errors.

    ``digest`` is the blob concerned (None for errors that concern no single blob) and ``url``
    the last URL involved, if any.
    """

    def __init__(self, message: str, *, digest: str | None = None, url: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.digest = digest
        self.url = url

    def __str__(self) -> str:
        prefix = f"{self.digest}: " if self.digest else ""
        suffix = f" ({self.url})" if self.url else ""
        return f"{prefix}{self.message}{suffix}"

    def __reduce__(self) -> tuple[object, ...]:
        # For copy and pickle, whatever the subclass's __init__ asks for: the same attributes.
        return (_rebuilt, (type(self), self.args), self.__dict__)


class RegistryError(TransferError):
    """The registry, or the storage it redirected to, answered with an error status.

    ``status`` is the HTTP status; ``code``, ``error_message`` and ``detail`` come from the
    registry's JSON error body when it had one. ``retryable`` says whether another attempt may
    succeed (408, 429, 5xx); ``retry_after`` is the delay the registry asked for, if any. Raised
    to the caller, it is final: retryable ones arrive as ``RetriesExhaustedError.last_error``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str | None = None,
        error_message: str | None = None,
        detail: object = None,
        retry_after: float | None = None,
        retryable: bool = False,
        digest: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message, digest=digest, url=url)
        self.status = status
        self.code = code
        self.error_message = error_message
        self.detail = detail
        self.retry_after = retry_after
        self.retryable = retryable


class AuthenticationError(RegistryError):
    """Access was refused (401) and no token, or no newer token, was accepted."""


class ProtocolError(TransferError):
    """A response no client should accept: too many redirects, https to http, a missing Location."""


class IntegrityError(TransferError):
    """The bytes received are not the blob: the size or the digest does not match."""


class StallError(TransferError):
    """No bytes (or no response) for ``stall_timeout`` seconds."""


class SlowTransferError(TransferError):
    """The transfer ran below 10% of the median rate of recent transfers."""


class ConnectionFailedError(TransferError):
    """The connection could not be made or was lost; ``__cause__`` is the httpx error."""


class LocalFileError(TransferError):
    """A local file could not be read or written (disk full, permissions); not retried."""


class RetriesExhaustedError(TransferError):
    """Every attempt failed with a retryable error; ``last_error`` is the last one."""

    def __init__(self, last_error: TransferError, *, attempts: int) -> None:
        super().__init__(
            f"gave up after {attempts} attempts: {last_error.message}",
            digest=last_error.digest,
            url=last_error.url,
        )
        self.last_error = last_error
        self.attempts = attempts


def _rebuilt(kind: type[TransferError], args: tuple[object, ...]) -> TransferError:
    return kind.__new__(kind, *args)
