"""Retry decisions and backoff, as tables of failures and expected outcomes."""

import random

import pytest

from trio_blobs import (
    AuthenticationError,
    ConnectionFailedError,
    IntegrityError,
    LocalFileError,
    ProtocolError,
    RegistryError,
    RetriesExhaustedError,
    RetryPolicy,
    SlowTransferError,
    StallError,
    TransferError,
)
from trio_blobs._retry import AttemptBudget

D = "sha256:" + "a" * 64


def status(code: int, retry_after: float | None = None) -> RegistryError:
    return RegistryError(
        f"status {code}",
        status=code,
        retry_after=retry_after,
        retryable=code in (408, 429) or code >= 500,
        digest=D,
    )


@pytest.mark.parametrize(
    "error",
    [
        status(400),
        status(403),
        status(404),
        status(405),
        AuthenticationError("401", status=401),
        ProtocolError("too many redirects"),
        LocalFileError("disk full"),
    ],
)
def test_permanent_errors_fail_at_once(error: TransferError) -> None:
    budget = AttemptBudget(RetryPolicy())
    with pytest.raises(type(error)) as caught:
        budget.after_failure(error)
    assert caught.value is error


@pytest.mark.parametrize(
    "error",
    [
        status(408),
        status(429),
        status(500),
        status(501),
        status(503),
        status(505),
        status(599),
        ConnectionFailedError("reset", digest=D),
        IntegrityError("digest mismatch", digest=D),
    ],
)
def test_retryable_errors_get_six_attempts(error: TransferError) -> None:
    budget = AttemptBudget(RetryPolicy())
    for _ in range(5):
        assert budget.after_failure(error) >= 0
    with pytest.raises(RetriesExhaustedError) as caught:
        budget.after_failure(error)
    assert caught.value.last_error is error
    assert caught.value.__cause__ is error
    assert caught.value.attempts == 6
    assert caught.value.digest == D


def test_backoff_is_quadratic_jittered_and_capped() -> None:
    policy = RetryPolicy()
    rng = random.Random(1)
    for attempt in range(1, 12):
        base = attempt * attempt * 0.01
        for _ in range(50):
            delay = policy.backoff(attempt, rng)
            assert min(0.5 * base, 2 ** (attempt - 1)) <= delay
            assert delay <= min(1.5 * base, 2 ** (attempt - 1))
    assert len({policy.backoff(2, rng) for _ in range(20)}) == 20  # jittered, not fixed
    # the cap binds once n² x 10 ms x jitter passes 2^(n-1) s
    assert RetryPolicy(base_delay=10.0).backoff(3) == 4.0


def test_retry_after_is_honoured_and_capped() -> None:
    budget = AttemptBudget(RetryPolicy())
    assert budget.after_failure(status(429, retry_after=7)) == 7
    assert budget.after_failure(status(503, retry_after=3600)) == 60
    assert RetryPolicy(max_retry_after=5).max_retry_after == 5


def test_stalls_do_not_use_the_budget_but_ten_in_a_row_end_it() -> None:
    budget = AttemptBudget(RetryPolicy())
    stall = StallError("stalled", digest=D)
    for _ in range(9):
        assert budget.after_failure(stall) > 0
    budget.after_failure(ConnectionFailedError("reset"))  # breaks the run of stalls
    for _ in range(9):
        budget.after_failure(stall)
    with pytest.raises(RetriesExhaustedError) as caught:
        budget.after_failure(stall)
    assert caught.value.last_error is stall


def test_slow_attempts_count_only_after_three() -> None:
    budget = AttemptBudget(RetryPolicy())
    slow = SlowTransferError("slow", digest=D)
    for _ in range(3 + 5):
        budget.after_failure(slow)
    with pytest.raises(RetriesExhaustedError):
        budget.after_failure(slow)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"max_stalls": 0}, {"free_slow_retries": -1}, {"base_delay": -1.0}],
)
def test_retry_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_retry_policy_refuses_delays_that_are_not_numbers() -> None:
    with pytest.raises(ValueError, match="base_delay and max_retry_after"):
        RetryPolicy(base_delay=float("nan"))
