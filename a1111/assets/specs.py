"""Assets as the command line, ``POST /standin/assets`` and the defaults name them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from a1111.assets.files import Kind
from a1111.tables import DOWNLOADABLE_UPSCALERS


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
