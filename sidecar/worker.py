"""The pipeline: queue message -> job -> A1111 txt2img -> image bytes -> blobs -> delete.

With ``SIDECAR_PREFETCH=0`` it is the Go worker's strict loop: receive, generate, upload, delete, then
receive again. With ``SIDECAR_PREFETCH=N`` (N >= 1) three stages overlap:

    fetcher ──ready (<= N jobs)──> generator (one txt2img at a time) ──> finishers (<= upload slots)

The fetcher keeps up to N validated jobs waiting, so the next txt2img starts the moment the previous
one returns; finishers decode and upload while the next generation runs. When uploads fall behind,
the generator waits for a free upload slot and the fetcher for room in ``ready``: memory stays bounded.

Every held message has a Lease (renewed at half-life). Stopping: fetching stops, the current
generation and its uploads finish within the grace period, waiting jobs are released at once
(visibility 0) so other nodes take them; whatever is still held after the deadline is released too.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import functools
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
import pybase64

from sidecar import __version__
from sidecar.a1111 import A1111Client, Generation
from sidecar.assets import Catalog, CatalogError
from sidecar.backoff import call_with_retries
from sidecar.config import Settings
from sidecar.errors import (
    A1111CutShort,
    A1111ServerError,
    A1111Unavailable,
    AssetMissing,
    FatalError,
    InvalidJob,
    PermanentError,
    SidecarError,
    StorageRefused,
    TooManyTries,
    TransientError,
    Unexpected,
    UnknownAsset,
)
from sidecar.jobs import Job, Limits, job_id_hint, parse_job
from sidecar.lease import Lease
from sidecar.observability import Metrics
from sidecar.polling import Poller
from sidecar.storage import JSON, PNG, Message, Storage

log = logging.getLogger(__name__)

MAX_RECEIVE = 32  # Azure's cap on messages per receive
MAX_CONSECUTIVE_FAILURES = 5  # a sick node must not eat the queue
MAX_REMAKES = 3  # generations of one job thrown away because an interrupt may have cut them short


@dataclass
class Held:
    """A job this worker holds, with the lease that keeps its message invisible."""

    lease: Lease
    job: Job
    fetched_at: float = field(default_factory=time.time)


class Worker:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        a1111: A1111Client,
        metrics: Metrics,
        *,
        max_jobs: int | None = None,
        exit_when_empty: bool = False,
        wait_invisible: float = 0.0,
        catalog: Catalog | None = None,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.a1111 = a1111
        self.metrics = metrics
        self.max_jobs = max_jobs
        self.exit_when_empty = exit_when_empty
        self.catalog = catalog  # what this node's A1111 has; None: jobs are not checked against it
        # With --exit-when-empty: how long to wait for messages still invisible (held by a consumer
        # that may be dead) to come back before calling the queue drained.
        self.wait_invisible = wait_invisible
        self._empty_since: float | None = None
        self.drained = False
        self.limits = Limits(settings.max_width, settings.max_height, settings.max_steps, settings.max_images)
        self.outcomes: Counter[str] = Counter()
        self.fatal: SidecarError | None = None
        self.stopping = asyncio.Event()  # no more fetching
        self._stop_requested = asyncio.Event()  # a signal: the grace period applies
        self._aborted = asyncio.Event()  # a FatalError: stop at once, finish nothing
        self._wake = asyncio.Event()
        self._ready: asyncio.Queue[Held | None] = asyncio.Queue()
        self._upload_slots = asyncio.Semaphore(settings.upload_concurrency)
        self._held: set[Lease] = set()
        self._finishing: set[asyncio.Task[None]] = set()
        self._failures_in_a_row = 0
        self._poller = Poller(settings.queue_name, settings.poll_interval_min, settings.poll_interval_max)
        self.on_stop: Callable[[], None] = lambda: None

    # -- lifecycle -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First SIGTERM/SIGINT: stop fetching, finish what runs within the grace period. Every storage
        call from now on ends within it, the releases on the way out get one short try after it."""
        self.storage.deadline = time.monotonic() + self.settings.shutdown_grace
        self._stop_requested.set()
        self._stop()

    def _stop(self) -> None:
        if not self.stopping.is_set():
            self.on_stop()
        self.stopping.set()
        self._wake.set()

    def _abort(self, error: FatalError) -> None:
        """Retrying cannot fix this (storage refused us): stop at once. Nothing more is deleted or
        reported; what is held is released on the way out, where storage still allows it."""
        if self.fatal is None or not isinstance(self.fatal, FatalError):
            self.fatal = error
        self._aborted.set()
        self._stop()

    def credential_expired(self, error: FatalError) -> None:
        """The SAS is about to expire: stop at once, as for a refusal (held messages are released)."""
        self._abort(error)

    def a1111_exited(self, code: int) -> None:
        """The supervised A1111 died: drain, give back what is held, exit non-zero."""
        self.fatal = A1111Unavailable(f"A1111 exited with code {code}")
        self._stop()

    @property
    def finished(self) -> int:
        return self.outcomes["succeeded"] + self.outcomes["poisoned"]

    @property
    def in_pipeline(self) -> int:
        return len(self._held)

    async def run(self) -> int:
        """Process jobs until stopped, drained (--exit-when-empty) or done (--max-jobs). Exit code."""
        work = asyncio.create_task(self._work(), name="work")
        signalled = asyncio.create_task(self._stop_requested.wait())
        aborted = asyncio.create_task(self._aborted.wait())
        try:
            await asyncio.wait({work, signalled, aborted}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done() and self._aborted.is_set():
                work.cancel()
                await asyncio.wait({work})
            if not work.done():
                grace = asyncio.create_task(asyncio.sleep(self.settings.shutdown_grace))
                await asyncio.wait({work, grace, aborted}, return_when=asyncio.FIRST_COMPLETED)
                grace.cancel()
                if not work.done():
                    if not self._aborted.is_set():
                        log.warning(
                            "grace period over; giving back what is still held", extra={"stage": "stop"}
                        )
                    work.cancel()
                    await asyncio.wait({work})
            error = None if work.cancelled() else work.exception()
            if isinstance(error, FatalError):
                self._abort(error)
            elif error is not None:
                log.error("unexpected error; stopping", exc_info=error, extra={"stage": "stop"})
                self.fatal = SidecarError(f"unexpected {type(error).__name__}: {error}")
        except asyncio.CancelledError:
            work.cancel()
            await asyncio.wait({work})
            raise
        finally:
            signalled.cancel()
            aborted.cancel()
            await self._release_all()
        if self.fatal is not None:
            log.error("stopping: %s", self.fatal, extra={"stage": "stop", "error": self.fatal.kind})
            return 1
        if self.drained:
            await self._report_invisible()
        return 0

    async def _report_invisible(self) -> None:
        """The drain's last word: how many messages are still invisible (held by other consumers, or
        by dead ones until their visibility runs out); --wait-invisible waits for them."""
        try:
            counts = await asyncio.gather(
                *(self.storage.approximate_count(q) for q in self.settings.queue_name)
            )
        except SidecarError as error:
            log.warning("drained; could not count what is left: %s", error, extra={"stage": "stop"})
            return
        left = sum(counts)
        text = f"drained; {left} message(s) still invisible under other consumers' leases"
        log.info(text if left else "drained; the queue is empty", extra={"stage": "stop", "invisible": left})

    async def _work(self) -> None:
        try:
            if self.settings.prefetch == 0:
                await self._sequential()
            else:
                generator = asyncio.create_task(self._generate_loop(), name="generator")
                try:
                    await self._fetch_loop()
                    await self._give_back_waiting()
                finally:
                    self._ready.put_nowait(None)
                    await generator
            while self._finishing:
                await asyncio.gather(*list(self._finishing), return_exceptions=True)
        except asyncio.CancelledError:
            for task in list(self._finishing):
                task.cancel()
            await asyncio.gather(*list(self._finishing), return_exceptions=True)
            raise

    async def _give_back_waiting(self) -> None:
        """Stopping: the prefetched jobs no generation has taken go back at once, for other nodes."""
        waiting: list[Held] = []
        while not self._ready.empty():
            item = self._ready.get_nowait()
            if item is not None:
                waiting.append(item)
        if waiting:
            log.info("giving back %d prefetched job(s)", len(waiting), extra={"stage": "stop"})
            await asyncio.gather(*(self._give_back(held) for held in waiting), return_exceptions=True)

    async def _release_all(self) -> None:
        """Give back every message still held (visibility 0), so another node takes it at once."""
        leases = [lease for lease in self._held if not lease.ended]
        if leases:
            log.info("releasing %d held message(s)", len(leases), extra={"stage": "stop"})
        results = await asyncio.gather(*(lease.release(0) for lease in leases), return_exceptions=True)
        for lease, result in zip(leases, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("could not release %s: %s", lease.message.id, result)
        self._held.clear()

    # -- stages ----------------------------------------------------------------------------------

    async def _sequential(self) -> None:
        while not self.stopping.is_set():
            batch = await self._next_batch(1)
            if batch is None:
                return
            for held in batch:
                generation = await self._generate(held)
                if generation is not None:
                    await self._finish(held, generation)

    async def _fetch_loop(self) -> None:
        prefetch = self.settings.prefetch
        while not self.stopping.is_set():
            room = self._room(prefetch - self._ready.qsize())
            # Refill in batches (half the prefetch at a time) unless the generator is about to starve:
            # one receive then serves several jobs, and each receive costs ~2 ms of SDK CPU.
            if room <= 0 or (room < (prefetch + 1) // 2 and not self._ready.empty()):
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = await self._next_batch(room)
            if batch is None:
                return
            for held in batch:
                self._ready.put_nowait(held)

    async def _generate_loop(self) -> None:
        """Dispatch generations in order. With SIDECAR_A1111_QUEUE_AHEAD the next request is sent while
        the current one runs: it waits at A1111's queue lock and starts the instant the GPU is free."""
        depth = 2 if self.settings.a1111_queue_ahead else 1
        inflight: deque[tuple[Held, asyncio.Task[Generation | None]]] = deque()
        getter: asyncio.Task[Held | None] | None = None
        fetching = True
        try:
            while fetching or inflight:
                if fetching and getter is None and len(inflight) < depth:
                    getter = asyncio.create_task(self._ready.get())
                waiting: set[asyncio.Future[Any]] = {getter} if getter else set()
                if inflight:
                    waiting.add(inflight[0][1])
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if getter is not None and getter.done():
                    held, getter = getter.result(), None
                    self._wake.set()
                    if held is None:
                        fetching = False
                    elif self.stopping.is_set():
                        await self._give_back(held)
                    else:
                        ahead = inflight[-1][1] if inflight else None
                        task = asyncio.create_task(
                            self._generate(held, ahead), name=f"generate-{held.job.id}"
                        )
                        inflight.append((held, task))
                    continue
                held, task = inflight.popleft()
                generation = task.result()
                if generation is not None:
                    await self._upload_slots.acquire()
                    finish = asyncio.create_task(
                        self._finish_in_slot(held, generation), name=f"finish-{held.job.id}"
                    )
                    self._finishing.add(finish)
                    finish.add_done_callback(self._finishing.discard)
        finally:
            # Cancelled (the grace period ran out): stop what is still running; leases are released later.
            leftovers: list[asyncio.Task[Any]] = [task for _, task in inflight] + ([getter] if getter else [])
            for leftover in leftovers:
                leftover.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)

    def _room(self, wanted: int) -> int:
        """How many more jobs to hold: prefetch room, and never more than --max-jobs needs."""
        if self.max_jobs is None:
            return wanted
        return min(wanted, self.max_jobs - self.finished - self.in_pipeline)

    async def _next_batch(self, room: int) -> list[Held] | None:
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
        room = min(room, MAX_RECEIVE)
        for queue in self._poller.due():
            with self.metrics.stage("receive"):
                messages = await self._storage_call(
                    self.storage.receive(queue, room, self.settings.visibility_timeout)
                )
            if messages:
                self._poller.found(queue)
                break
            self._poller.empty(queue)
        else:
            return None
        batch = []
        for message in messages:
            lease = Lease(self.storage, message, self.settings.visibility_timeout, on_refused=self._abort)
            self._held.add(lease)
            try:
                held = await self._admit(message, lease)
            except (FatalError, asyncio.CancelledError):
                raise
            except Exception as error:
                # Whatever one message does, it stops only itself (the Functions queue trigger's rule).
                await self._poison_unexpected(lease, error)
                continue
            if held is not None:
                batch.append(held)
        return batch

    async def _admit(self, message: Message, lease: Lease) -> Held | None:
        """A received message as a job to run, or None once it went to the poison queue: tried too
        often (checked before anything else is done with it, as the Functions trigger does) or
        not a valid job."""
        limit = self.settings.max_dequeue_count
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
                    await self._defer(lease, job, missing)
                    return None
                error = missing
        hint = job_id_hint(message.content)
        log.warning(
            "invalid job: %s" if isinstance(error, InvalidJob) else "job poisoned on receipt: %s",
            error,
            extra={"message_id": message.id, "job_id": hint, "stage": "validate"},
        )
        await self._outcome("poisoned", lease, lease.poison(hint, error))
        await self._notify(hint or message.id, "failed", [], [], {}, error)
        await self._forget_failure(message)
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

    async def _defer(self, lease: Lease, job: Job, missing: AssetMissing) -> None:
        """Hand the job back for a node that has what it names: not a failure of the job or the node."""
        delay = self.settings.release_delay
        log.warning(
            "handed back for another node (in %ss): %s",
            delay,
            missing,
            extra={"job_id": job.id, "message_id": lease.message.id, "stage": "assets"},
        )
        await self.storage.record_failure(lease.message, f"{missing.kind}: {missing}")
        await self._outcome("deferred", lease, lease.release(delay))

    async def _poison_unexpected(self, lease: Lease, error: Exception) -> None:
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
            await self._outcome(
                "poisoned", lease, lease.poison(job_id_hint(message.content), Unexpected(error))
            )
        except (FatalError, asyncio.CancelledError):
            raise
        except Exception as again:
            log.error("could not poison %s either (%s): it comes back later", message.id, again)
            lease.abandon()
            self._held.discard(lease)

    async def _generate(
        self, held: Held, ahead: asyncio.Task[Generation | None] | None = None
    ) -> Generation | None:
        job = held.job
        self.metrics.in_flight.labels("generate").inc()
        try:
            with self.metrics.stage("generate"), self.metrics.busy:
                generation = await self._with_retries(job, ahead)
        except (TransientError, PermanentError) as error:
            await self._fail(held, error)
            return None
        except SidecarError:
            raise
        except Exception as error:
            log.error("unexpected error generating %s", job.id, exc_info=error, extra={"job_id": job.id})
            await self._fail(held, Unexpected(error))
            return None
        except asyncio.CancelledError:
            # Cut off by the shutdown deadline: A1111 would go on generating for nobody.
            await asyncio.shield(self.a1111.interrupt())
            raise
        finally:
            self.metrics.in_flight.labels("generate").dec()
        if len(generation.images) < job.image_count:
            short = A1111ServerError(
                200, f"A1111 returned {len(generation.images)} of {job.image_count} images"
            )
            await self._fail(held, short)
            return None
        self._failures_in_a_row = 0
        log.debug(
            "generated",
            extra={"job_id": job.id, "stage": "generate", "seconds": round(generation.seconds, 3)},
        )
        return generation

    async def _with_retries(self, job: Job, ahead: asyncio.Task[Generation | None] | None) -> Generation:
        """A 5xx from A1111 (CUDA out of memory, say) is tried again a few times before giving up. A
        generation an interrupt may have cut short (the one queued behind a timed-out one) is made
        again at once: the job did nothing wrong, so no failure is counted."""
        s = self.settings
        payload = job.txt2img_payload()
        for remade in range(MAX_REMAKES + 1):
            try:
                return await call_with_retries(
                    s,
                    A1111ServerError,
                    functools.partial(self.a1111.txt2img, payload, s.generation_timeout, after=ahead),
                    attempts=3,
                )
            except A1111CutShort as error:
                if remade == MAX_REMAKES:
                    raise
                log.info("%s; generating it again", error, extra={"job_id": job.id, "stage": "generate"})
                self.metrics.discarded.inc()
                ahead = None  # what it waited behind is over
        raise AssertionError("unreachable")

    async def _finish_in_slot(self, held: Held, generation: Generation) -> None:
        try:
            await self._finish(held, generation)
        except FatalError:
            pass  # already told to the worker (_abort), which stops and releases the message
        finally:
            self._upload_slots.release()

    async def _finish(self, held: Held, generation: Generation) -> None:
        """Decode and store every image and job.json, then delete the message."""
        job = held.job
        started = time.time()
        self.metrics.in_flight.labels("upload").inc()
        try:
            try:
                # SIMD base64: ~0.03 ms for a 450 KB PNG where the standard library takes ~1.2 ms.
                images = [pybase64.b64decode(image, validate=True) for image in generation.images]
            except (binascii.Error, ValueError):
                await self._fail(held, A1111ServerError(200, "txt2img returned an image that is not base64"))
                return
            names = [f"{job.id}/{index}.png" for index in range(len(images))]
            with self.metrics.stage("upload"):
                await self._storage_call(
                    asyncio.gather(
                        *(
                            self.storage.upload(name, data, PNG)
                            for name, data in zip(names, images, strict=True)
                        )
                    )
                )
                timings = {
                    "queued_s": round(max(0.0, generation.started - held.fetched_at), 4),
                    "generate_s": round(generation.seconds, 4),
                    "upload_s": round(time.time() - started, 4),
                }
                record = self._record(held, generation, names, timings)
                await self._storage_call(self.storage.upload(f"{job.id}/job.json", record, JSON))
        except TransientError as error:
            await self._fail(held, error)
            return
        except SidecarError:
            raise
        except Exception as error:
            log.error("unexpected error storing %s", job.id, exc_info=error, extra={"job_id": job.id})
            await self._fail(held, Unexpected(error))
            return
        finally:
            self.metrics.in_flight.labels("upload").dec()
        timings["total_s"] = round(time.time() - held.fetched_at, 4)
        if self._aborted.is_set():
            return  # stopping for good: the message is released on the way out, not deleted
        if await self._outcome("succeeded", held.lease, held.lease.complete()) != "succeeded":
            log.warning("blobs stored, but the message is not ours to delete", extra={"job_id": job.id})
            return
        self.metrics.images.inc(len(names))
        log.info("job done", extra={"job_id": job.id, "stage": "done", "images": len(names), **timings})
        await self._forget_failure(held.lease.message)
        await self._notify(job.id, "succeeded", [*names, f"{job.id}/job.json"], generation.seeds, timings)

    def _record(
        self, held: Held, generation: Generation, names: list[str], timings: dict[str, float]
    ) -> bytes:
        message = held.lease.message
        record: dict[str, Any] = {
            "job_id": held.job.id,
            "message_id": message.id,
            "queue": message.queue,
            "dequeue_count": message.dequeue_count,
            "job": held.job.received,
            "request": generation.request,
            "info": generation.info,
            "images": names,
            "timings": timings,
            "worker": {"id": self.settings.worker_id, "version": __version__},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return orjson.dumps(record, option=orjson.OPT_INDENT_2)

    # -- outcomes --------------------------------------------------------------------------------

    async def _fail(self, held: Held, error: SidecarError) -> None:
        job, message = held.job, held.lease.message
        extra = {"job_id": job.id, "message_id": message.id, "error": error.kind}
        last_try = message.dequeue_count >= self.settings.max_dequeue_count
        if isinstance(error, A1111Unavailable):
            # A1111 is gone: this node can do nothing useful; it stops and is restarted. The job counts
            # a try, so one that kills A1111 every time is poisoned at the limit, naming the cause.
            self.fatal = error
            self._stop()
            if last_try:
                died = A1111Unavailable(
                    f"A1111 went away during this job on try {message.dequeue_count} of "
                    f"{self.settings.max_dequeue_count}: {error}"
                )
                log.warning("job failed for good: %s", died, extra=extra)
                await self._outcome("poisoned", held.lease, held.lease.poison(job.id, died))
                await self._notify(job.id, "failed", [], [], {}, died)
                await self._forget_failure(message)
            else:
                await self.storage.record_failure(message, f"{error.kind}: {error}")
                await self._give_back(held)
            return
        if isinstance(error, PermanentError) or last_try:
            log.warning("job failed for good: %s", error, extra=extra)
            await self._outcome("poisoned", held.lease, held.lease.poison(job.id, error))
            await self._notify(job.id, "failed", [], [], {}, error)
            await self._forget_failure(message)
        else:
            delay = self.settings.release_delay
            log.warning("job failed, retried in %ss: %s", delay, error, extra=extra)
            await self.storage.record_failure(message, f"{error.kind}: {error}")
            await self._outcome("retried", held.lease, held.lease.release(delay))
        if isinstance(error, TransientError):
            self._failures_in_a_row += 1
            if self._failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
                self.fatal = SidecarError(f"{self._failures_in_a_row} failures in a row, last: {error}")
                self._stop()

    async def _forget_failure(self, message: Message) -> None:
        """A message settled for good needs no note of an earlier failed try (only retries have one)."""
        if message.dequeue_count > 1:
            await self.storage.forget_failure(message)

    async def _give_back(self, held: Held) -> None:
        await self._outcome("released", held.lease, held.lease.release(0))

    async def _outcome(self, outcome: str, lease: Lease, action: Coroutine[Any, Any, bool]) -> str:
        """Settle a message (delete, release or poison) and count what happened to it."""
        try:
            ours = await self._storage_call(action)
        except TransientError as error:
            # Storage is away beyond the retry budget: the message comes back when its lease runs out.
            log.warning("could not settle %s: %s", lease.message.id, error, extra={"error": error.kind})
            lease.abandon()
            outcome, ours = "abandoned", True
        except StorageRefused:
            raise  # still held: released on the way out, where storage allows it
        except BaseException:
            self._held.discard(lease)
            raise
        self._held.discard(lease)
        self._wake.set()
        outcome = outcome if ours else "lost"
        self.outcomes[outcome] += 1
        self.metrics.jobs.labels(outcome).inc()
        if self.max_jobs is not None and self.finished >= self.max_jobs:
            self._stop()
        return outcome

    async def _notify(
        self,
        job_id: str,
        status: str,
        blobs: list[str],
        seeds: list[int],
        timings: dict[str, float],
        error: SidecarError | None = None,
    ) -> None:
        queue = self.settings.result_queue_name
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
            await self._storage_call(self.storage.send(queue, json.dumps(body)))
        except TransientError as error:
            log.warning(
                "result message not sent: %s",
                error,
                extra={"job_id": job_id, "stage": "notify", "error": error.kind, "status": status},
            )

    async def _storage_call(self, awaitable: Any) -> Any:
        """Storage refusing us for good (credentials, a deleted queue or container) ends the worker
        at once: the refusal is raised on, so the stage that met it goes no further."""
        try:
            return await awaitable
        except StorageRefused as error:
            self._abort(error)
            raise
        except (SidecarError, asyncio.CancelledError):
            raise
        except Exception as error:
            log.exception("unexpected error; stopping", extra={"stage": "stop"})
            self.fatal = SidecarError(f"unexpected {type(error).__name__}: {error}")
            self._stop()
            raise

    # -- idling ----------------------------------------------------------------------------------

    async def _empty_and_idle(self) -> bool:
        """Drained (--exit-when-empty): every queue empty and nothing held. With --wait-invisible,
        messages still invisible (a dead consumer's, until its visibility runs out) are waited for,
        up to that many seconds after the queue first looked empty."""
        if not (
            self.exit_when_empty
            and self._poller.all_empty()
            and self.in_pipeline == 0
            and not self._finishing
        ):
            self._empty_since = None
            return False
        if self.wait_invisible > 0:
            now = time.monotonic()
            self._empty_since = self._empty_since or now
            if now - self._empty_since < self.wait_invisible:
                try:
                    counts = [await self.storage.approximate_count(q) for q in self.settings.queue_name]
                except TransientError:
                    counts = [1]  # cannot tell now: look again at the next poll
                except SidecarError:
                    counts = [0]  # may not look (a node's SAS cannot read queue metadata): do not wait
                if sum(counts):
                    return False
        self.drained = True
        self._stop()
        return True

    async def _idle(self) -> None:
        """Wait until a queue is due for polling again (or a stop). Draining (--exit-when-empty), a job
        settling also wakes the fetcher, so the last one is followed by the final poll at once."""
        wake = self.stopping
        if self.exit_when_empty:
            wake = self._wake
            wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=max(self._poller.wait(), 0.01))
