"""What travels between the worker and A1111: the HTTP client, a generation's answer, A1111's errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream

from sidecar.a1111.formats import PNG_FORMAT, ImageFormat
from sidecar.errors import A1111AuthRefused


@dataclass
class Generation:
    """What A1111 returned for one job: base64 images (decoded later, off the generation path)."""

    images: list[str]
    info: dict[str, Any]
    started: float
    finished: float
    request: dict[str, Any] = field(default_factory=dict)  # the body sent
    extra: dict[str, Any] = field(default_factory=dict)
    image_format: ImageFormat = PNG_FORMAT  # what the images were checked to be

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    @property
    def seeds(self) -> list[int]:
        seeds = self.info.get("all_seeds")
        if isinstance(seeds, list):
            return [int(s) for s in seeds if isinstance(s, int)]
        seed = self.info.get("seed")
        return [seed] if isinstance(seed, int) else []


def error_detail(response: httpx.Response) -> str:
    """A1111's error shape is {"error", "detail", "body", "errors"}; FastAPI's 422 is {"detail": [...]}."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        parts = [str(body[key]) for key in ("error", "detail", "errors") if body.get(key)]
        if parts:
            return ": ".join(dict.fromkeys(parts))[:1000]
    return str(body)[:1000]


# A txt2img answer is ~600 KB of JSON per image: read it in a few large chunks rather than forty.
AiohttpResponseStream.CHUNK_SIZE = 1 << 20


def http_client(base_url: str, auth: tuple[str, str] | None = None) -> httpx.AsyncClient:
    """httpx over aiohttp's transport (C HTTP parser): half the CPU per txt2img of httpcore's pure-Python
    HTTP/1.1 stack, which parses and copies the whole base64 answer in 64 KB steps. ``auth``: the
    user and password of A1111's ``--api-auth``, sent as HTTP Basic on every call."""
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    transport = AiohttpTransport(limits=limits, trust_env=False)
    return httpx.AsyncClient(
        base_url=base_url,
        transport=transport,
        timeout=30.0,
        auth=httpx.BasicAuth(*auth) if auth is not None else None,
    )


def auth_refused(response: httpx.Response, sent: bool) -> A1111AuthRefused:
    """A 401: A1111 runs with --api-auth and the credentials are missing or wrong (never the job's fault)."""
    detail = error_detail(response)
    if sent:
        return A1111AuthRefused(f"A1111 refused the credentials in SIDECAR_A1111_API_AUTH (401: {detail})")
    return A1111AuthRefused(
        f"A1111 asks for credentials (401: {detail}): set SIDECAR_A1111_API_AUTH to the user:password "
        "of its --api-auth"
    )
