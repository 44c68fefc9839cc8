"""The stand-in's images: real, decodable images of the requested size that say which job made them,
at little CPU per request; PNG by default, JPEG or WEBP as A1111's ``samples_format`` says.

Encoding a fresh 512x512 PNG takes tens of milliseconds, which would turn a benchmark of the sidecar
into a benchmark of zlib. So each image size gets a small pool of canvases, built once in a worker
thread. Sizes must look like Stable Diffusion output (a 512x512 PNG from A1111 weighs 300-600 KB)
because transfer and upload costs scale with them: each canvas is a smooth gradient on top and random
noise below; noise does not compress, so the noise fraction sets the file size, and varying it
across the pool gives every entry a different size.

The label: the top band of the gradient is drawn for each image (its seed and size, then the prompt,
wrapped and cut to fit, in Pillow's default font on a dark bar), so that whoever looks at a stored
image sees which job made it. A PNG's pixel data is one zlib stream, which a writer may split over
IDAT chunks as it likes: the band is deflated on its own per request and ends with a sync flush
(byte-aligned, not the last block), the rest of the image was deflated once when the pool was built
(its own stream, no reference back into the band, ending in the last block), and only the Adler-32 of
the whole, combined from the two parts', is new. A PNG then costs ~3 ms (mostly the drawing) instead
of a fresh encoding. A1111's ``parameters`` text chunk (the infotext) is spliced in after IHDR.

JPEG and WEBP are encoded whole by Pillow (``jpeg_quality``), with the infotext in the EXIF
UserComment, as A1111's ``encode_pil_to_base64`` does with piexif.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import random
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
POOL_SIZE = 8
# 0.42-0.70 of the rows as noise makes 512x512 PNGs of about 330-550 KB
NOISE_FRACTIONS = (0.42, 0.70)
_RGB = 3
_ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KiB window, the fastest level (what level 1 writes)
_ADLER_BASE = 65521

# the label: up to this many lines (the seed and size, then the prompt) on a dark bar
LABEL_LINES = 6
_MARGIN = 4
_BAR = (24, 24, 28)
_INK = (255, 255, 255)
_DRAWING = threading.Lock()  # one FreeType face is shared by the encoding threads


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def text_chunk(keyword: str, text: str) -> bytes:
    """tEXt when the text is latin-1, else iTXt (UTF-8): what Pillow's PngInfo.add_text writes for A1111."""
    key = keyword.encode("latin-1")
    try:
        return chunk(b"tEXt", key + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:
        # keyword, NUL, compression flag 0, method 0, empty language tag and translated keyword
        return chunk(b"iTXt", key + b"\0\0\0\0\0" + text.encode("utf-8"))


def adler32_combine(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of two byte strings one after the other, from theirs (zlib's adler32_combine)."""
    rem = second_length % _ADLER_BASE
    low = ((first & 0xFFFF) + (second & 0xFFFF) - 1) % _ADLER_BASE
    high = ((first >> 16) + (second >> 16) + rem * (first & 0xFFFF) - rem) % _ADLER_BASE
    return low | (high << 16)


def user_comment_exif(text: str) -> bytes:
    """The EXIF block piexif.dump writes for A1111: an Exif IFD holding only UserComment, the text
    as ``UnicodeComment`` (``UNICODE\\0`` and UTF-16BE), big-endian TIFF, ``Exif\\0\\0`` in front."""
    comment = b"UNICODE\0" + text.encode("utf-16-be")
    exif_ifd = 8 + 2 + 12 + 4  # TIFF header, IFD0 (one entry, next-IFD offset)
    data = exif_ifd + 2 + 12 + 4
    tiff = b"MM\0\x2a" + struct.pack(">I", 8)
    tiff += struct.pack(">H", 1) + struct.pack(">HHII", 0x8769, 4, 1, exif_ifd) + struct.pack(">I", 0)
    tiff += struct.pack(">H", 1) + struct.pack(">HHII", 0x9286, 7, len(comment), data) + struct.pack(">I", 0)
    return b"Exif\0\0" + tiff + comment


@dataclass(frozen=True)
class Encoding:
    """How A1111 encodes the images it sends: its global options at the time of encoding."""

    format: str = "PNG"  # Pillow's name: PNG, JPEG or WEBP
    quality: int = 80

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Encoding:
        """``samples_format`` as encode_pil_to_base64 reads it; ValueError where A1111 raises
        HTTPException(500, "Invalid image format")."""
        name = str(options.get("samples_format", "png")).lower()
        formats = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
        if name not in formats:
            raise ValueError("Invalid image format")
        return cls(formats[name], int(options.get("jpeg_quality", 80)))


@dataclass(frozen=True)
class Canvas:
    """One pooled image: a gradient over noise, everything below the label band compressed once."""

    width: int
    height: int
    seed: int
    smooth_rows: int  # the gradient; the rows below it are noise
    band_rows: int  # the label's band at the top, drawn per image
    body: bytes  # the IDAT chunk of the rows below the band: a deflate stream's last blocks
    body_adler: int
    body_length: int  # uncompressed, filter bytes included

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def encode(self, encoding: Encoding, label: tuple[str, int], infotext: str) -> bytes:
        """The image file: ``label`` is the prompt and seed drawn on it, ``infotext`` A1111's
        parameters (a PNG text chunk, or the EXIF UserComment)."""
        band = self._band(*label)
        if encoding.format == "PNG":
            return self._png(band, infotext)
        pixels = band + b"".join(self._rows())[self.band_rows * self.width * _RGB :]
        out = io.BytesIO()
        image = Image.frombytes("RGB", self.size, pixels)
        image.save(out, format=encoding.format, exif=user_comment_exif(infotext), quality=encoding.quality)
        return out.getvalue()

    def _png(self, band: bytes, infotext: str) -> bytes:
        stride = self.width * _RGB
        scanlines = b"".join(
            b"\x00" + band[row * stride : (row + 1) * stride] for row in range(self.band_rows)
        )
        deflate = zlib.compressobj(1, zlib.DEFLATED, -15)
        head = _ZLIB_HEADER + deflate.compress(scanlines) + deflate.flush(zlib.Z_SYNC_FLUSH)
        adler = adler32_combine(zlib.adler32(scanlines), self.body_adler, self.body_length)
        ihdr = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return b"".join(
            (
                PNG_SIGNATURE,
                chunk(b"IHDR", ihdr),
                text_chunk("parameters", infotext),
                chunk(b"IDAT", head),
                self.body,
                chunk(b"IDAT", struct.pack(">I", adler)),
                chunk(b"IEND", b""),
            )
        )

    def _band(self, prompt: str, seed: int) -> bytes:
        """The label band's RGB pixels: the seed and size, then as much of the prompt as fits."""
        if not self.band_rows:
            return b""
        font, line = label_font(self.width)
        image = Image.new("RGB", (self.width, self.band_rows), _BAR)
        with _DRAWING:
            room = self.width - 2 * _MARGIN
            lines = [f"seed {seed}  {self.width}x{self.height}"]
            fit = max(0, (self.band_rows - 2 * _MARGIN) // line - 1)
            lines += wrap(" ".join(prompt.split()), lambda text: font.getlength(text) <= room, fit)
            draw = ImageDraw.Draw(image)
            for index, text in enumerate(lines):
                draw.text((_MARGIN, _MARGIN + index * line), text, fill=_INK, font=font)
        return image.tobytes()

    def _rows(self) -> list[bytes]:
        """Every row's RGB pixels (what the PNG's scanlines filter), made again from the seed."""
        rng = random.Random(self.seed)
        tint = rng.randrange(256)
        rows = [_gradient_row(self.width, self.height, y, tint) for y in range(self.smooth_rows)]
        rows.extend(rng.randbytes(self.width * _RGB) for _ in range(self.height - self.smooth_rows))
        return rows


def _gradient_row(width: int, height: int, y: int, tint: int) -> bytes:
    """Row y of the gradient: red from left to right, green from top to bottom, a blue tint."""
    row = bytearray(width * _RGB)
    row[0::3] = bytes(x * 255 // max(1, width - 1) for x in range(width))
    row[1::3] = bytes((y * 255 // max(1, height - 1),)) * width
    row[2::3] = bytes((tint,)) * width
    return bytes(row)


@functools.lru_cache(maxsize=16)
def _font_of(pixels: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(pixels)


def label_font(width: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, int]:
    """Pillow's default font at a size that suits the image's width, and the line height."""
    pixels = max(8, min(32, width // 36))
    return _font_of(pixels), pixels + max(2, pixels // 4)


def wrap(text: str, fits: Any, lines: int) -> list[str]:
    """``text`` in at most ``lines`` lines that each ``fits``, broken between words (inside a word too
    long for a line); what does not fit is cut, the last line ending in "..."."""
    out: list[str] = []
    words = text.split(" ") if text else []
    current = ""
    while words and len(out) < lines:
        word = words[0]
        candidate = f"{current} {word}" if current else word
        if fits(candidate):
            current, words = candidate, words[1:]
            continue
        if current:
            out.append(current)
            current = ""
            continue
        cut = max(1, next((n for n in range(len(word), 0, -1) if fits(word[:n])), 1))
        out.append(word[:cut])
        words[0] = word[cut:]
    if current and len(out) < lines:
        out.append(current)
        current = ""
    if (words or current) and out:
        last = out[-1]
        while last and not fits(last + "..."):
            last = last[:-1]
        out[-1] = last.rstrip() + "..."
    return out


def build_canvas(width: int, height: int, noise_fraction: float, seed: int) -> Canvas:
    """A canvas of exactly width x height whose PNG weighs about noise_fraction * 3 * width * height."""
    noise_rows = min(height, round(height * noise_fraction))
    smooth_rows = height - noise_rows
    _, line = label_font(width)
    band_rows = min(smooth_rows, 2 * _MARGIN + LABEL_LINES * line)
    rng = random.Random(seed)
    tint = rng.randrange(256)
    stride = width * _RGB
    green = [y * 255 // max(1, height - 1) for y in range(smooth_rows)]
    rows = []
    for y in range(band_rows, smooth_rows):
        if y == band_rows:  # the first row below the band cannot refer to the band: unfiltered
            rows.append(b"\x00" + _gradient_row(width, height, y, tint))
        else:  # filter type 2 ("Up"): only the green channel changes from one gradient row to the next
            rows.append(b"\x02" + bytes((0, green[y] - green[y - 1], 0)) * width)
    rows.extend(b"\x00" + rng.randbytes(stride) for _ in range(noise_rows))
    scanlines = b"".join(rows)
    deflate = zlib.compressobj(1, zlib.DEFLATED, -15)
    body = deflate.compress(scanlines) + deflate.flush()
    return Canvas(
        width=width,
        height=height,
        seed=seed,
        smooth_rows=smooth_rows,
        band_rows=band_rows,
        body=chunk(b"IDAT", body),
        body_adler=zlib.adler32(scanlines),
        body_length=len(scanlines),
    )


def pool_size(width: int, height: int) -> int:
    """Fewer entries for big images, so an odd 2048x2048 request does not cost a second of CPU."""
    megapixels = width * height / 1_048_576
    return POOL_SIZE if megapixels <= 1 else max(2, int(POOL_SIZE / megapixels))


def build_pool(width: int, height: int) -> list[Canvas]:
    count = pool_size(width, height)
    low, high = NOISE_FRACTIONS
    steps = max(1, count - 1)
    return [build_canvas(width, height, low + (high - low) * i / steps, seed=i) for i in range(count)]


def image_base64(canvas: Canvas, encoding: Encoding, label: tuple[str, int], infotext: str) -> str:
    return base64.b64encode(canvas.encode(encoding, label, infotext)).decode("ascii")


class PngPool:
    """Pools of canvases per (width, height), built lazily off the event loop, once per size."""

    def __init__(self, max_sizes: int = 32) -> None:
        self._pools: OrderedDict[tuple[int, int], asyncio.Future[list[Canvas]]] = OrderedDict()
        self._max_sizes = max_sizes

    async def get(self, width: int, height: int) -> list[Canvas]:
        key = (width, height)
        future = self._pools.get(key)
        if future is None:
            # the future is registered before the first await, so concurrent requests share one build
            future = asyncio.get_running_loop().run_in_executor(None, build_pool, width, height)
            self._pools[key] = future
            while len(self._pools) > self._max_sizes:
                self._pools.popitem(last=False)
        self._pools.move_to_end(key)
        try:
            # shielded: a client that disconnects must not cancel a build other requests wait on
            return await asyncio.shield(future)
        except Exception:
            if self._pools.get(key) is future:
                del self._pools[key]
            raise
