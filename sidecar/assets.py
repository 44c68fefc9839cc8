"""What this node's A1111 has, and whether a job can run on it as asked.

A1111 v1.10.1 runs a job whose assets it lacks without a word: a missing LoRA is skipped, an unknown
checkpoint in ``override_settings`` runs the loaded model, an unknown VAE or style is ignored, an
unknown sampler runs "DPM++ 2M" (the recording in tests/data/a1111-v1.10.1 shows each). Others
fail the job (an unknown ``hr_checkpoint_name`` or ``hr_upscaler``, a bad ``hr_sampler_name``), and
some make it fetch weights from the internet on every image (``restore_faces`` without the
face-restoration weights, an upscaler whose ``model_path`` is still a URL). ``Catalog.check`` finds
all of these before the job is sent, from A1111's own lists, matched the way A1111 matches them:

* LoRA: ``<lora:name...>`` and ``<lyco:name...>`` tags (extra_networks' ``<(\\w+):([^>]+)>``, the name
  is the first ``:`` item) against each LoRA's ``name`` and ``alias``, exactly; an alias two LoRAs
  share (and "none") only by name. A1111 reads tags in ``prompt``, the style prompts the job names,
  and with ``enable_hr`` in ``hr_prompt``; it never activates LoRAs in negative prompts, so those
  are checked only with ``check_negative_prompts``.
* ``override_settings.sd_model_checkpoint``: exactly one of a checkpoint's ids, as
  ``checkpoint_aliases`` holds them: title, name (file name relative to the models folder, with
  extension), ``model_name``, the file name without extension, ``name [hash]`` for both names,
  the short hash, the full sha256 (the old 8-digit hash A1111 also takes is not in its API).
* ``hr_checkpoint_name`` (with ``enable_hr``): ``get_closet_checkpoint_match``: those ids, else any
  substring of a title (the shortest title wins), else the same with a trailing ``[...]`` removed.
* ``override_settings.sd_vae``: "Automatic", "None" or a ``/sd-vae`` model_name.
* samplers and schedulers: names only (the API does not take aliases such as ``k_euler_a``); a
  sampler may end in a scheduler's label, name or alias ("DPM++ 2M Karras"); ``hr_sampler_name``
  must be a bare name. Schedulers by name or label.
* ``hr_upscaler`` (with ``enable_hr``): a latent mode or an ``/upscalers`` name; one whose
  ``model_path`` is an http(s) URL has no weights on disk (a download). ``styles``: ``/prompt-styles``.

A miss of something a node can gain while it runs (a LoRA, checkpoint or VAE copied onto it; a
download finished) makes the catalog rescan before it answers: ``POST /sdapi/v1/refresh-loras``,
``/refresh-checkpoints`` or ``/refresh-vae`` (A1111 has no refresh for upscalers and styles: their
lists are only read again), at most once per ``refresh_interval`` for each. ``/refresh-checkpoints``
and ``/refresh-vae`` wait for A1111's queue lock, i.e. behind the generations running or queued.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from sidecar.errors import A1111AuthRefused
from sidecar.errors import CatalogError as CatalogError  # re-exported: defined in the error tree

log = logging.getLogger(__name__)

ProblemKind = Literal["lora", "checkpoint", "vae", "upscaler", "style", "sampler", "scheduler", "download"]
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_CHECKSUM = re.compile(r"\s*\[[^]]+]\s*$")
# hr_upscaler values that scale the latent (shared.latent_upscale_modes), if the server does not list them
LATENT_UPSCALE_MODES = (
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
)
# what each kind of miss rescans: the POST that makes A1111 look at its disk again, then the lists
_RESCANS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "lora": ("/sdapi/v1/refresh-loras", ("loras",)),
    "checkpoint": ("/sdapi/v1/refresh-checkpoints", ("sd-models",)),
    "vae": ("/sdapi/v1/refresh-vae", ("sd-vae",)),
    "upscaler": (None, ("upscalers",)),
    "style": (None, ("prompt-styles",)),
}
_LISTS = ("loras", "sd-models", "sd-vae", "samplers", "schedulers", "upscalers", "prompt-styles")


@dataclass(frozen=True)
class Problem:
    """Why a job would not run as asked here. ``elsewhere``: another node may have what is missing
    (give the job back); False: no A1111 has it (an unknown sampler or scheduler: poison)."""

    kind: ProblemKind
    name: str
    field: str
    elsewhere: bool
    reason: str


@dataclass(frozen=True)
class Checkpoint:
    title: str
    model_name: str
    shorthash: str | None
    sha256: str | None
    filename: str

    @property
    def name(self) -> str:
        """The file name relative to the models folder: the title without its " [hash]"."""
        suffix = f" [{self.shorthash}]"
        return self.title[: -len(suffix)] if self.shorthash and self.title.endswith(suffix) else self.title

    def ids(self) -> set[str]:
        """CheckpointInfo.ids as far as the API shows them (not the old 8-digit hash)."""
        stem = re.split(r"[/\\]", self.filename)[-1].rsplit(".", 1)[0]
        ids = {self.title, self.name, self.model_name, stem}
        if self.shorthash:
            ids |= {self.shorthash, f"{self.name} [{self.shorthash}]", f"{stem} [{self.shorthash}]"}
        if self.sha256:
            ids.add(self.sha256)
        return ids


@dataclass
class Snapshot:
    """A1111's lists at one moment."""

    loras: list[tuple[str, str]] = field(default_factory=list)  # (name, alias)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    vaes: set[str] = field(default_factory=set)
    samplers: dict[str, list[str]] = field(default_factory=dict)  # name -> aliases, in A1111's order
    schedulers: dict[str, str] = field(default_factory=dict)  # name or label -> label
    scheduler_suffixes: list[tuple[str, ...]] = field(default_factory=list)  # (label, name, *aliases)
    upscalers: dict[str, str | None] = field(default_factory=dict)  # name -> model_path
    latent_modes: set[str] = field(default_factory=lambda: set(LATENT_UPSCALE_MODES))
    styles: dict[str, str] = field(default_factory=dict)  # name -> prompt

    def lora(self, name: str) -> bool:
        aliases = [alias for _, alias in self.loras]
        forbidden = {"none", "addams"} | {a.lower() for a in aliases if aliases.count(a) > 1}
        by_alias = name.lower() not in forbidden
        return any(name == lora or (by_alias and name == alias) for lora, alias in self.loras)

    def checkpoint(self, alias: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints if alias in c.ids()), None)

    def closest_checkpoint(self, search: str) -> Checkpoint | None:
        found = self.checkpoint(search)
        for needle in (search, _CHECKSUM.sub("", search)):
            if found is None:
                matches = sorted(
                    (c for c in self.checkpoints if needle in c.title), key=lambda c: len(c.title)
                )
                found = matches[0] if matches else None
        return found

    def sampler(self, name: str) -> bool:
        """sd_samplers.get_sampler_and_scheduler: a scheduler glued to the name is split off first."""
        for suffixes in self.scheduler_suffixes:
            for suffix in suffixes:
                if name.endswith(" " + suffix):
                    name = name[: -len(suffix) - 1]
                    break
        return name in self.samplers


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
            _parse(snapshot, name, body)
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
        found: list[Problem] = []
        hires = payload.get("enable_hr") is True
        styles = [str(s) for s in payload.get("styles") or []]
        texts = [("prompt", payload.get("prompt"))]
        if hires:
            texts.append(("hr_prompt", payload.get("hr_prompt")))
        if self.check_negative_prompts:
            texts += [("negative_prompt", payload.get("negative_prompt"))]
            texts += [("hr_negative_prompt", payload.get("hr_negative_prompt"))] if hires else []
        texts += [(f"style '{s}' (styles)", snap.styles[s]) for s in styles if s in snap.styles]
        seen: set[tuple[str, str]] = set()
        for where, text in texts:
            for name in lora_names(text if isinstance(text, str) else ""):
                if not snap.lora(name) and (name, where) not in seen:
                    seen.add((name, where))
                    reason = f"LoRA '{name}' named in {where} is not installed on this node"
                    at = "styles" if where.startswith("style") else where
                    found.append(Problem("lora", name, at, True, reason))
        for name in styles:
            if name not in snap.styles:
                why = "is not defined on this node (A1111 would silently skip it)"
                found.append(_missing("style", name, "styles", why))
        found += self._model_problems(payload, snap, hires)
        found += self._sampler_problems(payload, snap, hires)
        if payload.get("restore_faces") is True and not self.face_restoration_available:
            why = "the face-restoration weights, which this node does not have: A1111 would try to download"
            reason = f"restore_faces needs {why} them for every image"
            found.append(Problem("download", "face restoration", "restore_faces", True, reason))
        return found

    def _model_problems(self, payload: Mapping[str, Any], snap: Snapshot, hires: bool) -> list[Problem]:
        found = []
        overrides = payload.get("override_settings") or {}
        checkpoint = overrides.get("sd_model_checkpoint") if isinstance(overrides, Mapping) else None
        at = "override_settings.sd_model_checkpoint"
        if isinstance(checkpoint, str) and snap.checkpoint(checkpoint) is None:
            why = "is not on this node (A1111 would silently run its loaded model)"
            found.append(_missing("checkpoint", checkpoint, at, why))
        hr_checkpoint = payload.get("hr_checkpoint_name")
        if hires and isinstance(hr_checkpoint, str) and hr_checkpoint != "Use same checkpoint":
            if snap.closest_checkpoint(hr_checkpoint) is None:
                why = "is not on this node (A1111 would fail the job)"
                found.append(_missing("checkpoint", hr_checkpoint, "hr_checkpoint_name", why))
        vae = overrides.get("sd_vae") if isinstance(overrides, Mapping) else None
        if isinstance(vae, str) and vae not in ("Automatic", "None") and vae not in snap.vaes:
            why = "is not on this node (A1111 would silently use none)"
            found.append(_missing("vae", vae, "override_settings.sd_vae", why))
        upscaler = payload.get("hr_upscaler")
        if hires and isinstance(upscaler, str) and upscaler not in snap.latent_modes:
            if upscaler not in snap.upscalers:
                why = "is not on this node (A1111 would fail the job)"
                found.append(_missing("upscaler", upscaler, "hr_upscaler", why))
            elif (url := snap.upscalers[upscaler] or "").startswith(("http://", "https://")):
                why = f"has no weights on this node: A1111 would try to download them from {url}"
                found.append(_missing("upscaler", upscaler, "hr_upscaler", why, download=True))
        return found

    def _sampler_problems(self, payload: Mapping[str, Any], snap: Snapshot, hires: bool) -> list[Problem]:
        found = []
        fallback = next(iter(snap.samplers), "its default sampler")
        fields = [("sampler_name", f"it would silently run '{fallback}'")]
        if hires:
            fields.append(("hr_sampler_name", "A1111 would fail the job after the first pass"))
        for name, consequence in fields:
            value = payload.get(name)
            if not isinstance(value, str):
                continue
            known = snap.sampler(value) if name == "sampler_name" else value in snap.samplers
            if not known:
                alias = next((s for s, aliases in snap.samplers.items() if value in aliases), None)
                hint = f", an alias of '{alias}' that the txt2img API does not take" if alias else ""
                reason = (
                    f"sampler '{value}' named in {name} is not one of A1111's samplers{hint} ({consequence})"
                )
                found.append(Problem("sampler", value, name, False, reason))
        for name in ("scheduler", "hr_scheduler") if hires else ("scheduler",):
            value = payload.get(name)
            if isinstance(value, str) and value not in snap.schedulers:
                why = "is not one of A1111's schedulers (it would silently run 'Automatic')"
                found.append(
                    Problem("scheduler", value, name, False, f"scheduler '{value}' named in {name} {why}")
                )
        return found

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
                _parse(self.snapshot, name, await self._get(name))
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


_Missing = Literal["checkpoint", "vae", "upscaler", "style"]
_LABELS: dict[str, str] = {"checkpoint": "checkpoint", "vae": "VAE", "upscaler": "upscaler", "style": "style"}


def _missing(what: _Missing, name: str, at: str, why: str, download: bool = False) -> Problem:
    """A Problem another node may solve: "<what> '<name>' named in <field> <why>"."""
    return Problem(
        "download" if download else what, name, at, True, f"{_LABELS[what]} '{name}' named in {at} {why}"
    )


def lora_names(text: str) -> list[str]:
    """The LoRA names a prompt mentions: ``<lora:name:...>`` and ``<lyco:name:...>``."""
    return [args.split(":")[0] for kind, args in _EXTRA_NETWORK.findall(text) if kind in ("lora", "lyco")]


def _rescan_kind(problem: Problem) -> str | None:
    if problem.kind == "download":
        return "upscaler" if problem.field == "hr_upscaler" else None
    return problem.kind if problem.kind in _RESCANS else None


def _items(name: str, body: Any) -> Iterable[dict[str, Any]]:
    if not isinstance(body, list):
        raise CatalogError(f"GET /sdapi/v1/{name} did not answer a list")
    return [item for item in body if isinstance(item, dict)]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _parse(snap: Snapshot, name: str, body: Any) -> None:
    items = _items(name, body)
    if name == "loras":
        snap.loras = [(str(i["name"]), str(i.get("alias") or i["name"])) for i in items if "name" in i]
    elif name == "sd-models":
        snap.checkpoints = [
            Checkpoint(
                str(i["title"]),
                str(i.get("model_name") or ""),
                _text(i.get("hash")),
                _text(i.get("sha256")),
                str(i.get("filename") or ""),
            )
            for i in items
            if "title" in i
        ]
    elif name == "sd-vae":
        snap.vaes = {str(i["model_name"]) for i in items if "model_name" in i}
    elif name == "samplers":
        snap.samplers = {
            str(i["name"]): [str(a) for a in i.get("aliases") or []] for i in items if "name" in i
        }
    elif name == "schedulers":
        snap.schedulers = {
            str(i[key]): str(i.get("label") or i["name"])
            for i in items
            for key in ("name", "label")
            if key in i
        }
        snap.scheduler_suffixes = [
            tuple(str(s) for s in (i.get("label"), i.get("name"), *(i.get("aliases") or [])) if s)
            for i in items
        ]
    elif name == "upscalers":
        snap.upscalers = {str(i["name"]): _text(i.get("model_path")) for i in items if "name" in i}
    elif name == "prompt-styles":
        snap.styles = {str(i["name"]): str(i.get("prompt") or "") for i in items if "name" in i}
