"""The A1111 client: readiness, txt2img and interrupt over an injected httpx.AsyncClient (``client``);
the HTTP client and what A1111 answers (``http``); the image formats it encodes (``formats``)."""

from sidecar.a1111.client import WARM_UP, A1111Client
from sidecar.a1111.formats import FORMAT_REMAKES, IMAGE_FORMATS, PNG_FORMAT, ImageFormat, sniff
from sidecar.a1111.http import Generation, http_client

__all__ = [
    "FORMAT_REMAKES",
    "IMAGE_FORMATS",
    "PNG_FORMAT",
    "WARM_UP",
    "A1111Client",
    "Generation",
    "ImageFormat",
    "http_client",
    "sniff",
]
