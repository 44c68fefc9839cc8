"""The pipeline's stages built over the in-memory fakes (``tests/fakes.py``), sharing one book and one
stop, with policies for tests: instant retries, a lease never renewed within a test, one queue."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.jobs import Limits, parse_job
from sidecar.lease import Lease
from sidecar.observability import Metrics
from sidecar.pipeline.book import Book, Held
from sidecar.pipeline.fetch import Fetcher
from sidecar.pipeline.finish import Finisher
from sidecar.pipeline.generate import Generator
from sidecar.pipeline.settle import Settler
from sidecar.pipeline.stop import Stop
from sidecar.policy import (
    GenerationPolicy,
    LeasePolicy,
    PipelinePolicy,
    Policies,
    PollingPolicy,
    Reporting,
    RetryPolicy,
    RunLimits,
    TriesPolicy,
)
from sidecar.polling import Poller
from tests.fakes import FakeA1111, FakeCatalog, FakeStore

QUEUE = "jobs"
JOB: dict[str, Any] = {"prompt": "a red bicycle", "steps": 2, "width": 64, "height": 64}


def policies(
    *,
    tries: TriesPolicy | None = None,
    generation: GenerationPolicy | None = None,
    pipeline: PipelinePolicy | None = None,
    run: RunLimits | None = None,
    result_queue: str | None = None,
    visibility: int = 60,
) -> Policies:
    """Policies for tests: instant retries, a 60 s lease (never renewed within a test), one queue."""
    return Policies(
        retry=RetryPolicy(base_delay=0.0, max_delay=0.0, budget=1.0),
        lease=LeasePolicy(visibility),
        polling=PollingPolicy((QUEUE,), 0.0, 0.0),
        tries=tries or TriesPolicy(),
        generation=generation or GenerationPolicy(timeout=5.0),
        pipeline=pipeline or PipelinePolicy(),
        limits=Limits(),
        reporting=Reporting("fake-worker", result_queue),
        run=run or RunLimits(),
    )


@dataclass
class Rig:
    """The pipeline's stages over the fakes, sharing one book and one stop."""

    policies: Policies
    store: FakeStore = field(default_factory=FakeStore)
    a1111: FakeA1111 = field(default_factory=FakeA1111)
    catalog: FakeCatalog = field(default_factory=FakeCatalog)
    stop: Stop = field(default_factory=Stop)
    book: Book = field(default_factory=Book)
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        p = self.policies
        self.settler = Settler(
            self.store, self.book, self.stop, self.metrics, p.tries, p.reporting, p.run.max_jobs
        )
        self.fetcher = Fetcher(
            self.store,
            Poller.from_policy(p.polling),
            self.book,
            self.settler,
            self.stop,
            self.metrics,
            lease=p.lease,
            tries=p.tries,
            limits=p.limits,
            pipeline=p.pipeline,
            run=p.run,
            catalog=self.catalog,
        )
        self.generator = Generator(
            self.a1111, self.book, self.settler, self.stop, self.metrics, policy=p.generation, retry=p.retry
        )
        self.finisher = Finisher(
            self.store,
            self.book,
            self.settler,
            self.stop,
            self.metrics,
            upload_concurrency=p.pipeline.upload_concurrency,
            reporting=p.reporting,
        )

    def outcome(self, name: str) -> float:
        return self.metrics.registry.get_sample_value("sidecar_jobs_total", {"outcome": name}) or 0.0

    async def hold(self, job: Mapping[str, Any] | None = None, dequeue_count: int = 0) -> Held:
        """A job received and held under a lease, as the fetcher would hand it on."""
        self.store.add(QUEUE, dict(job or JOB), dequeue_count)
        (message,) = await self.store.receive(QUEUE, 1, self.policies.lease.visibility)
        lease = Lease(self.store, message, self.policies.lease)
        self.book.held.add(lease)
        return Held(lease, parse_job(message.content, message.id, self.policies.limits))

    def close(self) -> None:
        """Stop every lease's renewer (the test is over)."""
        for lease in list(self.book.held):
            lease.abandon()


MakeRig = Callable[[Policies], Rig]
