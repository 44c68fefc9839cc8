"""Fetching: receive messages, check each on receipt (tried too often, a valid job, what this node's
A1111 has) and hold the ones to run under a lease; find the queues drained (--exit-when-empty).

Shards are polled fairly and backed off when empty (``sidecar.polling``). With SIDECAR_PREFETCH=N the
fetch loop keeps up to N jobs waiting in ``ready``, refilling in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable

from sidecar.errors import (
    AssetMissing,
    CatalogError,
    FatalError,
    InvalidJob,
    SidecarError,
    TooManyTries,
    TransientError,
    UnknownAsset,
)
from sidecar.jobs import Job, Limits, parse_job
from sidecar.lease import Lease
from sidecar.observability import Metrics
from sidecar.pipeline.affinity import Window, affinity_of
from sidecar.pipeline.book import Book, Held
from sidecar.pipeline.ports import Assets, Store
from sidecar.pipeline.settle import Settler
from sidecar.pipeline.stop import Stop, StopReason
from sidecar.policy import LeasePolicy, PipelinePolicy, RunLimits, TriesPolicy
from sidecar.polling import Poller
from sidecar.storage import Message

log = logging.getLogger("sidecar.worker")  # the worker's log lines keep their logger's name


class Fetcher:
    def __init__(
        self,
        storage: Store,
        poller: Poller,
        book: Book,
        settler: Settler,
        stop: Stop,
        metrics: Metrics,
        *,
        lease: LeasePolicy,
        tries: TriesPolicy,
        limits: Limits,
        pipeline: PipelinePolicy,
        run: RunLimits,
        catalog: Assets | None = None,
    ) -> None:
        self.storage = storage
        self.poller = poller
        self.book = book
        self.settler = settler
        self.stop = stop
        self.metrics = metrics
        self.lease = lease
        self.tries = tries
        self.limits = limits
        self.pipeline = pipeline
        self.run = run
        self.catalog = catalog  # what this node's A1111 has; None: jobs are not checked against it
        self._empty_since: float | None = None
        stop.also_wake(book.wake)

    async def loop(self, ready: asyncio.Queue[Held | None]) -> None:
        """Keep up to SIDECAR_PREFETCH jobs waiting in ``ready`` until stopped or drained."""
        prefetch = self.pipeline.prefetch
        wake = self.book.wake
        while not self.stop.is_set:
            room = self.room(prefetch - ready.qsize())
            # Refill in batches (half the prefetch at a time) unless the generator is about to starve:
            # one receive then serves several jobs, and each receive costs ~2 ms of SDK CPU.
            if room <= 0 or (room < (prefetch + 1) // 2 and not ready.empty()):
                wake.clear()
                await wake.wait()
                continue
            if isinstance(ready, Window):
                self.poller.prefer(ready.loaded.checkpoint)  # sharded per model: its shard first
            batch = await self.next_batch(room)
            if batch is None:
                return
            for held in batch:
                ready.put_nowait(held)

    def room(self, wanted: int) -> int:
        """How many more jobs to hold: prefetch room, and never more than --max-jobs needs."""
        if self.run.max_jobs is None:
            return wanted
        return min(wanted, self.run.max_jobs - self.book.finished - self.book.in_pipeline)

    async def next_batch(self, room: int) -> list[Held] | None:
        """Up to ``room`` jobs; [] after waiting when there are none now; None when drained
        (--exit-when-empty). Storage being away (after the retry budget) means waiting, not ending."""
        try:
            batch = await self._fetch(room)
        except TransientError as error:
            log.warning("cannot fetch jobs: %s", error, extra={"stage": "receive", "error": error.kind})
            batch = []
        if batch is None and await self._empty_and_idle():
            return None
        if not batch:
            await self._idle()
        return batch or []

    async def _fetch(self, room: int) -> list[Held] | None:
        """Receive up to ``room`` messages; poison the invalid ones. None when the queues were empty."""
        room = min(room, self.pipeline.max_receive)
        for queue in self.poller.due():
            began = time.monotonic()
            messages = await self.stop.guard(self.storage.receive(queue, room, self.lease.visibility))
            self.metrics.received(time.monotonic() - began, len(messages))
            if messages:
                self.poller.found(queue)
                break
            self.poller.empty(queue)
        else:
            return None
        batch = []
        for message in messages:
            self.metrics.aged("fetch", message.inserted_on)
            lease = Lease(self.storage, message, self.lease, on_refused=self.stop.abort)
            self.book.held.add(lease)
            try:
                held = await self._admit(message, lease)
            except (FatalError, asyncio.CancelledError):
                raise
            except Exception as error:
                # Whatever one message does, it stops only itself (the Functions queue trigger's rule).
                await self.settler.poison_unexpected(lease, error)
                continue
            if held is not None:
                batch.append(held)
        self.poller.carried(queue, [affinity_of(held.job).checkpoint for held in batch])
        return batch

    async def _admit(self, message: Message, lease: Lease) -> Held | None:
        """A received message as a job to run, or None once it went to the poison queue: tried too
        often (checked before anything else is done with it, as the Functions trigger does) or
        not a valid job."""
        limit = self.tries.max_dequeue_count
        if message.dequeue_count > limit:
            last = await self.storage.last_failure(message)
            error: SidecarError = TooManyTries(
                f"received {message.dequeue_count} times, more than SIDECAR_MAX_DEQUEUE_COUNT={limit}; "
                + (
                    f"last failure: {last}"
                    if last
                    else "no try recorded a failure (a worker may have died on it)"
                )
            )
        else:
            try:
                job = parse_job(message.content, message.id, self.limits)
            except InvalidJob as invalid:
                error = invalid
            else:
                missing = await self._check_assets(job)
                if missing is None:
                    return Held(lease, job)
                if isinstance(missing, AssetMissing) and message.dequeue_count < limit:
                    await self.settler.defer(lease, job, missing)
                    return None
                error = missing
        await self.settler.poison_on_receipt(lease, error)
        return None

    async def _check_assets(self, job: Job) -> AssetMissing | UnknownAsset | None:
        """Is every asset the job names on this node? A1111 would run without a missing LoRA or with
        the loaded checkpoint, silently: the job would be stored with the wrong picture."""
        if self.catalog is None:
            return None
        try:
            problems = await self.catalog.check(job.txt2img_payload())
        except CatalogError as error:
            return AssetMissing(f"what this node's A1111 has could not be read: {error}")
        unknown = [p.reason for p in problems if not p.elsewhere]
        if unknown:
            return UnknownAsset("; ".join(unknown))
        if problems:
            return AssetMissing("; ".join(p.reason for p in problems))
        return None

    async def _empty_and_idle(self) -> bool:
        """Drained (--exit-when-empty): every queue empty and nothing held. With --wait-invisible,
        messages still invisible (a dead consumer's, until its visibility runs out) are waited for,
        up to that many seconds after the queue first looked empty."""
        if not (self.run.exit_when_empty and self.poller.all_empty() and self.book.idle):
            self._empty_since = None
            return False
        if self.run.wait_invisible > 0:
            now = time.monotonic()
            self._empty_since = self._empty_since or now
            if now - self._empty_since < self.run.wait_invisible:
                try:
                    counts = [await self.storage.approximate_count(q) for q in self.poller.queues]
                except TransientError:
                    counts = [1]  # cannot tell now: look again at the next poll
                except SidecarError:
                    counts = [0]  # may not look (a node's SAS cannot read queue metadata): do not wait
                if sum(counts):
                    return False
        self.stop.set(StopReason.DRAINED)
        return True

    async def _idle(self) -> None:
        """Wait until a queue is due for polling again (or a stop). Draining (--exit-when-empty), a job
        settling also wakes the fetcher, so the last one is followed by the final poll at once."""
        waiting: Awaitable[object]
        if self.run.exit_when_empty:
            wake = self.book.wake
            wake.clear()
            waiting = wake.wait()
        else:
            waiting = self.stop.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiting, timeout=max(self.poller.wait(), 0.01))
