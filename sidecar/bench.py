"""``bench``: the self-contained throughput benchmark, sequential (the Go worker) against pipelined.

It starts its own Azurite and A1111 stand-in and puts a latency proxy between the worker and storage
(a consumer node's round trip to Azure and its home uplink, ``sidecar.proxy``). For each mode it puts
the same N generated jobs on a fresh queue (directly, not through the proxy: enqueueing is not
measured), runs ``python -m sidecar run --exit-when-empty`` as a child process and measures it from
the moment its ``/readyz`` answers 200 until it exits:

* ``wall_s``, ``images_per_s``;
* ``gpu_busy_fraction``: the stand-in's generating seconds within that span / wall seconds; the
  worker's warm-up generation happens before readiness and is not counted;
* ``gpu_busy_fraction_steady``: the same between the first generation's start and the last one's end;
  ``first_generation_ms`` (ready -> first generation) and ``tail_ms`` (last generation -> exit) are
  the rest;
* ``gap_ms_p50``/``_p95``: idle time between one generation's end and the next one's start;
* ``sidecar_cpu_ms_per_image``: the worker's CPU time (user + system) per image from readiness
  (/proc) to its ``stopped`` log line (its own ``os.times()`` once every job is done and its clients
  are closed); ``sidecar_system_cpu_ms_per_image`` is the kernel's part of it, ``exit_cpu_ms`` the
  interpreter's teardown after that line (``wait4``'s rusage), a fixed cost per process;
* ``peak_rss_mb`` (rusage), ``rss_mb_at_half`` and ``rss_mb_at_end`` (VmRSS sampled every second);
* ``uplink_busy_fraction``: how much of the run the shaped uplink was transmitting;
* ``verified``: every job has its ``job.json``, the queue and the poison queue are empty, exit 0.

One JSON object per mode goes to stdout, then a ``speedup`` line; progress goes to stderr. The
report (``README.md`` with a throughput chart, and each worker's log) goes to ``--report``.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sidecar.chart import BLUE, GREEN, ORANGE, PALETTE, Guide, Series, line_chart, pick_bucket, rate_series
from sidecar.config import Settings, load_settings
from sidecar.devenv import ROOT, Azurite, Standin, azurite, connection_string, free_port, standin
from sidecar.enqueue import enqueue, generated
from sidecar.prompts import generate_jobs
from sidecar.proxy import Link, StorageProxies, storage_proxies
from sidecar.storage import Storage

MODES = {"sequential", "pipelined"}
READY_TIMEOUT = 120.0
PROGRESS_EVERY = 10.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


@dataclass
class Scenario:
    jobs: int = 200
    seconds_per_image: float = 0.25
    latency_ms: float = 40.0
    bandwidth_mbit: float = 25.0
    prefetch: int = 1
    modes: list[str] = field(default_factory=lambda: ["sequential", "pipelined"])
    report: Path = Path("bench-report")
    seed: int = 0

    @property
    def latency(self) -> float:
        return self.latency_ms / 1000

    @property
    def bits_per_second(self) -> float:
        return self.bandwidth_mbit * 1_000_000

    def prefetch_of(self, mode: str) -> int:
        return 0 if mode == "sequential" else self.prefetch

    def describe(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "seconds_per_image": self.seconds_per_image,
            "latency_ms": self.latency_ms,
            "bandwidth_mbit": self.bandwidth_mbit,
            "prefetch": self.prefetch,
            "seed": self.seed,
        }


@dataclass
class ModeRun:
    """One mode's measurements: the JSON summary plus what the chart needs."""

    mode: str
    summary: dict[str, Any]
    finished: list[tuple[float, float]]  # (seconds since ready, images) per finished job
    wall_s: float
    upload_bytes_per_image: float | None


# -- pure helpers ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def in_window(
    generations: Sequence[Sequence[float]], start: float, end: float
) -> list[tuple[float, float, int]]:
    """The generations that overlap [start, end], ordered by start.

    The worker's warm-up generation has ended before /readyz answers, so it is never among them.
    """
    found = [(float(g[0]), float(g[1]), int(g[2])) for g in generations if g[1] > start and g[0] < end]
    return sorted(found)


def busy_seconds(generations: Sequence[tuple[float, float, int]], start: float, end: float) -> float:
    return sum(max(0.0, min(g_end, end) - max(g_start, start)) for g_start, g_end, _ in generations)


def gaps(generations: Sequence[tuple[float, float, int]]) -> list[float]:
    return [max(0.0, nxt[0] - cur[1]) for cur, nxt in itertools.pairwise(generations)]


def log_time(ts: str) -> float:
    """The worker's JSON log time ('2024-05-01T12:00:00.123Z', UTC) as unix seconds."""
    whole = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S"))
    return whole + int(ts[20:23]) / 1000


def read_log(path: Path) -> list[dict[str, Any]]:
    entries = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
    return entries


def proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of a running process from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # fields after the command: state is field 3 of stat(5), utime 14, stime 15
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def proc_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None  # a zombie has no VmRSS


def _r(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# -- one mode --------------------------------------------------------------------------------------


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


def _worker_env(
    scenario: Scenario, mode: str, proxies: StorageProxies, a1111: Standin, port: int
) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SIDECAR_") and key != "AZURE_STORAGE_CONNECTION_STRING"
    }
    env.update(
        {
            "SIDECAR_STORAGE_CONNECTION_STRING": connection_string(proxies.blob.port, proxies.queue.port),
            "SIDECAR_A1111_URL": a1111.url,
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
    process: subprocess.Popen[bytes], log: Path, mode: str, jobs: int, stop: asyncio.Event
) -> list[tuple[float, float]]:
    """Sample VmRSS about once a second and report progress from the log now and then."""
    samples: list[tuple[float, float]] = []
    started = last_report = time.monotonic()
    while not stop.is_set():
        rss = proc_rss_mb(process.pid)
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
            cwd=ROOT,
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


async def run_mode(scenario: Scenario, mode: str, server: Azurite, a1111: Standin) -> ModeRun:
    settings = _settings(server, mode)
    storage = Storage.connect(settings)
    try:
        await storage.ensure()
        async with httpx.AsyncClient(base_url=a1111.url) as http:
            (await http.post("/standin/reset")).raise_for_status()
        print(f"bench: {mode}: enqueueing {scenario.jobs} jobs", file=sys.stderr)
        await enqueue(storage, settings.queue_name, generated(scenario.jobs, scenario.seed))
        log_path = scenario.report / f"worker-{mode}.log"
        async with storage_proxies(
            server.blob_port, server.queue_port, scenario.latency, scenario.bits_per_second
        ) as proxies:
            measured = await _run_worker(scenario, mode, proxies, a1111, log_path)
            link = proxies.link
        async with httpx.AsyncClient(base_url=a1111.url) as http:
            stats = (await http.get("/standin/stats")).json()
        checks = await _verify(storage, scenario.jobs)
        with contextlib.suppress(Exception):
            await storage.container.delete_container()  # Azurite keeps blobs in memory: free them
    finally:
        await storage.close()
    return _summarise(scenario, mode, measured, stats, read_log(log_path), checks, link)


@dataclass
class Measured:
    ready: float
    exited: float
    exit_code: int
    cpu_at_ready: tuple[float, float]  # (user, system) seconds, from /proc
    cpu_at_exit: tuple[float, float]  # (user, system) seconds, from wait4's rusage
    peak_rss_mb: float
    rss: list[tuple[float, float]]


async def _run_worker(
    scenario: Scenario, mode: str, proxies: StorageProxies, a1111: Standin, log_path: Path
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
        cpu_at_ready = proc_cpu_seconds(process.pid)
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch(process, log_path, mode, scenario.jobs, stop))
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


def _cpu_seconds(measured: Measured, log: list[dict[str, Any]]) -> tuple[float, float, float | None]:
    """The worker's CPU from readiness to its "stopped" line (all jobs done, clients closed): total,
    system part, and what the interpreter's teardown after that line took (a fixed ~0.15 s per
    process, nothing per image). Without the line (the worker was killed), up to its exit."""
    stopped = next((e for e in reversed(log) if e.get("msg") == "stopped" and "cpu_user_s" in e), None)
    user0, system0 = measured.cpu_at_ready
    user1, system1 = measured.cpu_at_exit
    if stopped is None:
        return user1 + system1 - user0 - system0, system1 - system0, None
    user, system = float(stopped["cpu_user_s"]), float(stopped["cpu_system_s"])
    return user + system - user0 - system0, system - system0, max(user1 + system1 - user - system, 0.0)


def _summarise(
    scenario: Scenario,
    mode: str,
    measured: Measured,
    stats: dict[str, Any],
    log: list[dict[str, Any]],
    checks: dict[str, Any],
    link: Link,
) -> ModeRun:
    t0, t1 = measured.ready, measured.exited
    wall = t1 - t0
    generations = in_window(stats.get("generations", []), t0, t1)
    done = [entry for entry in log if entry.get("msg") == "job done"]
    images = sum(int(entry.get("images", 0)) for entry in done)
    gap_list = [g * 1000 for g in gaps(generations)]

    first, last = (generations[0][0], generations[-1][1]) if generations else (t0, t1)
    half_at = generations[len(generations) // 2 - 1][1] if len(generations) >= 2 else t1
    before_half = [mb for at, mb in measured.rss if at <= half_at]
    rss_half = before_half[-1] if before_half else (measured.rss[0][1] if measured.rss else None)
    rss_end = measured.rss[-1][1] if measured.rss else None
    upload = [float(e["upload_s"]) for e in done if "upload_s" in e]
    cpu, system_cpu, exit_cpu = _cpu_seconds(measured, log)

    verified = (
        measured.exit_code == 0
        and len(done) == scenario.jobs
        and checks["job_records"] == scenario.jobs
        and checks["queue_left"] == 0
        and checks["poisoned"] == 0
    )
    summary: dict[str, Any] = {
        "mode": mode,
        "prefetch": scenario.prefetch_of(mode),
        "jobs": len(done),
        "images": images,
        "wall_s": round(wall, 3),
        "images_per_s": round(images / wall, 3) if wall > 0 else 0.0,
        "gpu_busy_fraction": round(busy_seconds(generations, t0, t1) / wall, 4) if wall > 0 else 0.0,
        "gpu_busy_fraction_steady": round(busy_seconds(generations, t0, t1) / (last - first), 4)
        if last > first
        else None,
        "first_generation_ms": round((first - t0) * 1000, 1),
        "tail_ms": round((t1 - last) * 1000, 1),
        "gap_ms_p50": _r(percentile(gap_list, 50), 1),
        "gap_ms_p95": _r(percentile(gap_list, 95), 1),
        "upload_s_p50": _r(percentile(upload, 50), 3),
        "upload_s_p95": _r(percentile(upload, 95), 3),
        "sidecar_cpu_ms_per_image": round(cpu * 1000 / images, 2) if images else None,
        # the kernel's part (socket writes to the loopback proxy, epoll): not Python's
        "sidecar_system_cpu_ms_per_image": round(system_cpu * 1000 / images, 2) if images else None,
        "exit_cpu_ms": _r(exit_cpu * 1000 if exit_cpu is not None else None, 1),
        "peak_rss_mb": round(measured.peak_rss_mb, 1),
        "rss_mb_at_half": _r(rss_half, 1),
        "rss_mb_at_end": _r(rss_end, 1),
        "uplink_busy_fraction": round(link.busy_seconds / wall, 4) if link.bits_per_second > 0 else None,
        "exit_code": measured.exit_code,
        **checks,
        "verified": verified,
    }
    return ModeRun(
        mode=mode,
        summary=summary,
        finished=[(log_time(e["ts"]) - t0, float(e.get("images", 0))) for e in done if "ts" in e],
        wall_s=wall,
        upload_bytes_per_image=link.bytes_sent / images if images else None,
    )


# -- the whole benchmark ---------------------------------------------------------------------------


async def _prime(a1111: Standin, scenario: Scenario) -> None:
    """Build the stand-in's PNG pool for the jobs' sizes before measuring anything."""
    sizes = {(job["width"], job["height"]) for job in generate_jobs(min(scenario.jobs, 50), scenario.seed)}
    async with httpx.AsyncClient(base_url=a1111.url, timeout=120.0) as http:
        for width, height in sorted(sizes):
            body = {"prompt": "prime", "steps": 1, "width": width, "height": height}
            (await http.post("/sdapi/v1/txt2img", json=body)).raise_for_status()


async def bench(scenario: Scenario) -> int:
    scenario.report.mkdir(parents=True, exist_ok=True)
    print(
        f"bench: {scenario.jobs} jobs, {scenario.seconds_per_image} s/image, "
        f"{scenario.latency_ms:g} ms round trip, {scenario.bandwidth_mbit:g} Mbit/s uplink; "
        f"modes {', '.join(scenario.modes)}",
        file=sys.stderr,
    )
    runs: list[ModeRun] = []
    async with azurite() as server, standin(scenario.seconds_per_image) as a1111:
        await _prime(a1111, scenario)
        for mode in scenario.modes:
            run = await run_mode(scenario, mode, server, a1111)
            runs.append(run)
            print(json.dumps(run.summary), flush=True)
    by_mode = {run.mode: run for run in runs}
    lines = [json.dumps(run.summary) for run in runs]
    if {"sequential", "pipelined"} <= by_mode.keys():
        sequential = by_mode["sequential"].summary["images_per_s"]
        pipelined = by_mode["pipelined"].summary["images_per_s"]
        speedup = {
            "speedup": round(pipelined / sequential, 3) if sequential else None,
            **scenario.describe(),
            "gpu_limit_images_per_s": round(1 / scenario.seconds_per_image, 3)
            if scenario.seconds_per_image > 0
            else None,
        }
        print(json.dumps(speedup), flush=True)
        lines.append(json.dumps(speedup))
    write_report(scenario, runs, lines)
    print(f"bench: report in {scenario.report / 'README.md'}", file=sys.stderr)
    return 0 if all(run.summary["verified"] for run in runs) else 1


# -- the report ------------------------------------------------------------------------------------

COLORS = {"sequential": ORANGE, "pipelined": BLUE}
TABLE = (
    ("jobs", "jobs"),
    ("wall_s", "wall (s)"),
    ("images_per_s", "images/s"),
    ("gpu_busy_fraction", "GPU busy"),
    ("gpu_busy_fraction_steady", "GPU busy, first to last generation"),
    ("first_generation_ms", "ready to first generation (ms)"),
    ("tail_ms", "last generation to exit (ms)"),
    ("gap_ms_p50", "gap p50 (ms)"),
    ("gap_ms_p95", "gap p95 (ms)"),
    ("sidecar_cpu_ms_per_image", "CPU ms/image"),
    ("sidecar_system_cpu_ms_per_image", "of it in the kernel (ms/image)"),
    ("exit_cpu_ms", "interpreter teardown at exit (ms, not per image)"),
    ("peak_rss_mb", "peak RSS (MB)"),
    ("rss_mb_at_half", "RSS at half (MB)"),
    ("rss_mb_at_end", "RSS at end (MB)"),
    ("upload_s_p50", "upload p50 (s)"),
    ("uplink_busy_fraction", "uplink busy"),
    ("verified", "verified"),
)


def _mode_label(run: ModeRun) -> str:
    return f"{run.mode} (SIDECAR_PREFETCH={run.summary['prefetch']})"


def draw_chart(scenario: Scenario, runs: Sequence[ModeRun], path: Path) -> None:
    span = max([run.wall_s for run in runs] + [1e-3])
    step = pick_bucket(span, 80)
    window = 4 * step
    series = [
        Series(
            f"{_mode_label(run)}: {run.summary['images_per_s']:.2f} images/s",
            rate_series(run.finished, run.wall_s, window, step),
            COLORS.get(run.mode, PALETTE[index % len(PALETTE)]),
        )
        for index, run in enumerate(runs)
    ]
    guides = []
    if scenario.seconds_per_image > 0:
        guides.append(
            Guide(1 / scenario.seconds_per_image, f"GPU limit (1 / {scenario.seconds_per_image:g} s)")
        )
    sizes = [run.upload_bytes_per_image for run in runs if run.upload_bytes_per_image]
    if scenario.bits_per_second > 0 and sizes:
        # what the uplink carries per image (PNG, job.json and queue calls), from the proxy's count
        limit = scenario.bits_per_second / 8 / max(sizes)
        top = max([rate for item in series for _, rate in item.points] + [g.y for g in guides] + [0.0])
        if limit < 1.5 * top:  # far above, it is no bottleneck and would only squash the chart
            label = f"uplink limit, about {limit:.1f} images/s ({scenario.bandwidth_mbit:g} Mbit/s)"
            guides.append(Guide(limit, label, GREEN))
    line_chart(
        path,
        series,
        title="Images per second over the run",
        subtitle=(
            f"{scenario.jobs} jobs, {scenario.seconds_per_image:g} s per image, {scenario.latency_ms:g} ms "
            f"round trip to storage, {scenario.bandwidth_mbit:g} Mbit/s uplink; "
            f"moving average over {window:g} s"
        ),
        x_label="seconds since the worker was ready",
        y_label="images per second",
        guides=guides,
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return f"{value:g}" if isinstance(value, float) else str(value)


def write_report(scenario: Scenario, runs: Sequence[ModeRun], lines: Sequence[str]) -> None:
    chart = scenario.report / "throughput.png"
    draw_chart(scenario, runs, chart)
    bandwidth = f"{scenario.bandwidth_mbit:g} Mbit/s" if scenario.bits_per_second > 0 else "unlimited"
    text = [
        "# a1111-sidecar benchmark",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPUs, load average {os.getloadavg()[1]:.2f} over the last 5 minutes at the end, "
        f"Python {platform.python_version()}, {platform.system()}). "
        "Reproduce with:",
        "",
        "```sh",
        "python -m sidecar bench "
        + " ".join(
            [
                f"--jobs {scenario.jobs}",
                f"--seconds-per-image {scenario.seconds_per_image:g}",
                f"--latency-ms {scenario.latency_ms:g}",
                f"--bandwidth-mbit {scenario.bandwidth_mbit:g}",
                f"--prefetch {scenario.prefetch}",
                f"--modes {','.join(scenario.modes)}",
                f"--seed {scenario.seed}",
            ]
        ),
        "```",
        "",
        "## Scenario",
        "",
        "| | |",
        "|---|---|",
        f"| jobs | {scenario.jobs} benchmark-style 512x512 jobs (seed {scenario.seed}), "
        "the same in every mode |",
        f"| GPU | the A1111 stand-in, {scenario.seconds_per_image:g} s per image, 300-600 KB PNGs |",
        f"| storage | Azurite behind a proxy: {scenario.latency_ms:g} ms round trip added to every request "
        "(and one to each new connection) |",
        f"| uplink | {bandwidth}, shared by all connections (blob uploads and queue calls) |",
        f"| pipelined mode | `SIDECAR_PREFETCH={scenario.prefetch}`, other settings at their defaults |",
        "",
        "## Results",
        "",
        "| | " + " | ".join(_mode_label(run) for run in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for key, title in TABLE:
        text.append(f"| {title} | " + " | ".join(_cell(run.summary.get(key)) for run in runs) + " |")
    by_mode = {run.mode: run for run in runs}
    if {"sequential", "pipelined"} <= by_mode.keys():
        speedup = json.loads(lines[-1])["speedup"]
        text += ["", f"**Speedup (pipelined / sequential images per second): {_cell(speedup)}x**"]
    text += [
        "",
        "![images per second over the run](throughput.png)",
        "",
        "## How it is measured",
        "",
        "- The span is from the worker's first `GET /readyz` 200 (A1111 warmed up, storage answering) "
        "to its exit after the queue ran empty (`run --exit-when-empty`).",
        "- GPU busy = the stand-in's generating seconds in that span / the span; the gap is the idle "
        "time between one generation's end and the next one's start. It splits into *response* (the "
        "stand-in encodes the images, the worker receives and parses them and logs `generated`) and "
        "*dispatch* (from then until the next generation starts: in sequential mode the upload, the "
        "delete and the next receive; pipelined, waiting for an upload slot or the next job, and the "
        "request).",
        "- CPU = the worker process's user + system time after readiness (from `/proc` at readiness and "
        "`wait4` at exit) per image; peak RSS from `wait4`; RSS at half/end sampled from `/proc`.",
        "- The proxy adds half the round trip in each direction, shapes the uplink as one link shared "
        "fairly by all connections, and passes downloads at full speed.",
        "- The chart shows stored images per second (a moving average over the worker's `job done` log "
        "lines: images count once their blobs are stored and the message deleted).",
        "",
        "Worker logs: "
        + ", ".join(f"[`worker-{run.mode}.log`](worker-{run.mode}.log)" for run in runs)
        + ".",
        "",
        "## Raw results",
        "",
        "```json",
        *lines,
        "```",
        "",
    ]
    (scenario.report / "README.md").write_text("\n".join(text), encoding="utf-8")


# -- command line ----------------------------------------------------------------------------------


def scenario_of(args: argparse.Namespace) -> Scenario:
    modes = [mode.strip() for mode in str(args.modes).split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if not modes or unknown:
        raise SystemExit(f"bench: --modes takes sequential and/or pipelined, not {args.modes!r}")
    if args.jobs < 1:
        raise SystemExit("bench: --jobs must be at least 1")
    if args.prefetch < 1:
        raise SystemExit("bench: --prefetch (the pipelined mode's SIDECAR_PREFETCH) must be at least 1")
    if args.seconds_per_image < 0 or args.latency_ms < 0 or args.bandwidth_mbit < 0:
        raise SystemExit("bench: --seconds-per-image, --latency-ms and --bandwidth-mbit must not be negative")
    return Scenario(
        jobs=args.jobs,
        seconds_per_image=args.seconds_per_image,
        latency_ms=args.latency_ms,
        bandwidth_mbit=args.bandwidth_mbit,
        prefetch=args.prefetch,
        modes=list(dict.fromkeys(modes)),
        report=Path(args.report),
        seed=args.seed,
    )


def run_bench(args: argparse.Namespace) -> int:
    return asyncio.run(bench(scenario_of(args)))
