"""One retry policy for transient errors: exponential backoff with jitter, bounded in time."""

from __future__ import annotations

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from sidecar.config import Settings


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
        reraise=True,
    )
