"""The stand-in's A1111's asset folders: what is listed, what is on disk but not yet listed, and how
A1111 v1.10.1 finds each kind by name."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from a1111.assets.files import KINDS, Asset, Checkpoint, Kind, Lora, Style, Upscaler, Vae, made_up_sha256
from a1111.assets.specs import AssetSpec
from a1111.tables import BUILTIN_UPSCALERS

# LoRA aliases networks.py never matches by alias (besides aliases that two LoRAs share)
_FORBIDDEN_ALIASES = {"none", "addams"}
_CHECKSUM = re.compile(r"\s*\[[^]]+]\s*$")  # sd_models.re_strip_checksum


@dataclass
class AssetStore:
    models_dir: str = "/stable-diffusion-webui/models"
    hashing: bool = True  # False: A1111's --no-hashing (no sha256, titles without "[hash]")
    face_restoration: bool = False  # the face-restoration weights are on disk
    listed: dict[Kind, dict[str, Asset]] = field(default_factory=lambda: {kind: {} for kind in KINDS})
    pending: dict[Kind, dict[str, Asset]] = field(default_factory=lambda: {kind: {} for kind in KINDS})

    def __post_init__(self) -> None:
        for name in BUILTIN_UPSCALERS:
            self.listed["upscaler"][name] = Upscaler(name, None, None)

    def make(self, spec: AssetSpec) -> Asset:
        sha = (spec.sha256 or made_up_sha256(spec.name)) if self.hashing else None
        root, name = self.models_dir, spec.name
        if spec.kind == "checkpoint":
            name = name if name.endswith((".safetensors", ".ckpt")) else name + ".safetensors"
            return Checkpoint(name, f"{root}/Stable-diffusion/{name}", sha, spec.config)
        if spec.kind == "lora":
            metadata = spec.metadata if spec.metadata is not None else _lora_metadata(name)
            return Lora(name, spec.alias or name, f"{root}/Lora/{name}.safetensors", metadata, sha)
        if spec.kind == "vae":
            name = name if name.endswith((".safetensors", ".pt", ".ckpt")) else name + ".safetensors"
            return Vae(name, f"{root}/VAE/{name}", sha)
        if spec.kind == "upscaler":
            path = spec.model_path or f"{root}/ESRGAN/{name}.pth"
            remote = path.startswith(("http://", "https://"))
            model_name = spec.model_name or (None if remote else "ESRGAN_4x")  # a user ESRGAN model
            return Upscaler(name, model_name, path, spec.scale)
        return Style(name, spec.prompt, spec.negative_prompt)

    def add(self, spec: AssetSpec) -> Asset:
        asset = self.make(spec)
        refreshable = spec.kind in ("checkpoint", "lora", "vae")
        (self.pending if spec.pending and refreshable else self.listed)[spec.kind][asset.name] = asset
        return asset

    def remove(self, kind: Kind, name: str) -> bool:
        names = {name, name + ".safetensors"} if kind in ("checkpoint", "vae") else {name}
        found = False
        for table in (self.listed[kind], self.pending[kind]):
            for key in names & set(table):
                del table[key]
                found = True
        return found

    def refresh(self, kind: Kind) -> list[str]:
        """Rescan a folder: the pending files of that kind become listed."""
        arrived = list(self.pending[kind])
        self.listed[kind].update(self.pending[kind])
        self.pending[kind].clear()
        return arrived

    def bodies(self, kind: Kind) -> list[dict[str, Any]]:
        assets = list(self.listed[kind].values())
        if kind == "upscaler":  # shared.sd_upscalers: the built-ins first, then by name
            assets.sort(key=lambda a: "" if a.name in BUILTIN_UPSCALERS else a.name.lower())
        return [asset.body() for asset in assets]

    # lookups, each the way A1111 does it

    def checkpoint(self, alias: Any) -> Checkpoint | None:
        """sd_models.checkpoint_aliases.get(): exact, over every id of every listed checkpoint."""
        for asset in self.listed["checkpoint"].values():
            if isinstance(asset, Checkpoint) and alias in asset.ids():
                return asset
        return None

    def closest_checkpoint(self, search: str | None) -> Checkpoint | None:
        """sd_models.get_closet_checkpoint_match (hr_checkpoint_name, refiner_checkpoint)."""
        if not search:
            return None
        found = self.checkpoint(search)
        if found is not None:
            return found
        models = [a for a in self.listed["checkpoint"].values() if isinstance(a, Checkpoint)]
        for needle in (search, _CHECKSUM.sub("", search)):
            matches = sorted((m for m in models if needle in m.title), key=lambda m: len(m.title))
            if matches:
                return matches[0]
        return None

    def lora(self, name: str) -> Lora | None:
        """networks.py: by alias, or by file name only for forbidden aliases; a miss rescans the folder."""
        for attempt in range(2):
            loras = [a for a in self.listed["lora"].values() if isinstance(a, Lora)]
            aliases = [lora.alias for lora in loras]
            forbidden = _FORBIDDEN_ALIASES | {a.lower() for a in aliases if aliases.count(a) > 1}
            for lora in loras:
                if lora.name == name or (lora.alias == name and name.lower() not in forbidden):
                    return lora
            if attempt == 0:
                self.refresh("lora")
        return None

    def vae(self, name: str) -> Vae | None:
        found = self.listed["vae"].get(name)
        return found if isinstance(found, Vae) else None

    def upscaler(self, name: str) -> Upscaler | None:
        found = self.listed["upscaler"].get(name)
        return found if isinstance(found, Upscaler) else None

    def style(self, name: str) -> Style | None:
        found = self.listed["style"].get(name)
        return found if isinstance(found, Style) else None

    def downloaded(self, upscaler: Upscaler) -> Upscaler:
        """The weights of a downloadable upscaler are now on disk."""
        file = os.path.basename(upscaler.model_path or upscaler.name)
        local = replace(upscaler, model_path=f"{self.models_dir}/ESRGAN/{file}")
        self.listed["upscaler"][upscaler.name] = local
        return local

    def summary(self) -> dict[str, Any]:
        return {
            "listed": {kind: sorted(self.listed[kind]) for kind in KINDS},
            "pending": {kind: sorted(self.pending[kind]) for kind in KINDS},
            "face_restoration": self.face_restoration,
        }


def _lora_metadata(name: str) -> dict[str, Any]:
    """A few of the kohya-ss training keys a LoRA's safetensors header carries."""
    dim = {"add_detail": "32", "more_details": "16", "lcm-lora-sdv1-5": "64"}.get(name, "8")
    return {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_base_model_version": "sd_v1"}
