"""Settling: what becomes of a held message (deleted, released, deferred or poisoned), counted, and
the retry policy that decides it.

A transient failure is released with SIDECAR_RELEASE_DELAY and poisoned at SIDECAR_MAX_DEQUEUE_COUNT
tries; a permanent one is poisoned at once. A1111 going away stops the node (the job counts a try).
Too many transient failures in a row stop it too: a sick node must not eat the queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from typing import Any

from sidecar.errors import (
    A1111Unavailable,
    AssetMissing,
    FatalError,
    InvalidJob,
    PermanentError,
    SidecarError,
    StorageRefused,
    TransientError,
    Unexpected,
)
from sidecar.jobs import Job, job_id_hint
from sidecar.lease import Lease
from sidecar.observability import Metrics
from sidecar.pipeline.book import Book, Held
from sidecar.pipeline.ports import Store
from sidecar.pipeline.stop import Stop, StopReason
from sidecar.policy import Reporting, TriesPolicy
from sidecar.storage import Message

log = logging.getLogger("sidecar.worker")  # the worker's log lines keep their logger's name


class Settler:
    def __init__(
        self,
        storage: Store,
        book: Book,
        stop: Stop,
        metrics: Metrics,
        tries: TriesPolicy,
        reporting: Reporting,
        max_jobs: int | None = None,
    ) -> None:
        self.storage = storage
        self.book = book
        self.stop = stop
        self.metrics = metrics
        self.tries = tries
        self.reporting = reporting
        self.max_jobs = max_jobs
        self.failures_in_a_row = 0

    def generated(self) -> None:
        """A generation went well: the node is not sick."""
        self.failures_in_a_row = 0

    async def outcome(self, outcome: str, lease: Lease, action: Coroutine[Any, Any, bool]) -> str:
        """Settle a message (delete, release or poison) and count what happened to it."""
        try:
            with self.metrics.stage("settle"):
                ours = await self.stop.guard(action)
        except TransientError as error:
            # Storage is away beyond the retry budget: the message comes back when its lease runs out.
            log.warning("could not settle %s: %s", lease.message.id, error, extra={"error": error.kind})
            lease.abandon()
            outcome, ours = "abandoned", True
        except StorageRefused:
            raise  # still held: released on the way out, where storage allows it
        except BaseException:
            self.book.held.discard(lease)
            raise
        self.book.held.discard(lease)
        self.book.wake.set()
        outcome = outcome if ours else "lost"
        self.book.outcomes[outcome] += 1
        self.metrics.jobs.labels(outcome).inc()
        if self.max_jobs is not None and self.book.finished >= self.max_jobs:
            self.stop.set(StopReason.MAX_JOBS)
        return outcome

    async def complete(
        self, held: Held, names: list[str], seeds: list[int], timings: dict[str, float]
    ) -> None:
        """Every blob is stored: delete the message, then count, log and report the job done."""
        job = held.job
        if await self.outcome("succeeded", held.lease, held.lease.complete()) != "succeeded":
            log.warning("blobs stored, but the message is not ours to delete", extra={"job_id": job.id})
            return
        self.metrics.images.inc(len(names))
        self.metrics.aged("done", held.lease.message.inserted_on)
        log.info("job done", extra={"job_id": job.id, "stage": "done", "images": len(names), **timings})
        await self.forget_failure(held.lease.message)
        await self.notify(job.id, "succeeded", [*names, f"{job.id}/job.json"], seeds, timings)

    async def fail(self, held: Held, error: SidecarError) -> None:
        job, message = held.job, held.lease.message
        extra = {"job_id": job.id, "message_id": message.id, "error": error.kind}
        limit = self.tries.max_dequeue_count
        last_try = message.dequeue_count >= limit
        if isinstance(error, A1111Unavailable):
            # A1111 is gone: this node can do nothing useful; it stops and is restarted. The job counts
            # a try, so one that kills A1111 every time is poisoned at the limit, naming the cause.
            self.stop.set(StopReason.A1111_GONE, error)
            if last_try:
                died = A1111Unavailable(
                    f"A1111 went away during this job on try {message.dequeue_count} of {limit}: {error}"
                )
                log.warning("job failed for good: %s", died, extra=extra)
                await self.outcome("poisoned", held.lease, held.lease.poison(job.id, died))
                await self.notify(job.id, "failed", [], [], {}, died)
                await self.forget_failure(message)
            else:
                await self.storage.record_failure(message, f"{error.kind}: {error}")
                await self.give_back(held)
            return
        if isinstance(error, PermanentError) or last_try:
            log.warning("job failed for good: %s", error, extra=extra)
            await self.outcome("poisoned", held.lease, held.lease.poison(job.id, error))
            await self.notify(job.id, "failed", [], [], {}, error)
            await self.forget_failure(message)
        else:
            delay = self.tries.release_delay
            log.warning("job failed, retried in %ss: %s", delay, error, extra=extra)
            await self.storage.record_failure(message, f"{error.kind}: {error}")
            await self.outcome("retried", held.lease, held.lease.release(delay))
        if isinstance(error, TransientError):
            self.failures_in_a_row += 1
            if self.failures_in_a_row >= self.tries.max_failures_in_a_row:
                self.stop.set(
                    StopReason.TOO_MANY_FAILURES,
                    SidecarError(f"{self.failures_in_a_row} failures in a row, last: {error}"),
                )

    async def give_back(self, held: Held) -> None:
        """Release at once (visibility 0), for another node."""
        await self.outcome("released", held.lease, held.lease.release(0))

    async def defer(self, lease: Lease, job: Job, missing: AssetMissing) -> None:
        """Hand the job back for a node that has what it names: not a failure of the job or the node."""
        delay = self.tries.release_delay
        log.warning(
            "handed back for another node (in %ss): %s",
            delay,
            missing,
            extra={"job_id": job.id, "message_id": lease.message.id, "stage": "assets"},
        )
        await self.storage.record_failure(lease.message, f"{missing.kind}: {missing}")
        await self.outcome("deferred", lease, lease.release(delay))

    async def poison_on_receipt(self, lease: Lease, error: SidecarError) -> None:
        """A message that is no job to run (invalid, tried too often, naming what no A1111 has)."""
        message = lease.message
        hint = job_id_hint(message.content)
        log.warning(
            "invalid job: %s" if isinstance(error, InvalidJob) else "job poisoned on receipt: %s",
            error,
            extra={"message_id": message.id, "job_id": hint, "stage": "validate"},
        )
        await self.outcome("poisoned", lease, lease.poison(hint, error))
        await self.notify(hint or message.id, "failed", [], [], {}, error)
        await self.forget_failure(message)

    async def poison_unexpected(self, lease: Lease, error: Exception) -> None:
        """An exception nobody planned for: poison that one message with it, never stop the worker."""
        message = lease.message
        log.error(
            "unexpected %s while handling message %s; poisoning it",
            type(error).__name__,
            message.id,
            exc_info=error,
            extra={"message_id": message.id, "stage": "contain"},
        )
        try:
            await self.outcome(
                "poisoned", lease, lease.poison(job_id_hint(message.content), Unexpected(error))
            )
        except (FatalError, asyncio.CancelledError):
            raise
        except Exception as again:
            log.error("could not poison %s either (%s): it comes back later", message.id, again)
            lease.abandon()
            self.book.held.discard(lease)

    async def forget_failure(self, message: Message) -> None:
        """A message settled for good needs no note of an earlier failed try (only retries have one)."""
        if message.dequeue_count > 1:
            await self.storage.forget_failure(message)

    async def notify(
        self,
        job_id: str,
        status: str,
        blobs: list[str],
        seeds: list[int],
        timings: dict[str, float],
        error: SidecarError | None = None,
    ) -> None:
        queue = self.reporting.result_queue
        if not queue:
            return
        body: dict[str, Any] = {
            "job_id": job_id,
            "status": status,
            "blobs": blobs,
            "seeds": seeds,
            "timings": timings,
        }
        if error is not None:
            body["error"] = {"type": error.kind, "detail": str(error)}
        try:
            await self.stop.guard(self.storage.send(queue, json.dumps(body)))
        except TransientError as error:
            log.warning(
                "result message not sent: %s",
                error,
                extra={"job_id": job_id, "stage": "notify", "error": error.kind, "status": status},
            )
