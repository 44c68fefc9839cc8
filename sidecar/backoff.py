"""One retry policy for transient errors: exponential backoff with jitter, bounded in time."""

from __future__ import annotations

import logging

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from sidecar.config import Settings

log = logging.getLogger(__name__)


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning(
        "%s; retry %d in %.1fs",
        error,
        state.attempt_number,
        wait,
        extra={"stage": "retry", "error": type(error).__name__},
    )


def retrying(settings: Settings, on: type[BaseException], attempts: int | None = None) -> AsyncRetrying:
    """Retry ``on`` errors within SIDECAR_RETRY_BUDGET seconds (and ``attempts`` tries, if given).

    Waits double from SIDECAR_RETRY_BASE_DELAY up to SIDECAR_RETRY_MAX_DELAY, plus up to one base delay
    of jitter so that a fleet does not retry in step. A base delay of 0 makes retries instant (tests).
    """
    stop: stop_base = stop_after_delay(settings.retry_budget)
    if attempts is not None:
        stop = stop | stop_after_attempt(attempts)
    return AsyncRetrying(
        retry=retry_if_exception_type(on),
        wait=wait_exponential_jitter(
            multiplier=settings.retry_base_delay,
            max=settings.retry_max_delay,
            jitter=settings.retry_base_delay,
        ),
        stop=stop,
        before_sleep=_log_retry,
        reraise=True,
    )
