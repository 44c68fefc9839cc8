"""The files the stand-in's A1111 "has on disk": checkpoints, LoRAs, VAEs, upscalers and prompt styles,
each with the ids A1111 knows it by and the body its list endpoint answers."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["checkpoint", "lora", "vae", "upscaler", "style"]
KINDS: tuple[Kind, ...] = ("checkpoint", "lora", "vae", "upscaler", "style")


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
