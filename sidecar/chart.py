"""A small line chart drawn with Pillow (no plotting library): the benchmark's throughput over time.

Drawn at twice the size and scaled down, which smooths the lines (Pillow does not anti-alias them).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

Color = tuple[int, int, int]
Point = tuple[float, float]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

# colour-blind friendly (Okabe-Ito)
ORANGE: Color = (213, 94, 0)
BLUE: Color = (0, 114, 178)
GREEN: Color = (0, 158, 115)
GREY: Color = (120, 120, 120)
PALETTE = (ORANGE, BLUE, GREEN, (204, 121, 167), (230, 159, 0))
SCALE = 2  # supersampling factor


@dataclass
class Series:
    label: str
    points: list[Point]
    color: Color


@dataclass
class Guide:
    """A dashed horizontal line, e.g. the GPU's limit."""

    y: float
    label: str
    color: Color = GREY


def nice_step(span: float, max_ticks: int = 8) -> float:
    """A 1, 2, 2.5 or 5 times a power of ten step that cuts ``span`` into at most ``max_ticks`` parts."""
    if span <= 0:
        return 1.0
    raw = span / max_ticks
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * magnitude >= raw:
            return float(factor * magnitude)
    return 10.0 * magnitude


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


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError, AttributeError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _dashed(draw: ImageDraw.ImageDraw, start: Point, end: Point, color: Color, width: int, dash: int) -> None:
    (x0, y0), (x1, y1) = start, end
    length = math.hypot(x1 - x0, y1 - y0)
    steps = max(1, int(length // dash))
    for index in range(0, steps, 2):
        a, b = index / steps, min(1.0, (index + 1) / steps)
        draw.line(
            [(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)], color, width
        )


def _label(value: float, step: float) -> str:
    """A tick label with as many decimals as the step needs (0.25 -> 2, 2.5 -> 1, 5 -> 0)."""
    text = f"{step:.6f}".rstrip("0")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{value:.{decimals}f}"


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
    """Write a PNG line chart: title, legend, axes with tick labels, grid, one line per series."""
    s = SCALE
    width, height = size[0] * s, size[1] * s
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title_font, font, small = _font(22 * s), _font(15 * s), _font(13 * s)

    # vertical layout: title, subtitle, legend, plot, x tick labels, x axis label
    top = 14 * s
    draw.text((width // 2, top), title, fill="black", font=title_font, anchor="ma")
    top += _text_size(draw, title, title_font)[1] + 10 * s
    if subtitle:
        draw.text((width // 2, top), subtitle, fill=(80, 80, 80), font=small, anchor="ma")
        top += _text_size(draw, subtitle, small)[1] + 10 * s
    entries = [(item.label, item.color, False) for item in series]
    entries += [(guide.label, guide.color, True) for guide in guides]
    swatch, gap = 28 * s, 26 * s
    line_height = _text_size(draw, "Ag", font)[1]
    rows: list[list[tuple[str, Color, bool, int]]] = [[]]
    for label, color, dashed in entries:  # as many entries per row as fit
        entry_width = swatch + 8 * s + _text_size(draw, label, font)[0]
        row_width = sum(e[3] + gap for e in rows[-1]) + entry_width
        if rows[-1] and row_width > width - 40 * s:
            rows.append([])
        rows[-1].append((label, color, dashed, entry_width))
    for row in rows:
        x = (width - (sum(e[3] for e in row) + gap * (len(row) - 1))) // 2
        middle = top + line_height // 2 + 2 * s
        for label, color, dashed, entry_width in row:
            if dashed:
                _dashed(draw, (x, middle), (x + swatch, middle), color, 2 * s, 5 * s)
            else:
                draw.line([(x, middle), (x + swatch, middle)], color, 4 * s)
            draw.text((x + swatch + 8 * s, middle), label, fill="black", font=font, anchor="lm")
            x += entry_width + gap
        top += line_height + 10 * s
    top += 8 * s

    all_points = [point for item in series for point in item.points]
    x_max = max([p[0] for p in all_points] + [1e-9])
    y_max = max([p[1] for p in all_points] + [guide.y for guide in guides] + [1e-9]) * 1.1
    x_step, y_step = nice_step(x_max), nice_step(y_max, 6)
    x_max = math.ceil(x_max / x_step - 1e-9) * x_step
    y_max = math.ceil(y_max / y_step - 1e-9) * y_step

    y_tick_width = max(_text_size(draw, _label(v * y_step, y_step), font)[0] for v in range(7))
    left = 30 * s + line_height + y_tick_width
    right = width - 30 * s
    bottom = height - (2 * line_height + 34 * s)

    def at(point: Point) -> Point:
        return (
            left + (right - left) * point[0] / x_max,
            bottom - (bottom - top) * point[1] / y_max,
        )

    grid = (228, 228, 228)
    for index in range(round(y_max / y_step) + 1):
        value = index * y_step
        y = at((0, value))[1]
        draw.line([(left, y), (right, y)], grid, s)
        draw.text((left - 8 * s, y), _label(value, y_step), fill="black", font=font, anchor="rm")
    for index in range(round(x_max / x_step) + 1):
        value = index * x_step
        x_at = at((value, 0))[0]
        draw.line([(x_at, top), (x_at, bottom)], grid, s)
        draw.line([(x_at, bottom), (x_at, bottom + 6 * s)], "black", s)
        draw.text((x_at, bottom + 9 * s), _label(value, x_step), fill="black", font=font, anchor="ma")
    draw.line([(left, top), (left, bottom), (right, bottom)], "black", 2 * s)

    draw.text(((left + right) // 2, height - 12 * s), x_label, fill="black", font=font, anchor="md")
    label_image = Image.new("RGB", _text_size(draw, y_label, font), "white")
    ImageDraw.Draw(label_image).text((0, 0), y_label, fill="black", font=font, anchor="lt")
    rotated = label_image.rotate(90, expand=True)
    image.paste(rotated, (12 * s, (top + bottom) // 2 - rotated.height // 2))

    for guide in guides:
        y = at((0, guide.y))[1]
        _dashed(draw, (left, y), (right, y), guide.color, 2 * s, 8 * s)
    for item in series:
        pixels = [at(point) for point in item.points]
        if len(pixels) == 1:
            x0, y0 = pixels[0]
            draw.ellipse([x0 - 4 * s, y0 - 4 * s, x0 + 4 * s, y0 + 4 * s], fill=item.color)
        elif pixels:
            draw.line(pixels, item.color, 3 * s, joint="curve")

    image = image.resize(size, Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
