"""One retry policy for transient errors: exponential backoff with jitter, bounded in time.

It takes a ``RetryPolicy`` (or anything carrying the three retry settings, which it reads as one).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from sidecar.policy import RetryPolicy, RetrySettings

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["RetryPolicy", "RetrySettings", "call_with_retries", "retry_log_extra", "retrying"]

# What the retry lines name besides the error (the job being worked on): set per task, so each job's
# generation and finishing task has its own.
_log_extra: ContextVar[dict[str, Any]] = ContextVar("sidecar_retry_log_extra", default={})  # noqa: B039


@contextmanager
def retry_log_extra(**extra: Any) -> Iterator[None]:
    """Within this block (and the tasks it starts), retry log lines carry ``extra`` (``job_id=...``)."""
    token = _log_extra.set({**_log_extra.get(), **extra})
    try:
        yield
    finally:
        _log_extra.reset(token)


def _extra(error: BaseException | None) -> dict[str, Any]:
    return {**_log_extra.get(), "stage": "retry", "error": type(error).__name__}


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning("%s; retry %d in %.1fs", error, state.attempt_number, wait, extra=_extra(error))


def retrying(
    policy: RetryPolicy | RetrySettings,
    on: type[BaseException],
    attempts: int | None = None,
    *,
    budget: float | None = None,
    waited: int = 0,
) -> AsyncRetrying:
    """Retry ``on`` errors within the policy's budget (SIDECAR_RETRY_BUDGET seconds) and ``attempts``
    tries, if given.

    Waits double from SIDECAR_RETRY_BASE_DELAY up to SIDECAR_RETRY_MAX_DELAY, plus up to one base delay
    of jitter so that a fleet does not retry in step. A base delay of 0 makes retries instant (tests).
    ``budget`` and ``waited`` (backoff waits already taken) continue a retry that began elsewhere.
    """
    retry = RetryPolicy.of(policy)
    stop: stop_base = stop_after_delay(retry.budget if budget is None else budget)
    if attempts is not None:
        stop = stop | stop_after_attempt(attempts)
    return AsyncRetrying(
        retry=retry_if_exception_type(on),
        wait=wait_exponential_jitter(
            multiplier=retry.base_delay * 2**waited,
            max=retry.max_delay,
            jitter=retry.base_delay,
        ),
        stop=stop,
        before_sleep=_log_retry,
        reraise=True,
    )


async def call_with_retries(
    policy: RetryPolicy | RetrySettings,
    on: type[BaseException],
    operation: Callable[[], Awaitable[T]],
    attempts: int | None = None,
    *,
    budget: float | None = None,
) -> T:
    """``operation()``, retried like ``retrying`` when it raises ``on``, within ``budget`` seconds
    (default SIDECAR_RETRY_BUDGET).

    The first try runs outside tenacity: building and stepping its retry state costs about 0.3 ms of
    CPU per call, which on the per-job path (five storage calls and a txt2img) is a tenth of the
    worker's CPU. Only a failed first try pays for it.
    """
    started = time.monotonic()
    retry = RetryPolicy.of(policy)
    total = retry.budget if budget is None else budget
    try:
        return await operation()
    except on as error:
        # The same first wait as tenacity's: one base delay plus up to one base delay of jitter.
        wait = min(retry.base_delay * (1 + random.random()), retry.max_delay)
        if attempts == 1 or time.monotonic() - started + wait > total:
            raise
        log.warning("%s; retry 1 in %.1fs", error, wait, extra=_extra(error))
    await asyncio.sleep(wait)
    remaining = max(total - (time.monotonic() - started), 0.0)
    tries_left = None if attempts is None else attempts - 1
    async for attempt in retrying(retry, on, tries_left, budget=remaining, waited=1):
        with attempt:
            return await operation()
    raise AssertionError("unreachable")
