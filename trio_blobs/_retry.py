"""When to retry a failed attempt, and how long to wait first."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ._exceptions import (
    ConnectionFailedError,
    IntegrityError,
    RegistryError,
    RetriesExhaustedError,
    SlowTransferError,
    StallError,
    TransferError,
)

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """How often, and after how long, a failed blob transfer is tried again.

    Connection errors, truncated or corrupt bodies and the statuses 408, 429 and 5xx are retried,
    up to ``max_attempts`` attempts in all. Attempt ``n`` waits ``n^2 x base_delay`` seconds,
    jittered by x0.5-1.5 and capped at ``2**(n-1)`` seconds, unless the registry sent
    ``Retry-After``, which is honoured up to ``max_retry_after`` seconds. Stalled attempts do not
    use up the budget, but ``max_stalls`` stalls in a row end it; attempts cut off for being slow
    count only after ``free_slow_retries`` of them.
    """

    max_attempts: int = 6
    base_delay: float = 0.01
    max_retry_after: float = 60.0
    max_stalls: int = 10
    free_slow_retries: int = 3

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.max_stalls < 1 or self.free_slow_retries < 0:
            raise ValueError("max_attempts and max_stalls must be >= 1, free_slow_retries >= 0")
        if not (self.base_delay >= 0 and self.max_retry_after >= 0):
            raise ValueError("base_delay and max_retry_after must be numbers of seconds >= 0")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """The jittered delay after the ``attempt``-th failure (1-based)."""
        jitter = (rng or random).uniform(0.5, 1.5)
        return min(attempt * attempt * self.base_delay * jitter, 2.0 ** (attempt - 1))


def is_retryable(error: TransferError) -> bool:
    """Whether another attempt may succeed where this one failed."""
    if isinstance(error, RegistryError):
        return error.retryable
    return isinstance(
        error, ConnectionFailedError | IntegrityError | StallError | SlowTransferError
    )


class AttemptBudget:
    """Counts one blob's failed attempts and decides whether, and when, to try again."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self.attempts = 0  # every attempt made, stalled ones included
        self._counted = 0  # failures that use up the budget
        self._stalls_in_row = 0
        self._slow = 0

    def after_failure(self, error: TransferError) -> float:
        """Record a failed attempt; return the delay before the next one.

        Raises ``error`` itself when it is not retryable, and :class:`RetriesExhaustedError`
        (caused by ``error``) when the budget is used up.
        """
        self.attempts += 1
        if not is_retryable(error):
            raise error
        policy = self._policy
        if isinstance(error, StallError):
            self._stalls_in_row += 1
            if self._stalls_in_row >= policy.max_stalls:
                raise RetriesExhaustedError(error, attempts=self.attempts) from error
            return policy.backoff(self._stalls_in_row)
        self._stalls_in_row = 0
        if isinstance(error, SlowTransferError):
            self._slow += 1
            if self._slow <= policy.free_slow_retries:
                return policy.backoff(1)
        self._counted += 1
        if self._counted >= policy.max_attempts:
            raise RetriesExhaustedError(error, attempts=self.attempts) from error
        retry_after = error.retry_after if isinstance(error, RegistryError) else None
        if retry_after is not None:
            return min(retry_after, policy.max_retry_after)
        return policy.backoff(self._counted)
