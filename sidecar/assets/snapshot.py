"""A1111's asset lists at one moment (``Snapshot``), read from its API's answers, and how A1111 matches
a name against each of them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sidecar.errors import CatalogError

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


def _items(name: str, body: Any) -> Iterable[dict[str, Any]]:
    if not isinstance(body, list):
        raise CatalogError(f"GET /sdapi/v1/{name} did not answer a list")
    return [item for item in body if isinstance(item, dict)]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def read_list(snap: Snapshot, name: str, body: Any) -> None:
    """Put the answer to ``GET /sdapi/v1/<name>`` into ``snap``; CatalogError for a body not a list."""
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
