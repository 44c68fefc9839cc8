"""The worker: its lifecycle, and the pipeline's stages wired together (``sidecar.pipeline``).

Queue message -> job -> A1111 txt2img -> image bytes -> blobs -> delete. With ``SIDECAR_PREFETCH=0``
it is the Go worker's strict loop: receive, generate, upload, delete, then receive again. With
``SIDECAR_PREFETCH=N`` (N >= 1) three stages overlap:

    fetcher ──ready (<= N jobs)──> generator (one txt2img at a time) ──> finishers (<= upload slots)

The fetcher keeps up to N validated jobs waiting, so the next txt2img starts the moment the previous
one returns; finishers decode and upload while the next generation runs. When uploads fall behind,
the generator waits for a free upload slot and the fetcher for room in ``ready``: memory stays bounded.

Every held message has a Lease (renewed at half-life). Stopping (``Stop``, with a reason): fetching
stops, the current generation and its uploads finish (within the grace period after a signal),
waiting jobs are released at once (visibility 0) so other nodes take them; whatever is still held
after the deadline is released too. A reason that aborts (storage refused us) finishes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from sidecar.errors import A1111Unavailable, FatalError, SidecarError
from sidecar.formatting import plural
from sidecar.observability import Metrics
from sidecar.pipeline.affinity import Window
from sidecar.pipeline.book import Book, Held
from sidecar.pipeline.fetch import Fetcher
from sidecar.pipeline.finish import Finisher
from sidecar.pipeline.generate import Generator
from sidecar.pipeline.ports import Assets, Painter, Store
from sidecar.pipeline.settle import Settler
from sidecar.pipeline.stop import Stop, StopReason
from sidecar.policy import Policies
from sidecar.polling import Poller

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        policies: Policies,
        storage: Store,
        a1111: Painter,
        metrics: Metrics,
        *,
        catalog: Assets | None = None,
        stop: Stop | None = None,
    ) -> None:
        self.policies = policies
        self.storage = storage
        self.metrics = metrics
        self.stop = stop or Stop()
        self.book = Book()
        self.settler = Settler(
            storage, self.book, self.stop, metrics, policies.tries, policies.reporting, policies.run.max_jobs
        )
        # Jobs wait in ``ready`` between fetching and generating, handed out by model affinity.
        self._ready = Window(policies.pipeline.affinity_max_wait)
        self.fetcher = Fetcher(
            storage,
            Poller.from_policy(policies.polling, prefer_for=policies.pipeline.affinity_max_wait),
            self.book,
            self.settler,
            self.stop,
            metrics,
            lease=policies.lease,
            tries=policies.tries,
            limits=policies.limits,
            pipeline=policies.pipeline,
            run=policies.run,
            catalog=catalog,
        )
        self.generator = Generator(
            a1111,
            self.book,
            self.settler,
            self.stop,
            metrics,
            policy=policies.generation,
            retry=policies.retry,
        )
        self.finisher = Finisher(
            storage,
            self.book,
            self.settler,
            self.stop,
            metrics,
            upload_concurrency=policies.pipeline.upload_concurrency,
            reporting=policies.reporting,
        )

    # -- what stops it, from outside -------------------------------------------------------------

    def request_stop(self) -> None:
        """First SIGTERM/SIGINT: stop fetching, finish what runs within the grace period. Every storage
        call from now on ends within it, the releases on the way out get one short try after it."""
        self.storage.deadline = time.monotonic() + self.policies.pipeline.shutdown_grace
        self.stop.set(StopReason.SIGNAL)

    def credential_expired(self, error: FatalError) -> None:
        """The SAS is about to expire: stop at once, as for a refusal (held messages are released)."""
        self.stop.abort(error)

    def a1111_exited(self, code: int) -> None:
        """The supervised A1111 died: drain, give back what is held, exit non-zero."""
        self.stop.set(StopReason.A1111_GONE, A1111Unavailable(f"A1111 exited with code {code}"))

    @property
    def outcomes(self) -> Counter[str]:
        return self.book.outcomes

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> int:
        """Process jobs until stopped, drained (--exit-when-empty) or done (--max-jobs). Exit code."""
        stop = self.stop
        work = asyncio.create_task(self._work(), name="work")
        signalled = asyncio.create_task(stop.wait_signalled())
        aborted = asyncio.create_task(stop.wait_aborted())
        try:
            await asyncio.wait({work, signalled, aborted}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done() and stop.aborting:
                work.cancel()
                await asyncio.wait({work})
            if not work.done():
                grace = asyncio.create_task(asyncio.sleep(self.policies.pipeline.shutdown_grace))
                await asyncio.wait({work, grace, aborted}, return_when=asyncio.FIRST_COMPLETED)
                grace.cancel()
                if not work.done():
                    if not stop.aborting:
                        log.warning(
                            "grace period over; giving back what is still held", extra={"stage": "stop"}
                        )
                    work.cancel()
                    await asyncio.wait({work})
            error = None if work.cancelled() else work.exception()
            if isinstance(error, FatalError):
                stop.abort(error)
            elif error is not None:
                log.error("unexpected error; stopping", exc_info=error, extra={"stage": "stop"})
                stop.set(StopReason.UNEXPECTED, SidecarError(f"unexpected {type(error).__name__}: {error}"))
        except asyncio.CancelledError:
            work.cancel()
            await asyncio.wait({work})
            raise
        finally:
            signalled.cancel()
            aborted.cancel()
            await self._release_all()
        if self.policies.pipeline.prefetch > 0:
            window = self._ready
            log.info(
                "affinity",
                extra={
                    "stage": "stop",
                    "model_switches": window.switches,
                    "passed_over_max_s": round(window.passed_over_max, 3),
                },
            )
        if stop.error is not None:
            log.error("stopping: %s", stop.error, extra={"stage": "stop", "error": stop.error.kind})
        elif stop.reason is StopReason.DRAINED:
            await self._report_invisible()
        return stop.exit_code

    async def _report_invisible(self) -> None:
        """The drain's last word: how many messages are still invisible (held by other consumers, or
        by dead ones until their visibility runs out); --wait-invisible waits for them."""
        try:
            counts = await asyncio.gather(
                *(self.storage.approximate_count(q) for q in self.policies.polling.queues)
            )
        except SidecarError as error:
            log.warning("drained; could not count what is left: %s", error, extra={"stage": "stop"})
            return
        left = sum(counts)
        text = f"drained; {plural(left, 'message')} still invisible under other consumers' leases"
        log.info(text if left else "drained; the queue is empty", extra={"stage": "stop", "invisible": left})

    async def _work(self) -> None:
        try:
            if self.policies.pipeline.prefetch == 0:
                await self._sequential()
            else:
                generator = asyncio.create_task(
                    self.generator.loop(self._ready, self.finisher.start), name="generator"
                )
                fetcher = asyncio.create_task(self.fetcher.loop(self._ready), name="fetcher")

                def generator_ended(task: asyncio.Task[None]) -> None:
                    # A FatalError in a generation (A1111 refusing the credentials, say) must stop
                    # the fetching too, not wait behind a fetch loop that never ends.
                    if not task.cancelled() and task.exception() is not None:
                        fetcher.cancel()

                generator.add_done_callback(generator_ended)
                try:
                    try:
                        await fetcher  # a cancel of this task reaches the fetch loop, as before
                    except asyncio.CancelledError:
                        if generator.cancelled() or not generator.done() or generator.exception() is None:
                            raise
                    else:
                        await self._give_back_waiting()
                finally:
                    fetcher.cancel()
                    self._ready.put_nowait(None)
                    await generator  # raises the generator's error, if it has one
            await self.finisher.wait()
        except asyncio.CancelledError:
            await self.finisher.cancel()
            raise

    async def _sequential(self) -> None:
        """SIDECAR_PREFETCH=0: receive one job, generate it, store it, then receive the next."""
        while not self.stop.is_set:
            batch = await self.fetcher.next_batch(1)
            if batch is None:
                return
            for held in batch:
                generation = await self.generator.generate(held)
                if generation is not None:
                    await self.finisher.finish(held, generation)

    async def _give_back_waiting(self) -> None:
        """Stopping: the prefetched jobs no generation has taken go back at once, for other nodes."""
        waiting: list[Held] = []
        while not self._ready.empty():
            item = self._ready.get_nowait()
            if item is not None:
                waiting.append(item)
        if waiting:
            log.info("giving back %s", plural(len(waiting), "prefetched job"), extra={"stage": "stop"})
            await asyncio.gather(*(self.settler.give_back(held) for held in waiting), return_exceptions=True)

    async def _release_all(self) -> None:
        """Give back every message still held (visibility 0), so another node takes it at once."""
        leases = [lease for lease in self.book.held if not lease.ended]
        if leases:
            log.info("releasing %s", plural(len(leases), "held message"), extra={"stage": "stop"})
        results = await asyncio.gather(*(lease.release(0) for lease in leases), return_exceptions=True)
        for lease, result in zip(leases, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("could not release %s: %s", lease.message.id, result)
        self.book.held.clear()
