"""``bench``: the self-contained throughput benchmark, sequential (the Go worker) against pipelined.

It starts its own Azurite and A1111 stand-in and puts a latency proxy between the worker and storage
(a consumer node's round trip to Azure and its home uplink, ``sidecar.dev.proxy``). For each mode it puts
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
  (psutil) to its ``stopped`` log line (its own ``os.times()`` once every job is done and its clients
  are closed); ``sidecar_system_cpu_ms_per_image`` is the kernel's part of it, ``exit_cpu_ms`` the
  interpreter's teardown after that line (``wait4``'s rusage), a fixed cost per process;
* ``peak_rss_mb`` (rusage), ``rss_mb_at_half`` and ``rss_mb_at_end`` (the resident set, sampled
  every second with psutil);
* ``uplink_busy_fraction``: how much of the run the shaped uplink was transmitting;
* ``verified``: every job has its ``job.json``, the queue and the poison queue are empty, exit 0.

One JSON object per mode goes to stdout, then a ``speedup`` line; progress goes to stderr. The
report (``README.md`` with a throughput chart, and each worker's log) goes to ``--report``.

The parts: ``scenario`` (what is run), ``runner`` (one mode), ``measure`` (the arithmetic and the
summary), ``report`` (the Markdown and the chart).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator

import httpx

from sidecar.dev.devenv import Standin, azurite, standin
from sidecar.dev.report import write_report
from sidecar.dev.runner import run_mode
from sidecar.dev.scenario import ModeRun, Scenario, scenario_of
from sidecar.formatting import plural
from sidecar.prompts import generate_jobs


async def _prime(a1111: Standin, scenario: Scenario) -> None:
    """Build the stand-in's PNG pool for the jobs' sizes before measuring anything."""
    sizes = {(job["width"], job["height"]) for job in generate_jobs(min(scenario.jobs, 50), scenario.seed)}
    async with httpx.AsyncClient(base_url=a1111.url, timeout=120.0) as http:
        for width, height in sorted(sizes):
            body = {"prompt": "prime", "steps": 1, "width": width, "height": height}
            (await http.post("/sdapi/v1/txt2img", json=body)).raise_for_status()


@contextlib.asynccontextmanager
async def _a1111(scenario: Scenario) -> AsyncIterator[Standin | str]:
    """The stand-in (with --models, that many checkpoints installed, each load costing
    --model-load-seconds), or the real A1111's URL (--a1111-url), left as it is."""
    if scenario.a1111_url:
        yield scenario.a1111_url
        return
    extra: list[str] = []
    if scenario.models:
        extra = ["--checkpoints", ",".join(scenario.checkpoints())]
        extra += ["--model-load-seconds", f"{scenario.model_load_seconds:g}"]
    async with standin(scenario.seconds_per_image, extra) as a1111:
        await _prime(a1111, scenario)
        yield a1111


async def bench(scenario: Scenario) -> int:
    scenario.report.mkdir(parents=True, exist_ok=True)
    print(
        f"bench: {plural(scenario.jobs, 'job')}, {scenario.seconds_per_image} s/image, "
        f"{scenario.latency_ms:g} ms round trip, {scenario.bandwidth_mbit:g} Mbit/s uplink; "
        f"modes {', '.join(scenario.modes)}",
        file=sys.stderr,
    )
    runs: list[ModeRun] = []
    async with azurite() as server, _a1111(scenario) as a1111:
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
    if {"pipelined", "queue-order"} <= by_mode.keys():
        ordered = by_mode["queue-order"].summary["images_per_s"]
        gain = {
            "affinity_gain": round(by_mode["pipelined"].summary["images_per_s"] / ordered, 3)
            if ordered
            else None,
            "model_switches": {
                mode: by_mode[mode].summary["model_switches"] for mode in ("pipelined", "queue-order")
            },
            **scenario.describe(),
        }
        print(json.dumps(gain), flush=True)
        lines.append(json.dumps(gain))
    write_report(scenario, runs, lines)
    print(f"bench: report in {scenario.report / 'README.md'}", file=sys.stderr)
    return 0 if all(run.summary["verified"] for run in runs) else 1


def run_bench(args: argparse.Namespace) -> int:
    return asyncio.run(bench(scenario_of(args)))
