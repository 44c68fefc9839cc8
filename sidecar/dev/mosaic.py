"""The demo's contact sheet: every image in a grid, each with its job id and prompt as a caption."""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

THUMB = 256  # the longer side of an image's thumbnail, in pixels
CAPTION_LINES = 4  # the job id, then the prompt wrapped over at most three lines
FONT_SIZE = 12
LINE = FONT_SIZE + 4
PAD = 8
COLUMNS = 4
TILE_W = THUMB + 2 * PAD
TILE_H = THUMB + CAPTION_LINES * LINE + 2 * PAD
BACKGROUND = (245, 245, 245)
INK = (20, 20, 20)


@dataclass(frozen=True)
class Tile:
    job_id: str
    index: int  # the image's number within its job
    prompt: str
    png: bytes


def grid(count: int) -> tuple[int, int]:
    """(columns, rows) of a sheet of ``count`` tiles."""
    columns = max(1, min(COLUMNS, count))
    return columns, max(1, math.ceil(count / columns))


def sheet_size(count: int) -> tuple[int, int]:
    columns, rows = grid(count)
    return columns * TILE_W, rows * TILE_H


def tile_box(position: int, count: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of tile ``position`` on a sheet of ``count`` tiles."""
    columns, _ = grid(count)
    left, top = position % columns * TILE_W, position // columns * TILE_H
    return left, top, left + TILE_W, top + TILE_H


def caption(tile: Tile) -> list[str]:
    head = tile.job_id if tile.index == 0 else f"{tile.job_id} #{tile.index}"
    chars = THUMB // (FONT_SIZE * 6 // 10)  # about what fits in a thumbnail's width
    prompt = textwrap.wrap(tile.prompt, chars, max_lines=CAPTION_LINES - 1, placeholder=" ...")
    return [textwrap.shorten(head, chars, placeholder="..."), *prompt]


def write_mosaic(tiles: Sequence[Tile], path: Path) -> tuple[int, int]:
    """Draw the sheet into ``path`` (PNG); returns its (columns, rows)."""
    sheet = Image.new("RGB", sheet_size(len(tiles)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(FONT_SIZE)
    for position, tile in enumerate(tiles):
        left, top, _, _ = tile_box(position, len(tiles))
        with Image.open(io.BytesIO(tile.png)) as image:
            thumb = image.convert("RGB")
            thumb.thumbnail((THUMB, THUMB))
        x = left + PAD + (THUMB - thumb.width) // 2
        sheet.paste(thumb, (x, top + PAD + (THUMB - thumb.height)))
        for number, text in enumerate(caption(tile)):
            draw.text((left + PAD, top + PAD + THUMB + 2 + number * LINE), text, fill=INK, font=font)
    sheet.save(path, "PNG")
    return grid(len(tiles))
