"""One mode of the benchmark: a fresh queue with the jobs, the worker as a child process behind the
storage proxy, watched from its first ``/readyz`` 200 to its exit, then the stored jobs checked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from sidecar.config import Settings, load_settings
from sidecar.dev.devenv import Azurite, Standin, connection_string, free_port, source_checkout
from sidecar.dev.measure import Measured, cpu_seconds, read_log, rss_mb, summarise
from sidecar.dev.proxy import StorageProxies, storage_proxies
from sidecar.dev.scenario import BenchError, ModeRun, Scenario
from sidecar.enqueue import Item, enqueue, generated
from sidecar.formatting import plural
from sidecar.storage import Storage

READY_TIMEOUT = 120.0
PROGRESS_EVERY = 10.0


def _settings(server: Azurite, mode: str) -> Settings:
    return load_settings(
        {
            "storage_connection_string": server.connection_string,
            "queue_name": f"bench-{mode}",
            "container_name": f"bench-{mode}",
            "retry_base_delay": 0.1,
            "log_format": "json",
        }
    )


def _jobs(scenario: Scenario) -> Iterator[Item]:
    """The benchmark's jobs; with --models, each names a checkpoint drawn at random (seeded)."""
    rng, names = random.Random(scenario.seed), scenario.checkpoints()
    for number, text in generated(scenario.jobs, scenario.seed):
        if names and isinstance(text, str):
            job = json.loads(text)
            job["override_settings"] = {"sd_model_checkpoint": rng.choice(names)}
            text = json.dumps(job)
        yield number, text


def _worker_env(
    scenario: Scenario, mode: str, proxies: StorageProxies, a1111: Standin | str, port: int
) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SIDECAR_") and key != "AZURE_STORAGE_CONNECTION_STRING"
    }
    env.update(
        {
            "SIDECAR_STORAGE_CONNECTION_STRING": connection_string(proxies.blob.port, proxies.queue.port),
            "SIDECAR_A1111_URL": a1111 if isinstance(a1111, str) else a1111.url,
            "SIDECAR_QUEUE_NAME": f"bench-{mode}",
            "SIDECAR_CONTAINER_NAME": f"bench-{mode}",
            "SIDECAR_PREFETCH": str(scenario.prefetch_of(mode)),
            "SIDECAR_HTTP_PORT": str(port),
            "SIDECAR_LOG_FORMAT": "json",
            "SIDECAR_POLL_INTERVAL_MIN": "0.02",
            "SIDECAR_POLL_INTERVAL_MAX": "0.2",
            "SIDECAR_WORKER_ID": f"bench-{mode}",
            "SIDECAR_A1111_START_TIMEOUT": "60",
        }
    )
    affinity = scenario.affinity_of(mode)
    if affinity is not None:
        env["SIDECAR_AFFINITY_MAX_WAIT"] = f"{affinity:g}"
    return env


async def _wait_ready(process: subprocess.Popen[bytes], url: str) -> float:
    """Poll /readyz; the unix time of its first 200."""
    deadline = time.monotonic() + READY_TIMEOUT
    async with httpx.AsyncClient(timeout=2.0) as http:
        while True:
            if process.poll() is not None:
                raise BenchError(f"the worker exited with {process.returncode} before it was ready")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return time.time()
            if time.monotonic() > deadline:
                raise BenchError(f"the worker was not ready after {READY_TIMEOUT:.0f}s")
            await asyncio.sleep(0.01)


async def _watch(
    process: psutil.Process, log: Path, mode: str, jobs: int, stop: asyncio.Event
) -> list[tuple[float, float]]:
    """Sample the resident set about once a second and report progress from the log now and then."""
    samples: list[tuple[float, float]] = []
    started = last_report = time.monotonic()
    while not stop.is_set():
        rss = rss_mb(process)
        if rss is not None:
            samples.append((time.time(), rss))
        now = time.monotonic()
        if now - last_report >= PROGRESS_EVERY:
            last_report = now
            done, seconds = log.read_bytes().count(b'"msg": "job done"'), now - started
            print(
                f"bench: {mode}: {done}/{jobs} jobs after {seconds:.0f}s ({done / seconds:.2f}/s)",
                file=sys.stderr,
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    return samples


def _spawn(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """The worker, its stdout and stderr (the JSON log) to ``log_path``, in its own session."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--exit-when-empty"],
            env=env,
            cwd=source_checkout(),  # a checkout's own package, installed or not
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def _reap(process: subprocess.Popen[bytes]) -> tuple[int, Any]:
    """Wait for the worker with wait4 (its rusage); blocking, run it in a thread."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage


def _limit_seconds(scenario: Scenario) -> float:
    """A generous bound on one mode's run, after which the worker is stopped (a hung benchmark)."""
    per_job = scenario.seconds_per_image + 12 * scenario.latency
    if scenario.bits_per_second > 0:
        per_job += 2 * 800_000 * 8 / scenario.bits_per_second
    return 120 + 4 * scenario.jobs * per_job


async def _verify(storage: Storage, jobs: int) -> dict[str, Any]:
    records = 0
    async for blob in storage.container.list_blobs():
        if blob.name.endswith("/job.json"):
            records += 1
    queue = storage.settings.queue_name[0]
    depths = []
    for name in (queue, storage.settings.poison_queue_for(queue)):
        props = await storage.queue(name).get_queue_properties()
        depths.append(int(props.approximate_message_count or 0))
    return {"job_records": records, "queue_left": depths[0], "poisoned": depths[1]}


async def run_mode(scenario: Scenario, mode: str, server: Azurite, a1111: Standin | str) -> ModeRun:
    """One mode against the stand-in, or a real A1111 (its URL: no stats, no reset)."""
    settings = _settings(server, mode)
    storage = Storage.connect(settings)
    try:
        await storage.ensure(create=True)  # its own emulator: nothing exists yet
        if not isinstance(a1111, str):
            async with httpx.AsyncClient(base_url=a1111.url) as http:
                (await http.post("/standin/reset")).raise_for_status()
        print(f"bench: {mode}: enqueueing {plural(scenario.jobs, 'job')}", file=sys.stderr)
        await enqueue(storage, settings.queue_name, _jobs(scenario))
        log_path = scenario.report / f"worker-{mode}.log"
        async with storage_proxies(
            server.blob_port, server.queue_port, scenario.latency, scenario.bits_per_second
        ) as proxies:
            measured = await _run_worker(scenario, mode, proxies, a1111, log_path)
            link = proxies.link
        stats: dict[str, Any] | None = None
        if not isinstance(a1111, str):
            async with httpx.AsyncClient(base_url=a1111.url) as http:
                stats = (await http.get("/standin/stats")).json()
        checks = await _verify(storage, scenario.jobs)
        with contextlib.suppress(Exception):
            await storage.container.delete_container()  # Azurite keeps blobs in memory: free them
    finally:
        await storage.close()
    return summarise(scenario, mode, measured, stats, read_log(log_path), checks, link)


async def _run_worker(
    scenario: Scenario, mode: str, proxies: StorageProxies, a1111: Standin | str, log_path: Path
) -> Measured:
    port = free_port()
    process = _spawn(_worker_env(scenario, mode, proxies, a1111, port), log_path)
    reaper: asyncio.Future[tuple[int, Any]] | None = None
    try:
        print(
            f"bench: {mode}: worker {process.pid} starting (SIDECAR_PREFETCH={scenario.prefetch_of(mode)})",
            file=sys.stderr,
        )
        ready = await _wait_ready(process, f"http://127.0.0.1:{port}/readyz")
        watched = psutil.Process(process.pid)
        cpu_at_ready = cpu_seconds(watched)
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch(watched, log_path, mode, scenario.jobs, stop))
        reaper = asyncio.ensure_future(asyncio.to_thread(_reap, process))
        done, _ = await asyncio.wait({reaper}, timeout=_limit_seconds(scenario))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if done:
                break
            print(f"bench: {mode}: the worker is taking too long; sending {sig.name}", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            done, _ = await asyncio.wait({reaper}, timeout=60.0)
        exit_code, usage = await reaper
        exited = time.time()
        stop.set()
        rss = await watcher
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            if reaper is not None:
                await reaper
            else:
                process.wait()
    return Measured(
        ready=ready,
        exited=exited,
        exit_code=exit_code,
        cpu_at_ready=cpu_at_ready,
        cpu_at_exit=(usage.ru_utime, usage.ru_stime),
        peak_rss_mb=usage.ru_maxrss / 1024,
        rss=rss,
    )
