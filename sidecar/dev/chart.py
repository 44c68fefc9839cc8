"""The benchmark's throughput chart, drawn with matplotlib: a moving rate per mode, dashed limits."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

Point = tuple[float, float]

# colour-blind friendly (Okabe-Ito)
ORANGE = "#d55e00"
BLUE = "#0072b2"
GREEN = "#009e73"
GREY = "#787878"
PALETTE = (ORANGE, BLUE, GREEN, "#cc79a7", "#e69f00")
DPI = 100


@dataclass
class Series:
    label: str
    points: list[Point]
    color: str


@dataclass
class Guide:
    """A dashed horizontal line, e.g. the GPU's limit."""

    y: float
    label: str
    color: str = GREY


def pick_bucket(span: float, points: int = 60) -> float:
    """A round bucket width (seconds) that gives about ``points`` buckets over ``span`` seconds."""
    for width in (0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600):
        if span / width <= points:
            return float(width)
    return 600.0


def rate_series(
    events: Sequence[tuple[float, float]], span: float, window: float, step: float
) -> list[Point]:
    """A moving rate: at t = 0, step, ..., span, the weight of the events within ``window`` seconds
    around t (clipped to [0, span]) per second.

    ``events`` are (time since start, weight), e.g. (end of a generation, images). A window a few
    events wide keeps the line from zig-zagging between n and n+1 events per bucket.
    """
    if span <= 0 or window <= 0 or step <= 0:
        return []
    times = sorted((at, weight) for at, weight in events if 0 <= at <= span)
    cumulative = [0.0]
    for _, weight in times:
        cumulative.append(cumulative[-1] + weight)
    keys = [at for at, _ in times]
    points = []
    count = max(1, math.ceil(span / step - 1e-9))
    for index in range(count + 1):
        middle = min(span, index * step)
        low, high = max(0.0, middle - window / 2), min(span, middle + window / 2)
        total = cumulative[bisect.bisect_right(keys, high)] - cumulative[bisect.bisect_left(keys, low)]
        points.append((middle, total / (high - low)))
    return points


def line_chart(
    path: Path,
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    guides: Sequence[Guide] = (),
    subtitle: str = "",
    size: tuple[int, int] = (1000, 540),
) -> None:
    """Write a PNG line chart of ``size`` pixels: title, legend, axes, grid, one line per series."""
    figure = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    for item in series:
        xs, ys = [x for x, _ in item.points], [y for _, y in item.points]
        axes.plot(xs, ys, color=item.color, linewidth=2, label=item.label, marker="o" if len(xs) == 1 else "")
    for guide in guides:
        axes.axhline(guide.y, color=guide.color, linestyle="--", linewidth=1.3, label=guide.label)
    top = max([y for item in series for _, y in item.points] + [g.y for g in guides] + [1e-9])
    axes.set_xlim(left=0)
    axes.set_ylim(bottom=0, top=top * 1.1)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(True, color="#e4e4e4")
    axes.set_axisbelow(True)
    figure.suptitle(title, fontsize=15)
    if subtitle:
        axes.set_title(subtitle, fontsize=9, color="#505050")
    if series or guides:
        figure.legend(loc="outside lower center", ncols=2, frameon=False, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
