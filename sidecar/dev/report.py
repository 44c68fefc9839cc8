"""The benchmark's report: ``README.md`` with the scenario, a results table per mode, the throughput
chart (``throughput.png``) and the raw JSON lines."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sidecar.dev.chart import (
    BLUE,
    GREEN,
    ORANGE,
    PALETTE,
    Guide,
    Series,
    line_chart,
    pick_bucket,
    rate_series,
)
from sidecar.dev.scenario import ModeRun, Scenario

COLORS = {"sequential": ORANGE, "pipelined": BLUE, "queue-order": GREEN}
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
    ("model_switches", "checkpoint loads (model switches)"),
    ("passed_over_s_p99", "passed over p99 (s)"),
    ("passed_over_s_max", "passed over, longest (s)"),
    ("busy_from", "GPU busy measured by"),
    ("verified", "verified"),
)


def mode_label(run: ModeRun) -> str:
    return f"{run.mode} (SIDECAR_PREFETCH={run.summary['prefetch']})"


def draw_chart(scenario: Scenario, runs: Sequence[ModeRun], path: Path) -> None:
    span = max([run.wall_s for run in runs] + [1e-3])
    step = pick_bucket(span, 80)
    window = 4 * step
    series = [
        Series(
            f"{mode_label(run)}: {run.summary['images_per_s']:.2f} images/s",
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
                *([f"--models {scenario.models}"] if scenario.models else []),
                *([f"--model-load-seconds {scenario.model_load_seconds:g}"] if scenario.models else []),
                *(
                    [f"--affinity-max-wait {scenario.affinity_max_wait:g}"]
                    if scenario.affinity_max_wait is not None
                    else []
                ),
                *([f"--a1111-url {scenario.a1111_url}"] if scenario.a1111_url else []),
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
        *(
            [
                f"| workload | mixed: each job's checkpoint drawn at random from {scenario.models}, "
                f"{scenario.model_load_seconds:g} s per load; queue-order: `SIDECAR_AFFINITY_MAX_WAIT=0` |"
            ]
            if scenario.models
            else []
        ),
        *([f"| A1111 | a real one at {scenario.a1111_url} |"] if scenario.a1111_url else []),
        "",
        "## Results",
        "",
        "| | " + " | ".join(mode_label(run) for run in runs) + " |",
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
        "- With `--a1111-url` (a real A1111, which keeps no record of its generations) GPU busy is the "
        "worker's own: each job's `generate_s` (from the moment A1111 turned to the request to its "
        "answer), and the model switches are the worker's count of checkpoint changes between "
        "consecutive generations (its `affinity` log line).",
        "- Passed over: how long a job waited after a job fetched later was sent to A1111 before it "
        "(model affinity), until its own turn; bounded by `SIDECAR_AFFINITY_MAX_WAIT`.",
        "- CPU = the worker process's user + system time after readiness (from psutil at readiness and "
        "`wait4` at exit) per image; peak RSS from `wait4`; RSS at half/end sampled with psutil.",
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
