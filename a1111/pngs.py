"""Precomputed PNG bodies for the A1111 stand-in: real, decodable images that cost no CPU per request.

Encoding a fresh 512x512 PNG takes tens of milliseconds, which would turn a benchmark of the sidecar
into a benchmark of zlib. So each image size gets a small pool of PNGs, built once in a worker
thread, and a request only splices a ``parameters`` text chunk (A1111's infotext) into a pooled body
and base64-encodes it.

Sizes must look like Stable Diffusion output (a 512x512 PNG from A1111 weighs 300-600 KB) because
transfer and upload costs scale with them. Each pooled image is a smooth gradient on top and random
noise below; noise does not compress, so the noise fraction sets the file size, and varying it
across the pool gives every entry a different size.
"""

from __future__ import annotations

import asyncio
import base64
import random
import struct
import zlib
from collections import OrderedDict

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IHDR_END = len(PNG_SIGNATURE) + 4 + 4 + 13 + 4  # length, type, 13 data bytes, CRC
POOL_SIZE = 8
# 0.42-0.70 of the rows as noise makes 512x512 PNGs of about 330-550 KB
NOISE_FRACTIONS = (0.42, 0.70)
_RGB = 3


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


def with_text(png: bytes, keyword: str, text: str) -> bytes:
    """The PNG with a text chunk right after IHDR, where Pillow puts A1111's ``parameters``."""
    return png[:IHDR_END] + text_chunk(keyword, text) + png[IHDR_END:]


def png_base64(png: bytes, keyword: str, text: str) -> str:
    return base64.b64encode(with_text(png, keyword, text)).decode("ascii")


def _scanlines(width: int, height: int, noise_fraction: float, rng: random.Random) -> bytes:
    """Filtered RGB scanlines: a gradient (cheap to deflate) above rows of noise (incompressible)."""
    noise_rows = min(height, round(height * noise_fraction))
    smooth_rows = height - noise_rows
    tint = rng.randrange(256)
    red = [x * 255 // max(1, width - 1) for x in range(width)]
    rows = [b"\x00" + bytes(v for r in red for v in (r, 0, tint))] if smooth_rows else []
    green = [y * 255 // max(1, height - 1) for y in range(smooth_rows)]
    for y in range(1, smooth_rows):
        # filter type 2 ("Up"): only the green channel changes from one gradient row to the next
        rows.append(b"\x02" + bytes((0, green[y] - green[y - 1], 0)) * width)
    rows.extend(b"\x00" + rng.randbytes(width * _RGB) for _ in range(noise_rows))
    return b"".join(rows)


def build_png(width: int, height: int, noise_fraction: float, seed: int) -> bytes:
    """An 8-bit RGB PNG of exactly width x height, about noise_fraction * 3 * width * height bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(_scanlines(width, height, noise_fraction, random.Random(seed)), 1)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def pool_size(width: int, height: int) -> int:
    """Fewer entries for big images, so an odd 2048x2048 request does not cost a second of CPU."""
    megapixels = width * height / 1_048_576
    return POOL_SIZE if megapixels <= 1 else max(2, int(POOL_SIZE / megapixels))


def build_pool(width: int, height: int) -> list[bytes]:
    count = pool_size(width, height)
    low, high = NOISE_FRACTIONS
    steps = max(1, count - 1)
    return [build_png(width, height, low + (high - low) * i / steps, seed=i) for i in range(count)]


class PngPool:
    """Pools of PNG bodies per (width, height), built lazily off the event loop, once per size."""

    def __init__(self, max_sizes: int = 32) -> None:
        self._pools: OrderedDict[tuple[int, int], asyncio.Future[list[bytes]]] = OrderedDict()
        self._max_sizes = max_sizes

    async def get(self, width: int, height: int) -> list[bytes]:
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
