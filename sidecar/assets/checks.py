"""The checks of a txt2img payload against one snapshot of A1111's lists, without I/O: each thing it
names that this node lacks is a ``Problem``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sidecar.assets.snapshot import Snapshot

ProblemKind = Literal["lora", "checkpoint", "vae", "upscaler", "style", "sampler", "scheduler", "download"]
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class Problem:
    """Why a job would not run as asked here. ``elsewhere``: another node may have what is missing
    (give the job back); False: no A1111 has it (an unknown sampler or scheduler: poison)."""

    kind: ProblemKind
    name: str
    field: str
    elsewhere: bool
    reason: str


def find_problems(
    payload: Mapping[str, Any],
    snap: Snapshot,
    *,
    check_negative_prompts: bool = False,
    face_restoration_available: bool = False,
) -> list[Problem]:
    """Everything ``payload`` names that ``snap`` lacks (LoRAs in negative prompts only with
    ``check_negative_prompts``; ``restore_faces`` without ``face_restoration_available``)."""
    found: list[Problem] = []
    hires = payload.get("enable_hr") is True
    styles = [str(s) for s in payload.get("styles") or []]
    texts = [("prompt", payload.get("prompt"))]
    if hires:
        texts.append(("hr_prompt", payload.get("hr_prompt")))
    if check_negative_prompts:
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
    found += _model_problems(payload, snap, hires)
    found += _sampler_problems(payload, snap, hires)
    if payload.get("restore_faces") is True and not face_restoration_available:
        why = "the face-restoration weights, which this node does not have: A1111 would try to download"
        reason = f"restore_faces needs {why} them for every image"
        found.append(Problem("download", "face restoration", "restore_faces", True, reason))
    return found


def _model_problems(payload: Mapping[str, Any], snap: Snapshot, hires: bool) -> list[Problem]:
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


def _sampler_problems(payload: Mapping[str, Any], snap: Snapshot, hires: bool) -> list[Problem]:
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
            reason = f"sampler '{value}' named in {name} is not one of A1111's samplers{hint} ({consequence})"
            found.append(Problem("sampler", value, name, False, reason))
    for name in ("scheduler", "hr_scheduler") if hires else ("scheduler",):
        value = payload.get(name)
        if isinstance(value, str) and value not in snap.schedulers:
            why = "is not one of A1111's schedulers (it would silently run 'Automatic')"
            found.append(
                Problem("scheduler", value, name, False, f"scheduler '{value}' named in {name} {why}")
            )
    return found


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
