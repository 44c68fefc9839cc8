"""Small policy objects built from ``Settings``: each part of the worker gets the few numbers it acts
on, not the whole configuration.

    RetryPolicy       backoff of transient errors (sidecar.backoff)
    LeasePolicy       how long a held message stays invisible and how long one lease request may take
    PollingPolicy     which queues are polled and how the interval backs off on empty ones
    TriesPolicy       how many tries a job gets, how long a failed one waits, when the node gives up
    GenerationPolicy  the txt2img deadline, queue-ahead, tries of a 5xx and remakes of a cut-short one
    PipelinePolicy    how far fetching runs ahead, uploads at once, the grace period on a signal
    RunLimits         when a run ends by itself (the command line's --max-jobs, --exit-when-empty)
    Policies          all of the above, plus the job limits and what reports name
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sidecar.config import Settings, lease_request_timeout
from sidecar.jobs import Limits


class RetrySettings(Protocol):
    """Anything that carries the three retry settings (``Settings`` and storage's own slice do)."""

    @property
    def retry_base_delay(self) -> float: ...

    @property
    def retry_max_delay(self) -> float: ...

    @property
    def retry_budget(self) -> float: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Waits double from ``base_delay`` up to ``max_delay`` (plus jitter), within ``budget`` seconds."""

    base_delay: float = 0.5
    max_delay: float = 30.0
    budget: float = 60.0

    @classmethod
    def from_settings(cls, settings: RetrySettings) -> RetryPolicy:
        return cls(settings.retry_base_delay, settings.retry_max_delay, settings.retry_budget)

    @classmethod
    def of(cls, source: RetryPolicy | RetrySettings) -> RetryPolicy:
        return source if isinstance(source, RetryPolicy) else cls.from_settings(source)


@dataclass(frozen=True)
class LeasePolicy:
    """A held message is invisible for ``visibility`` seconds and renewed at half-life."""

    visibility: int = 60

    @property
    def renew_after(self) -> float:
        """Seconds before the visibility runs out at which a renewal starts (half of it)."""
        return self.visibility / 2

    @property
    def request_timeout(self) -> float:
        """Seconds one try of a renew, release or delete may take."""
        return lease_request_timeout(self.visibility)

    @classmethod
    def from_settings(cls, settings: Settings) -> LeasePolicy:
        return cls(settings.visibility_timeout)


@dataclass(frozen=True)
class PollingPolicy:
    queues: tuple[str, ...] = ("jobs",)
    min_interval: float = 0.1
    max_interval: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> PollingPolicy:
        return cls(tuple(settings.queue_name), settings.poll_interval_min, settings.poll_interval_max)


@dataclass(frozen=True)
class TriesPolicy:
    """``max_dequeue_count`` tries per job; a failed try waits ``release_delay`` seconds; after
    ``max_failures_in_a_row`` transient failures in a row the node stops (a sick node must not eat the
    queue)."""

    max_dequeue_count: int = 5
    release_delay: int = 10
    max_failures_in_a_row: int = 5

    @classmethod
    def from_settings(cls, settings: Settings) -> TriesPolicy:
        return cls(settings.max_dequeue_count, settings.release_delay)


@dataclass(frozen=True)
class GenerationPolicy:
    """One txt2img may take ``timeout`` seconds; a 5xx is tried ``attempts`` times; a generation an
    interrupt may have cut short is made again up to ``max_remakes`` times."""

    timeout: float = 600.0
    queue_ahead: bool = True
    attempts: int = 3
    max_remakes: int = 3

    @property
    def depth(self) -> int:
        """txt2img requests at A1111 at once: the running one, and one waiting behind it."""
        return 2 if self.queue_ahead else 1

    @classmethod
    def from_settings(cls, settings: Settings) -> GenerationPolicy:
        return cls(settings.generation_timeout, settings.a1111_queue_ahead)


@dataclass(frozen=True)
class PipelinePolicy:
    """``prefetch`` jobs waiting (0: the strict sequential loop), ``upload_concurrency`` jobs uploading,
    ``shutdown_grace`` seconds to finish after a signal, ``max_receive`` messages per receive; a job
    waiting may be passed over for ``affinity_max_wait`` seconds by jobs that keep A1111's checkpoint
    and LoRAs (0: handed out in fetch order; ``sidecar.pipeline.affinity``)."""

    prefetch: int = 1
    upload_concurrency: int = 4
    shutdown_grace: float = 30.0
    max_receive: int = 32  # Azure's cap on messages per receive
    affinity_max_wait: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> PipelinePolicy:
        return cls(
            settings.prefetch,
            settings.upload_concurrency,
            settings.shutdown_grace,
            affinity_max_wait=settings.affinity_max_wait,
        )


@dataclass(frozen=True)
class RunLimits:
    """When a run ends by itself: after ``max_jobs`` finished jobs; with ``exit_when_empty`` once
    the queues are empty, waiting up to ``wait_invisible`` seconds for invisible messages first."""

    max_jobs: int | None = None
    exit_when_empty: bool = False
    wait_invisible: float = 0.0


@dataclass(frozen=True)
class Reporting:
    """What records and reports name: the worker, and the queue completion messages go to."""

    worker_id: str = ""
    result_queue: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Reporting:
        return cls(settings.worker_id, settings.result_queue_name)


@dataclass(frozen=True)
class Policies:
    retry: RetryPolicy
    lease: LeasePolicy
    polling: PollingPolicy
    tries: TriesPolicy
    generation: GenerationPolicy
    pipeline: PipelinePolicy
    limits: Limits
    reporting: Reporting
    run: RunLimits = RunLimits()

    @classmethod
    def from_settings(cls, settings: Settings, run: RunLimits | None = None) -> Policies:
        return cls(
            retry=RetryPolicy.from_settings(settings),
            lease=LeasePolicy.from_settings(settings),
            polling=PollingPolicy.from_settings(settings),
            tries=TriesPolicy.from_settings(settings),
            generation=GenerationPolicy.from_settings(settings),
            pipeline=PipelinePolicy.from_settings(settings),
            limits=Limits(settings.max_width, settings.max_height, settings.max_steps, settings.max_images),
            reporting=Reporting.from_settings(settings),
            run=run or RunLimits(),
        )
