"""Generation: one txt2img per job, in order, with queue-ahead.

With SIDECAR_A1111_QUEUE_AHEAD the next request is sent while the current one runs: it waits at
A1111's queue lock and starts the instant the GPU is free. A 5xx (CUDA out of memory, say) is tried
again a few times; a generation the worker's own interrupt may have cut short is made again at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.a1111 import Generation
from sidecar.backoff import call_with_retries, retry_log_extra
from sidecar.errors import (
    A1111CutShort,
    A1111ServerError,
    FatalError,
    PermanentError,
    SidecarError,
    TransientError,
    Unexpected,
)
from sidecar.jobs import Job
from sidecar.observability import Metrics
from sidecar.pipeline.book import Book, Held
from sidecar.pipeline.ports import Painter
from sidecar.pipeline.settle import Settler
from sidecar.pipeline.stop import Stop
from sidecar.policy import GenerationPolicy, RetryPolicy

log = logging.getLogger("sidecar.worker")  # the worker's log lines keep their logger's name

Dispatch = Callable[[Held, Generation], Awaitable[None]]


class Generator:
    def __init__(
        self,
        a1111: Painter,
        book: Book,
        settler: Settler,
        stop: Stop,
        metrics: Metrics,
        *,
        policy: GenerationPolicy,
        retry: RetryPolicy,
    ) -> None:
        self.a1111 = a1111
        self.book = book
        self.settler = settler
        self.stop = stop
        self.metrics = metrics
        self.policy = policy
        self.retry = retry

    async def loop(self, ready: asyncio.Queue[Held | None], dispatch: Dispatch) -> None:
        """Generate the jobs from ``ready`` in order (None: no more), handing each generation to
        ``dispatch`` (the finisher, which may make it wait for an upload slot)."""
        depth = self.policy.depth
        inflight: deque[tuple[Held, asyncio.Task[Generation | None]]] = deque()
        getter: asyncio.Task[Held | None] | None = None
        fetching = True
        try:
            while fetching or inflight:
                if fetching and getter is None and len(inflight) < depth:
                    getter = asyncio.create_task(ready.get())
                waiting: set[asyncio.Future[Any]] = {getter} if getter else set()
                if inflight:
                    waiting.add(inflight[0][1])
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if getter is not None and getter.done():
                    held, getter = getter.result(), None
                    self.book.wake.set()
                    if held is None:
                        fetching = False
                    elif self.stop.is_set:
                        await self.settler.give_back(held)
                    else:
                        ahead = inflight[-1][1] if inflight else None
                        task = asyncio.create_task(self.generate(held, ahead), name=f"generate-{held.job.id}")
                        inflight.append((held, task))
                    continue
                held, task = inflight.popleft()
                generation = task.result()
                if generation is not None:
                    await dispatch(held, generation)
        finally:
            # Cancelled (the grace period ran out): stop what is still running; leases are released later.
            leftovers: list[asyncio.Task[Any]] = [task for _, task in inflight] + ([getter] if getter else [])
            for leftover in leftovers:
                leftover.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)

    async def generate(
        self, held: Held, ahead: asyncio.Task[Generation | None] | None = None
    ) -> Generation | None:
        """The job's generation, or None once the job failed (and was settled)."""
        job = held.job
        self.metrics.in_flight.labels("generate").inc()
        try:
            with retry_log_extra(job_id=job.id):
                generation = await self._with_retries(job, ahead)
        except (TransientError, PermanentError) as error:
            await self.settler.fail(held, error)
            return None
        except FatalError as error:
            # No job can run here (A1111 refuses our credentials): stop at once; the job is given back
            # on the way out, never failed.
            self.stop.abort(error)
            raise
        except SidecarError:
            raise
        except Exception as error:
            log.error("unexpected error generating %s", job.id, exc_info=error, extra={"job_id": job.id})
            await self.settler.fail(held, Unexpected(error))
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
            await self.settler.fail(held, short)
            return None
        self.settler.generated()
        log.debug(
            "generated",
            extra={"job_id": job.id, "stage": "generate", "seconds": round(generation.seconds, 3)},
        )
        return generation

    async def _with_retries(self, job: Job, ahead: asyncio.Task[Generation | None] | None) -> Generation:
        """A 5xx from A1111 (CUDA out of memory, say) is tried again a few times before giving up. A
        generation an interrupt may have cut short (the one queued behind a timed-out one) is made
        again at once: the job did nothing wrong, so no failure is counted."""
        policy = self.policy
        payload = job.txt2img_payload()
        for remade in range(policy.max_remakes + 1):
            try:
                return await call_with_retries(
                    self.retry,
                    A1111ServerError,
                    functools.partial(self._attempt, payload, ahead),
                    attempts=policy.attempts,
                )
            except A1111CutShort as error:
                if remade == policy.max_remakes:
                    raise
                log.info("%s; generating it again", error, extra={"job_id": job.id, "stage": "generate"})
                self.metrics.discarded.inc()
                ahead = None  # what it waited behind is over
        raise AssertionError("unreachable")

    async def _attempt(
        self, payload: dict[str, Any], ahead: asyncio.Task[Generation | None] | None
    ) -> Generation:
        """One txt2img request, metered: its wait at A1111's queue lock, its GPU time, its error."""
        with self.metrics.a1111_attempt():
            return await self.a1111.txt2img(payload, self.policy.timeout, after=ahead)
