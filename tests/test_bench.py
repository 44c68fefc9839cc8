"""``python -m sidecar bench`` end to end on a tiny scenario, and its arithmetic.

No performance figure is asserted: CI machines are noisy. The benchmark measures; the tests check that
it runs, verifies the jobs and reports what the contract names.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sidecar.dev.chart import Guide, Series, line_chart, pick_bucket, rate_series
from sidecar.dev.measure import busy_seconds, gaps, in_window, log_time, percentile
from tests.conftest import ROOT, _azurite_or_skip

CONTRACT_KEYS = {
    "mode": str,
    "jobs": int,
    "wall_s": float,
    "images_per_s": float,
    "gpu_busy_fraction": float,
    "sidecar_cpu_ms_per_image": float,
    "peak_rss_mb": float,
}
MORE_KEYS = {"gap_ms_p50", "gap_ms_p95", "rss_mb_at_half", "rss_mb_at_end", "verified", "prefetch"}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, object]], Path]:
    _azurite_or_skip()  # like every Azurite test: skipped without it, except under CI
    report = tmp_path_factory.mktemp("bench") / "report"
    command = [sys.executable, "-m", "sidecar", "bench", "--jobs", "6", "--seconds-per-image", "0.05"]
    command += ["--latency-ms", "5", "--report", str(report)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return lines, report


def test_one_json_line_per_mode_then_the_speedup(bench_run: tuple[list[dict[str, object]], Path]) -> None:
    lines, _ = bench_run
    assert [line.get("mode") for line in lines[:2]] == ["sequential", "pipelined"]
    for line in lines[:2]:
        for key, kind in CONTRACT_KEYS.items():
            assert isinstance(line[key], kind), (key, line[key])
        assert MORE_KEYS <= line.keys()
        assert line["jobs"] == 6 and line["images"] == 6
        assert line["verified"] is True and line["exit_code"] == 0
        assert line["job_records"] == 6 and line["queue_left"] == 0 and line["poisoned"] == 0
        assert isinstance(line["gpu_busy_fraction"], float) and 0 < line["gpu_busy_fraction"] <= 1
        for key in ("wall_s", "images_per_s", "sidecar_cpu_ms_per_image", "peak_rss_mb"):
            value = line[key]
            assert isinstance(value, float) and value > 0, key
        assert isinstance(line["gap_ms_p50"], float) and line["gap_ms_p50"] >= 0
    assert lines[0]["prefetch"] == 0 and lines[1]["prefetch"] == 1
    speedup = lines[2]
    assert isinstance(speedup["speedup"], float) and speedup["speedup"] > 0
    assert speedup["jobs"] == 6 and speedup["seconds_per_image"] == 0.05 and speedup["latency_ms"] == 5
    assert len(lines) == 3


def test_report_with_chart_and_raw_lines(bench_run: tuple[list[dict[str, object]], Path]) -> None:
    lines, report = bench_run
    text = (report / "README.md").read_text()
    assert "![images per second over the run](throughput.png)" in text
    assert "sequential (SIDECAR_PREFETCH=0)" in text and "pipelined (SIDECAR_PREFETCH=1)" in text
    for line in lines:
        assert json.dumps(line) in text
    with Image.open(report / "throughput.png") as image:
        image.load()
        assert image.format == "PNG" and image.width >= 800 and image.height >= 400
    for mode in ("sequential", "pipelined"):
        assert '"msg": "job done"' in (report / f"worker-{mode}.log").read_text()


def test_bad_options_fail_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "bench", "--modes", "fast"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0 and "--modes" in done.stderr


def test_percentiles_windows_and_gaps() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([float(v) for v in range(101)], 95) == pytest.approx(95.0)

    warm_up, first, second = (9.0, 9.5, 1), (10.0, 10.25, 1), (10.30, 10.55, 1)
    found = in_window([second, warm_up, first], 10.0, 11.0)
    assert found == [first, second]  # the warm-up before readiness is left out, the rest ordered
    assert busy_seconds(found, 10.0, 11.0) == pytest.approx(0.5)
    assert busy_seconds(found, 10.0, 10.4) == pytest.approx(0.35)  # clipped to the window
    assert gaps(found) == [pytest.approx(0.05)]
    assert log_time("1970-01-01T00:01:40.250Z") == pytest.approx(100.25)


def test_rate_series_and_chart(tmp_path: Path) -> None:
    events = [(0.5 * i, 1.0) for i in range(1, 41)]  # 2 images/s for 20 s
    points = rate_series(events, 20.0, window=4.0, step=1.0)
    assert len(points) == 21 and points[0][0] == 0 and points[-1][0] == 20.0
    assert all(rate == pytest.approx(2.0, abs=0.3) for _, rate in points[2:-2])
    assert rate_series([], 0.0, 1.0, 1.0) == []
    assert pick_bucket(110) == 2 and pick_bucket(1.0) == 0.05

    path = tmp_path / "chart.png"
    line_chart(
        path,
        [Series("a", points, "#d55e00"), Series("b", [(1.0, 1.0)], "#0072b2")],
        title="t",
        x_label="x",
        y_label="y",
        guides=[Guide(4.0, "limit")],
    )
    with Image.open(path) as image:
        assert image.size == (1000, 540)
