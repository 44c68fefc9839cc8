"""Image formats A1111 can encode (its global ``samples_format``) and how an image's bytes say which."""

from __future__ import annotations

from dataclasses import dataclass

import pybase64


@dataclass(frozen=True)
class ImageFormat:
    """A format A1111 can encode its images in: ``name`` as in SIDECAR_IMAGE_FORMAT (the blobs'
    extension and job.json's ``image_format``), ``option`` A1111's ``samples_format`` value."""

    name: str
    option: str
    content_type: str

    def matches(self, data: bytes) -> bool:
        """Do these bytes (an image's first 12 are enough) start as a file of this format does?"""
        return sniff(data) == self.name


def sniff(data: bytes) -> str | None:
    """The format an image's first bytes say: png, jpeg, webp, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


IMAGE_FORMATS = {
    "png": ImageFormat("png", "png", "image/png"),
    "webp": ImageFormat("webp", "webp", "image/webp"),
    "jpeg": ImageFormat("jpeg", "jpg", "image/jpeg"),
}
PNG_FORMAT = IMAGE_FORMATS["png"]
# A generation in another format than the one set is made again after setting it again, this often.
FORMAT_REMAKES = 3


def head_format(image: str) -> str:
    """The format of a base64 image from its first 16 characters (12 bytes: the magic of all three)."""
    try:
        return sniff(pybase64.b64decode(image[:16], validate=True)) or "unrecognised"
    except ValueError:
        return "unrecognised"
