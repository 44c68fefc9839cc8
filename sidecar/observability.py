"""Metrics (Prometheus) and the A1111 busy fraction.

Each worker owns its registry, so several workers can live in one process (tests, the benchmark).
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from sidecar import __version__
from sidecar.busy import Attempt, BusyMeter, BusySeconds
from sidecar.errors import (
    A1111AuthRefused,
    A1111Rejected,
    A1111ServerError,
    A1111Timeout,
    A1111Unavailable,
)

log = logging.getLogger(__name__)
OUTCOMES = ("succeeded", "poisoned", "retried", "deferred", "released", "abandoned", "lost")
# sidecar_stage_seconds{stage}: receive (a receive that returned messages), generate (one txt2img
# attempt from A1111 turning to it until its answer), upload (a job's images and job.json), settle
# (deleting, releasing or poisoning the message)
STAGES = ("receive", "generate", "upload", "settle")
# sidecar_a1111_errors_total{status}: these, every other status being "other"
A1111_ERROR_STATUSES = ("400", "401", "404", "422", "500", "503", "timeout", "unreachable", "other")
RECEIVE_RESULTS = ("messages", "empty")
JOB_AGE_AT = ("fetch", "done")

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# a message's age since it was enqueued: a second to a day
AGE_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 43200, 86400)
DEFAULT_DEADLINE = 600.0  # SIDECAR_GENERATION_TIMEOUT's default


def stage_buckets(deadline: float = DEFAULT_DEADLINE) -> tuple[float, ...]:
    """``STAGE_BUCKETS``, extended by 600, 900, 1200, ... until the last finite bucket reaches the
    generation deadline (a generation may legitimately take that long)."""
    buckets = list(STAGE_BUCKETS)
    while buckets[-1] < deadline:
        buckets.append(600 if buckets[-1] < 600 else buckets[-1] + 300)
    return tuple(buckets)


def a1111_error_status(error: BaseException) -> str | None:
    """The ``status`` label of an A1111 client error (None: not an error of A1111's, e.g. a cut-short
    generation, which is the worker's own interrupt)."""
    if isinstance(error, A1111ServerError | A1111Rejected):
        status = str(error.status)
        return status if status in A1111_ERROR_STATUSES else "other"
    if isinstance(error, A1111AuthRefused):
        return "401"
    if isinstance(error, A1111Timeout):
        return "timeout"
    if isinstance(error, A1111Unavailable):
        return "unreachable"
    return None


class Metrics:
    """The worker's metrics. ``generation_timeout`` (SIDECAR_GENERATION_TIMEOUT) sets how far the
    latency buckets reach; ``storage_codes`` are the storage error codes exported from the start
    (``sidecar.storage.refusals.ERROR_CODES``: storage may not be imported here), every other code
    being counted as ``other``."""

    def __init__(
        self, generation_timeout: float = DEFAULT_DEADLINE, storage_codes: Sequence[str] = ()
    ) -> None:
        self.registry = CollectorRegistry()
        self.busy = BusyMeter()
        buckets = stage_buckets(generation_timeout)
        registry = self.registry
        self.jobs = Counter("sidecar_jobs", "Jobs by outcome", ["outcome"], registry=registry)
        self.stage_seconds = Histogram(
            "sidecar_stage_seconds",
            "Latency of each stage (generate: one txt2img attempt, from A1111 turning to it until its "
            "answer; receive: receives that returned messages)",
            ["stage"],
            buckets=buckets,
            registry=registry,
        )
        self.in_flight = Gauge("sidecar_in_flight", "Jobs in each stage now", ["stage"], registry=registry)
        busy = Gauge(
            "sidecar_a1111_busy_fraction",
            "Fraction of the last minute A1111 spent on this worker's generations (GPU time only)",
            registry=registry,
        )
        busy.set_function(self.busy.fraction)
        registry.register(BusySeconds(self.busy))
        self.queued_seconds = Histogram(
            "sidecar_a1111_queued_seconds",
            "Seconds a txt2img request waited at A1111's queue lock behind the request ahead",
            buckets=buckets,
            registry=registry,
        )
        self.upload_slot_wait = Histogram(
            "sidecar_upload_slot_wait_seconds",
            "Seconds a finished generation waited for an upload slot (SIDECAR_UPLOAD_CONCURRENCY)",
            buckets=buckets,
            registry=registry,
        )
        self.a1111_errors = Counter(
            "sidecar_a1111_errors",
            "txt2img attempts that failed, by A1111's status (or timeout, unreachable)",
            ["status"],
            registry=registry,
        )
        self.storage_codes = frozenset([*storage_codes, "other"])
        self.storage_errors = Counter(
            "sidecar_storage_errors",
            "Failed storage requests (each try), by Azure's error code (or unreachable, timeout, throttled)",
            ["code"],
            registry=registry,
        )
        self.receives = Counter(
            "sidecar_receives",
            "Queue receives, by whether they returned messages",
            ["result"],
            registry=registry,
        )
        self.job_age = Histogram(
            "sidecar_job_age_seconds",
            "Seconds since the job's message was enqueued (its insertion time), at fetch and when done",
            ["at"],
            buckets=AGE_BUCKETS,
            registry=registry,
        )
        build = Gauge(
            "sidecar_build_info", "The worker's version and Python", ["version", "python"], registry=registry
        )
        build.labels(__version__, platform.python_version()).set(1)
        self.ready = Gauge("sidecar_ready", "1 when A1111 is warm and storage answers", registry=registry)
        self.images = Counter("sidecar_images", "Images stored", registry=registry)
        self.discarded = Counter(
            "sidecar_generations_discarded",
            "Generations thrown away unstored because an interrupt may have cut them short",
            registry=registry,
        )
        # Every label value at 0 from the start: rate() and increase() see the first failure.
        for outcome in OUTCOMES:
            self.jobs.labels(outcome)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for stage in ("generate", "upload"):
            self.in_flight.labels(stage)
        for status in A1111_ERROR_STATUSES:
            self.a1111_errors.labels(status)
        for code in sorted(self.storage_codes):
            self.storage_errors.labels(code)
        for result in RECEIVE_RESULTS:
            self.receives.labels(result)
        for at in JOB_AGE_AT:
            self.job_age.labels(at)
        # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
        ProcessCollector(registry=registry)

    @contextmanager
    def a1111_attempt(self) -> Iterator[Attempt]:
        """Around one txt2img request: its queueing and its GPU time (an attempt that failed took
        A1111's time too, so the generate stage's sum is the busy seconds), and its error if any."""
        try:
            with self.busy.attempt() as attempt:
                yield attempt
        except BaseException as error:
            self.a1111_error(error)
            raise
        finally:
            self.queued_seconds.observe(attempt.queued)
            self.stage_seconds.labels("generate").observe(attempt.seconds)

    def a1111_error(self, error: BaseException) -> None:
        status = a1111_error_status(error)
        if status is not None:
            self.a1111_errors.labels(status).inc()

    def storage_error(self, code: str) -> None:
        """One failed storage request; a code outside the known set counts as ``other``."""
        self.storage_errors.labels(code if code in self.storage_codes else "other").inc()

    def received(self, seconds: float, messages: int) -> None:
        """One receive: timed as a stage only when it returned messages (an empty poll is no work)."""
        self.receives.labels("messages" if messages else "empty").inc()
        if messages:
            self.stage_seconds.labels("receive").observe(seconds)

    def aged(self, at: str, inserted_on: float | None, now: float | None = None) -> None:
        """A job's age at ``at`` (fetch, done): now minus its message's insertion time (epoch s)."""
        if inserted_on is None:
            return
        now = time.time() if now is None else now
        self.job_age.labels(at).observe(max(0.0, now - inserted_on))

    def watch_credential_expiry(self, seconds_left: Callable[[], float]) -> None:
        """Export the seconds until the storage SAS expires. Only a worker holding a SAS has the
        series: with an account key or Azure AD it is absent, never a 0 an alert would read as due."""
        Gauge(
            "sidecar_credential_expiry_seconds",
            "Seconds until the storage SAS expires (absent with an account key or Azure AD)",
            registry=self.registry,
        ).set_function(seconds_left)

    def totals(self) -> dict[str, float]:
        """Images and jobs by outcome so far, for the periodic summary line."""
        get = self.registry.get_sample_value
        totals = {"images": get("sidecar_images_total") or 0.0}
        for outcome in OUTCOMES:
            totals[outcome] = get("sidecar_jobs_total", {"outcome": outcome}) or 0.0
        return totals

    async def summarize(self, interval: float) -> None:
        """Every ``interval`` seconds, one log line: images/min, A1111 busy fraction, failures, and the
        worker's own CPU per image stored (its cost on the node; the benchmark's figure, live)."""
        previous, cpu_before = self.totals(), time.process_time()
        while True:
            await asyncio.sleep(interval)
            now, cpu = self.totals(), time.process_time()
            delta = {key: now.get(key, 0) - previous.get(key, 0) for key in now}
            previous, cpu_spent, cpu_before = now, cpu - cpu_before, cpu
            images = delta.get("images", 0)
            log.info(
                "summary",
                extra={
                    "stage": "summary",
                    "images_per_min": round(images * 60 / interval, 1),
                    "jobs_done": int(delta.get("succeeded", 0)),
                    "failures": int(sum(delta.get(k, 0) for k in ("retried", "poisoned", "abandoned"))),
                    "poisoned": int(delta.get("poisoned", 0)),
                    "a1111_busy_fraction": round(self.busy.fraction(), 3),
                    "cpu_ms_per_image": round(cpu_spent * 1000 / images, 2) if images else None,
                },
            )

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with self.stage_seconds.labels(name).time():
            yield


__all__ = ["Attempt", "BusyMeter", "Metrics", "a1111_error_status", "stage_buckets"]
