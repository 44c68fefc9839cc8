"""``Catalog``: A1111's lists, read through its API, each payload checked against them, and the
rescans that a miss of something a node can gain while it runs sets off (rate-limited per kind)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from sidecar.assets.checks import Problem, find_problems
from sidecar.assets.snapshot import Snapshot, read_list
from sidecar.errors import A1111AuthRefused, CatalogError

log = logging.getLogger("sidecar.assets")

# what each kind of miss rescans: the POST that makes A1111 look at its disk again, then the lists
_RESCANS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "lora": ("/sdapi/v1/refresh-loras", ("loras",)),
    "checkpoint": ("/sdapi/v1/refresh-checkpoints", ("sd-models",)),
    "vae": ("/sdapi/v1/refresh-vae", ("sd-vae",)),
    "upscaler": (None, ("upscalers",)),
    "style": (None, ("prompt-styles",)),
}
_LISTS = ("loras", "sd-models", "sd-vae", "samplers", "schedulers", "upscalers", "prompt-styles")


class Catalog:
    """What one A1111 has, checked against txt2img payloads (``Job.txt2img_payload()``)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        refresh_interval: float = 30.0,
        face_restoration_available: bool = False,
        check_negative_prompts: bool = False,
        timeout: float = 30.0,
        refresh_timeout: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http
        self.refresh_interval = refresh_interval
        self.face_restoration_available = face_restoration_available
        self.check_negative_prompts = check_negative_prompts
        self.timeout, self.refresh_timeout = timeout, refresh_timeout
        self.clock = clock
        self.snapshot: Snapshot | None = None
        self.refreshes: dict[str, int] = dict.fromkeys(_RESCANS, 0)  # rescans done, per kind
        self._refreshed_at: dict[str, float] = {}
        self._locks = {kind: asyncio.Lock() for kind in _RESCANS}

    async def load(self) -> None:
        """Read every list: loras, sd-models, sd-vae, samplers, schedulers, upscalers, prompt-styles
        (and latent-upscale-modes, where the server has it)."""
        bodies = await asyncio.gather(*(self._get(name) for name in _LISTS))
        snapshot = Snapshot()
        for name, body in zip(_LISTS, bodies, strict=True):
            read_list(snapshot, name, body)
        modes = await self._get("latent-upscale-modes", missing_ok=True)
        if isinstance(modes, list):
            snapshot.latent_modes = {str(m["name"]) for m in modes if isinstance(m, dict) and "name" in m}
        self.snapshot = snapshot

    async def check(self, payload: Mapping[str, Any]) -> list[Problem]:
        """Everything the payload names that this node lacks; a miss that a rescan may cure is looked
        up again after one (rate-limited). Raises CatalogError when A1111 cannot be read."""
        if self.snapshot is None:
            await self.load()
        assert self.snapshot is not None
        problems = self.problems(payload, self.snapshot)
        kinds = sorted({k for k in map(_rescan_kind, problems) if k is not None})
        for kind in kinds:
            await self._rescan(kind)  # or wait for the one in flight, or skip: one per interval
        # the lists may be newer now (rescanned here or by a concurrent check): look again
        return self.problems(payload, self.snapshot) if kinds else problems

    def problems(self, payload: Mapping[str, Any], snap: Snapshot) -> list[Problem]:
        """The checks on one snapshot, without I/O."""
        return find_problems(
            payload,
            snap,
            check_negative_prompts=self.check_negative_prompts,
            face_restoration_available=self.face_restoration_available,
        )

    async def _rescan(self, kind: str) -> bool:
        """POST the refresh, read the lists again; False when one was done within refresh_interval."""
        async with self._locks[kind]:
            last = self._refreshed_at.get(kind)
            if last is not None and self.clock() - last < self.refresh_interval:
                return False
            self._refreshed_at[kind] = self.clock()
            refresh, lists = _RESCANS[kind]
            if refresh is not None:
                try:
                    response = await self.http.post(refresh, timeout=self.refresh_timeout)
                    if response.status_code >= 400:
                        log.warning("%s answered %s", refresh, response.status_code)
                except httpx.HTTPError as error:
                    log.warning("%s failed: %s", refresh, type(error).__name__)
            assert self.snapshot is not None
            for name in lists:
                read_list(self.snapshot, name, await self._get(name))
            self.refreshes[kind] += 1
            return True

    async def _get(self, name: str, missing_ok: bool = False) -> Any:
        path = f"/sdapi/v1/{name}"
        try:
            response = await self.http.get(path, timeout=self.timeout)
        except httpx.HTTPError as error:
            raise CatalogError(f"GET {path}: {type(error).__name__} {error}".strip()) from None
        if missing_ok and response.status_code == 404:
            return None
        if response.status_code == 401:  # A1111's --api-auth: no job's fault, and retrying cannot help
            raise A1111AuthRefused(
                f"A1111 refused the credentials in SIDECAR_A1111_API_AUTH (GET {path}: 401)"
            )
        if response.status_code != 200:
            raise CatalogError(f"GET {path} answered {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise CatalogError(f"GET {path} did not answer JSON") from None


def _rescan_kind(problem: Problem) -> str | None:
    if problem.kind == "download":
        return "upscaler" if problem.field == "hr_upscaler" else None
    return problem.kind if problem.kind in _RESCANS else None
