"""The benchmark's arithmetic: generations in the measured span, gaps, percentiles, the worker's CPU
and memory (psutil while it runs, ``wait4``'s rusage at its exit), and one mode's JSON summary."""

from __future__ import annotations

import calendar
import contextlib
import itertools
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from sidecar.dev.proxy import Link
from sidecar.dev.scenario import ModeRun, Scenario


@dataclass
class Measured:
    ready: float
    exited: float
    exit_code: int
    cpu_at_ready: tuple[float, float]  # (user, system) seconds, from psutil
    cpu_at_exit: tuple[float, float]  # (user, system) seconds, from wait4's rusage
    peak_rss_mb: float
    rss: list[tuple[float, float]]


def percentile(values: Sequence[float], q: int) -> float | None:
    """The q-th percentile (1..99), linear between the closest ranks (``statistics.quantiles``'
    inclusive method); None for no values."""
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def in_window(
    generations: Sequence[Sequence[float]], start: float, end: float
) -> list[tuple[float, float, int]]:
    """The generations that overlap [start, end], ordered by start.

    The worker's warm-up generation has ended before /readyz answers, so it is never among them.
    """
    found = [(float(g[0]), float(g[1]), int(g[2])) for g in generations if g[1] > start and g[0] < end]
    return sorted(found)


def worker_generations(done: Sequence[dict[str, Any]]) -> list[tuple[float, float, int]]:
    """(start, end, images) of each job's generation from its ``job done`` line (ts is its end of
    storing; the generation ended upload_s before it)."""
    found = []
    for entry in done:
        if "ts" in entry and "generate_s" in entry:
            end = log_time(entry["ts"]) - float(entry.get("upload_s", 0.0))
            found.append((end - float(entry["generate_s"]), end, int(entry.get("images", 0))))
    return found


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


def cpu_seconds(process: psutil.Process) -> tuple[float, float]:
    """(user, system) CPU seconds of a running process."""
    times = process.cpu_times()
    return times.user, times.system


def rss_mb(process: psutil.Process) -> float | None:
    """The resident set of a running process in MiB; None once it has exited (a zombie has none)."""
    try:
        rss = process.memory_info().rss
    except psutil.Error:
        return None
    return rss / 2**20 if rss else None


def _r(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def worker_cpu(measured: Measured, log: list[dict[str, Any]]) -> tuple[float, float, float | None]:
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


def summarise(
    scenario: Scenario,
    mode: str,
    measured: Measured,
    stats: dict[str, Any] | None,
    log: list[dict[str, Any]],
    checks: dict[str, Any],
    link: Link,
) -> ModeRun:
    t0, t1 = measured.ready, measured.exited
    wall = t1 - t0
    done = [entry for entry in log if entry.get("msg") == "job done"]
    # A real A1111 (--a1111-url) keeps no record: its generations are the worker's own, each from the
    # moment A1111 turned to the request to its answer (generate_s), and its switches the worker's count.
    generations = in_window(
        stats.get("generations", []) if stats is not None else worker_generations(done), t0, t1
    )
    affinity: dict[str, Any] = next((e for e in reversed(log) if e.get("msg") == "affinity"), {})
    switches = stats.get("model_switches") if stats is not None else affinity.get("model_switches")
    passed = [float(e.get("passed_over_s", 0.0)) for e in done]
    images = sum(int(entry.get("images", 0)) for entry in done)
    gap_list = [g * 1000 for g in gaps(generations)]

    first, last = (generations[0][0], generations[-1][1]) if generations else (t0, t1)
    half_at = generations[len(generations) // 2 - 1][1] if len(generations) >= 2 else t1
    before_half = [mb for at, mb in measured.rss if at <= half_at]
    rss_half = before_half[-1] if before_half else (measured.rss[0][1] if measured.rss else None)
    rss_end = measured.rss[-1][1] if measured.rss else None
    upload = [float(e["upload_s"]) for e in done if "upload_s" in e]
    cpu, system_cpu, exit_cpu = worker_cpu(measured, log)

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
        "model_switches": switches,
        "busy_from": "stand-in" if stats is not None else "worker",
        "passed_over_s_p99": _r(percentile(passed, 99), 2),
        "passed_over_s_max": _r(max(passed, default=None), 2),
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
