"""What the stand-in's A1111 "has on disk": checkpoints, LoRAs, VAEs, upscalers, prompt styles and the
face-restoration weights, and how A1111 v1.10.1 finds each of them by name.

Assets added with ``pending`` are files copied onto the node while A1111 runs: they are on disk but
not in A1111's lists until the list is rescanned (``POST /sdapi/v1/refresh-loras``,
``/refresh-checkpoints``, ``/refresh-vae``). A1111 also rescans the LoRA folder by itself when a
prompt names a LoRA it does not know (networks.load_networks), so such a LoRA is found by txt2img
before any refresh. Upscalers and styles have no refresh endpoint in A1111; here they appear at once.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from a1111.tables import BUILTIN_UPSCALERS, DOWNLOADABLE_UPSCALERS

Kind = Literal["checkpoint", "lora", "vae", "upscaler", "style"]
KINDS: tuple[Kind, ...] = ("checkpoint", "lora", "vae", "upscaler", "style")
# LoRA aliases networks.py never matches by alias (besides aliases that two LoRAs share)
_FORBIDDEN_ALIASES = {"none", "addams"}
_CHECKSUM = re.compile(r"\s*\[[^]]+]\s*$")  # sd_models.re_strip_checksum


def made_up_sha256(name: str) -> str:
    """A stable stand-in for the SHA-256 of a file that does not exist."""
    return hashlib.sha256(name.encode()).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    name: str  # relative to the checkpoint folder, with its extension (sd_models.CheckpointInfo.name)
    filename: str
    sha256: str | None  # None with --no-hashing
    config: str | None = None

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]" if self.shorthash else self.name

    @property
    def model_name(self) -> str:
        return os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]

    @property
    def name_for_extra(self) -> str:
        return os.path.splitext(os.path.basename(self.filename))[0]

    @property
    def old_hash(self) -> str:
        """model_hash(): 8 hex digits of a 64 KB slice of the file; made up here."""
        return made_up_sha256("old hash of " + self.name)[:8]

    def ids(self) -> list[str]:
        """CheckpointInfo.ids: the keys of sd_models.checkpoint_aliases."""
        ids = [self.old_hash, self.model_name, self.title, self.name, self.name_for_extra]
        ids.append(f"{self.name} [{self.old_hash}]")
        if self.shorthash and self.sha256:
            ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]"]
            ids.append(f"{self.name_for_extra} [{self.shorthash}]")
        return ids

    def body(self) -> dict[str, Any]:
        keys = ("title", "model_name", "shorthash", "sha256", "filename", "config")
        return {"hash" if key == "shorthash" else key: getattr(self, key) for key in keys}


@dataclass(frozen=True)
class Lora:
    name: str  # the file name without its extension
    alias: str
    path: str
    metadata: dict[str, Any]
    sha256: str | None

    def body(self) -> dict[str, Any]:
        return {"name": self.name, "alias": self.alias, "path": self.path, "metadata": self.metadata}


@dataclass(frozen=True)
class Vae:
    name: str  # the file name with its extension: what sd_vae takes in settings
    filename: str
    sha256: str | None

    def body(self) -> dict[str, Any]:
        return {"model_name": self.name, "filename": self.filename}


@dataclass(frozen=True)
class Upscaler:
    name: str
    model_name: str | None
    model_path: str | None  # an http(s) URL: the weights are not on disk and are fetched on first use
    scale: float = 4

    @property
    def needs_download(self) -> bool:
        return (self.model_path or "").startswith(("http://", "https://"))

    def body(self) -> dict[str, Any]:
        scale = int(self.scale) if float(self.scale).is_integer() else self.scale
        return {
            "name": self.name,
            "model_name": self.model_name,
            "model_path": self.model_path,
            "model_url": None,  # A1111 always answers null here
            "scale": scale,
        }


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str

    def body(self) -> dict[str, Any]:
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


Asset = Checkpoint | Lora | Vae | Upscaler | Style


class AssetSpec(BaseModel):
    """One asset, for the command line, ``POST /standin/assets`` and the defaults."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    name: str
    pending: bool = False  # on disk, not listed until the list is refreshed
    sha256: str | None = None  # checkpoint, lora, vae; made up from the name when not given
    config: str | None = None  # checkpoint
    alias: str | None = None  # lora (ss_output_name); the name when not given
    metadata: dict[str, Any] | None = None  # lora
    model_name: str | None = None  # upscaler
    model_path: str | None = None  # upscaler: a path, or an http(s) URL for weights not on disk
    scale: float = 4  # upscaler
    prompt: str = ""  # style
    negative_prompt: str = ""  # style


class AssetRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Kind
    name: str


class AssetsUpdate(BaseModel):
    """``POST /standin/assets``: add (optionally pending), remove, and face-restoration weights."""

    model_config = ConfigDict(extra="forbid")

    add: list[AssetSpec] = []
    remove: list[AssetRef] = []
    face_restoration: bool | None = None


def default_specs() -> list[AssetSpec]:
    """Everything examples/jobs.jsonl and ``enqueue --generate`` (sidecar/prompts.py) name, and a fresh
    install's upscalers (weights not downloaded)."""
    checkpoints = [
        ("v1-5-pruned-emaonly", "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"),
        ("sd_xl_base_1.0", "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b"),
    ]
    loras = ["add_detail", "more_details", "epi_noiseoffset", "film_grain", "lcm-lora-sdv1-5"]
    specs = [AssetSpec(kind="checkpoint", name=name, sha256=sha) for name, sha in checkpoints]
    specs += [AssetSpec(kind="lora", name=name) for name in loras]
    specs.append(AssetSpec(kind="vae", name="vae-ft-mse-840000-ema-pruned.safetensors"))
    for name, model_name, url in DOWNLOADABLE_UPSCALERS:
        specs.append(AssetSpec(kind="upscaler", name=name, model_name=model_name, model_path=url))
    return specs


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


def parse_list(kind: Kind, text: str) -> list[AssetSpec]:
    """The command line's comma lists: ``name`` or ``name=value`` (checkpoint/vae/lora: sha256 or
    alias; upscaler: path or URL); an empty string means none."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        extra: dict[str, Any] = {}
        if value:
            key = {"lora": "alias", "upscaler": "model_path"}.get(kind, "sha256")
            extra[key] = value
        specs.append(AssetSpec(kind=kind, name=name.strip(), **extra))
    return specs
