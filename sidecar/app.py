"""The wiring: build a worker from settings (storage, A1111, endpoints, supervisor), start up, run.

Below the CLI (which parses arguments and calls `run_worker`) and above the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from typing import Any

from sidecar import __version__
from sidecar.a1111 import IMAGE_FORMATS, A1111Client, http_client
from sidecar.assets import Catalog
from sidecar.config import Settings
from sidecar.credentials import earliest_expiry
from sidecar.credentials import watch as watch_expiry
from sidecar.endpoints import Health, bound_port, serve
from sidecar.errors import A1111Unavailable, CatalogError, SidecarError
from sidecar.observability import Metrics
from sidecar.pipeline.stop import StopReason
from sidecar.policy import Policies, RunLimits
from sidecar.storage import Storage
from sidecar.storage.refusals import ERROR_CODES as STORAGE_ERROR_CODES
from sidecar.supervisor import Supervisor
from sidecar.worker import Worker

log = logging.getLogger("sidecar")


@contextlib.contextmanager
def capture_signals(worker: Worker) -> Iterator[None]:
    """First SIGTERM/SIGINT drains; a second one exits at once. Handlers are restored afterwards."""
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def handle(sig: int) -> None:
        received.append(sig)
        if len(received) > 1:
            log.error("second signal: exiting at once", extra={"stage": "stop"})
            os._exit(1)
        log.info("%s: draining, then stopping", signal.Signals(sig).name, extra={"stage": "stop"})
        worker.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def run_worker(
    settings: Settings,
    max_jobs: int | None = None,
    exit_when_empty: bool = False,
    wait_invisible: float = 0.0,
) -> int:
    """Start up (endpoints, A1111, storage, warm-up), then process jobs. Returns the exit code."""
    metrics = Metrics(settings.generation_timeout, storage_codes=STORAGE_ERROR_CODES)
    storage = Storage.connect(settings)
    async with http_client(settings.a1111_url, settings.a1111_credentials) as http:
        a1111 = A1111Client(http, IMAGE_FORMATS[settings.image_format], settings.image_quality)
        catalog = Catalog(
            http,
            refresh_interval=settings.asset_refresh_interval,
            face_restoration_available=settings.face_restoration_available,
            check_negative_prompts=True,  # a LoRA named anywhere in the job must be here
        )
        run = RunLimits(max_jobs, exit_when_empty, wait_invisible)
        worker = Worker(Policies.from_settings(settings, run), storage, a1111, metrics, catalog=catalog)
        health = Health(worker.stop, storage_answering=lambda: storage.answering)
        supervisor = (
            Supervisor(settings.a1111_command, worker.a1111_exited) if settings.a1111_command else None
        )
        endpoints = await serve(health, metrics, settings.http_port)
        try:
            with capture_signals(worker):
                log.info(
                    "starting",
                    extra={
                        "stage": "start",
                        "version": __version__,
                        "worker_id": settings.worker_id,
                        "queues": settings.queue_name,
                        "prefetch": settings.prefetch,
                        "http_port": bound_port(endpoints),
                    },
                )
                if supervisor is not None:
                    await supervisor.start()
                code = await _start_up(worker, storage, a1111, settings, catalog)
                if code is not None:
                    return code
                health.a1111_warm = True
                # Failed storage tries are counted from here: the start-up's existence probes expect
                # their 404s.
                storage.on_error = metrics.storage_error
                background = [asyncio.create_task(metrics.summarize(settings.summary_interval))]
                expiry = earliest_expiry(settings)
                if expiry is not None:
                    metrics.watch_credential_expiry(expiry.seconds_left)
                    background.append(asyncio.create_task(watch_expiry(expiry, worker.credential_expired)))
                try:
                    code = await worker.run()
                finally:
                    for task in background:
                        task.cancel()
                cpu = os.times()
                log.info(
                    "stopped",
                    extra={
                        "stage": "stop",
                        **worker.outcomes,
                        # the process's CPU so far (the benchmark leaves out interpreter teardown)
                        "cpu_user_s": round(cpu.user, 3),
                        "cpu_system_s": round(cpu.system, 3),
                    },
                )
                return code
        finally:
            if not worker.stop.is_set:  # an exception on the way: not ready while closing down
                worker.stop.set(StopReason.UNEXPECTED)
            if supervisor is not None:
                await supervisor.stop()
            await endpoints.cleanup()
            await storage.close()


async def _start_up(
    worker: Worker, storage: Storage, a1111: A1111Client, settings: Settings, catalog: Catalog
) -> int | None:
    """Storage answers and A1111 passes its warm-up; an exit code if that cannot be (or a signal came).

    Every way it can fail ends in one line: storage refusing (a wrong key, an API version, a queue it
    may not create) or unreachable after the retry budget (host and the OS's reason), A1111 not usable.
    """

    async def a1111_ready() -> None:
        await a1111.wait_ready(settings.a1111_start_timeout, settings.generation_timeout)
        try:
            await catalog.load()  # what it has: LoRAs, checkpoints, VAEs, samplers, ...
        except CatalogError as error:
            raise A1111Unavailable(f"cannot read what A1111 has installed: {error}") from None

    steps: set[asyncio.Task[Any]] = {
        asyncio.create_task(storage.ensure(), name="storage"),
        asyncio.create_task(a1111_ready(), name="a1111"),
    }
    stop: asyncio.Task[Any] = asyncio.create_task(worker.stop.wait())
    pending = set(steps)
    try:
        while pending and not stop.done():
            done, pending = await asyncio.wait(pending | {stop}, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(stop)
            for step in done - {stop}:
                error = step.exception()
                if isinstance(error, A1111Unavailable):
                    log.error("A1111 is not usable: %s", error, extra={"stage": "start"})
                    worker.stop.set(StopReason.A1111_NOT_USABLE)
                    return worker.stop.exit_code
                if isinstance(error, SidecarError):
                    log.error(
                        "storage is not usable: %s", error, extra={"stage": "start", "error": error.kind}
                    )
                    worker.stop.set(StopReason.STORAGE_NOT_USABLE)
                    return worker.stop.exit_code
                if error is not None:
                    raise error
    finally:
        for task in [*pending, stop]:
            task.cancel()
        await asyncio.gather(*pending, stop, return_exceptions=True)
    if pending:  # a signal (or A1111 exiting) came first
        return worker.stop.exit_code
    return None
