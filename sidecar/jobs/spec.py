"""The job message's model: the txt2img fields a producer may set, and what a name or a job id may be.

Only the txt2img fields a producer may set are accepted: anything that could run scripts or touch the
node's files, and any unknown field, is refused with the field's name and the reason.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

# Matched whole (fullmatch): with re.match, "$" would also match before a trailing newline.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")

# Free text (prompts): any printable unicode, tabs and newlines; no other control characters, C0 or C1
# (U+0080-U+009F: U+009B is a terminal's escape). "\Z", not "$": "$" also matches before a final newline.
_TEXT = re.compile(r"\A[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*\Z")
# Names of things installed on the node (checkpoints, VAEs, styles, samplers, upscalers): never a path,
# no control characters at all (a newline included). Look-alike dots and slashes are caught after NFKC
# normalisation (``_check_name``).
NAME_PATTERN = re.compile(r"\A(?!.*\.\.)[^\x00-\x1f\x7f-\x9f/\\:*?\"<>|]{1,256}\Z")

Text = Annotated[str, StringConstraints(max_length=32_768, pattern=_TEXT)]
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Seed = Annotated[int, Field(ge=-1, le=2**32 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class ModelOverrides(_Strict):
    """The only override_settings a producer may send: which model runs the job."""

    sd_model_checkpoint: Name | None = None
    sd_vae: Name | None = None
    CLIP_stop_at_last_layers: Annotated[int, Field(ge=1, le=12)] | None = None

    @field_validator("sd_model_checkpoint", "sd_vae")
    @classmethod
    def _check_names(cls, value: str | None) -> str | None:
        if value is not None:
            _check_name(value)
        return value


class JobSpec(_Strict):
    """A job message: the allowed txt2img fields, plus ``id`` and ``override_settings``."""

    id: str | None = None
    prompt: Text
    negative_prompt: Text | None = None
    styles: Annotated[list[Name], Field(max_length=32)] | None = None
    seed: Seed | None = None
    subseed: Seed | None = None
    subseed_strength: Annotated[float, Field(ge=0, le=1)] | None = None
    sampler_name: Name | None = None
    scheduler: Name | None = None
    steps: Annotated[int, Field(ge=1)] | None = None
    cfg_scale: Annotated[float, Field(ge=0, le=100)] | None = None
    width: Annotated[int, Field(ge=64)] | None = None
    height: Annotated[int, Field(ge=64)] | None = None
    batch_size: Annotated[int, Field(ge=1)] | None = None
    n_iter: Annotated[int, Field(ge=1)] | None = None
    denoising_strength: Annotated[float, Field(ge=0, le=1)] | None = None
    enable_hr: bool | None = None
    hr_scale: Annotated[float, Field(ge=1, le=4)] | None = None
    hr_upscaler: Name | None = None
    hr_second_pass_steps: Annotated[int, Field(ge=0)] | None = None
    hr_resize_x: Annotated[int, Field(ge=0)] | None = None
    hr_resize_y: Annotated[int, Field(ge=0)] | None = None
    hr_checkpoint_name: Name | None = None
    hr_sampler_name: Name | None = None
    hr_scheduler: Name | None = None
    hr_prompt: Text | None = None
    hr_negative_prompt: Text | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    clip_skip: Annotated[int, Field(ge=1, le=12)] | None = None
    override_settings: ModelOverrides | None = None

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str | None) -> str | None:
        if value is not None and not valid_job_id(value):
            raise ValueError("must match [A-Za-z0-9._-]{1,128} and not be only dots")
        return value

    @field_validator(
        "sampler_name",
        "scheduler",
        "hr_upscaler",
        "hr_checkpoint_name",
        "hr_sampler_name",
        "hr_scheduler",
        "styles",
    )
    @classmethod
    def _check_names(cls, value: Any) -> Any:
        for name in value if isinstance(value, list) else [value]:
            if name is not None:
                _check_name(name)
        return value


def valid_job_id(value: str) -> bool:
    """A job id names blobs (``<id>/0.png``): ASCII letters, digits, ``.``, ``_``, ``-``, matched whole."""
    return JOB_ID_PATTERN.fullmatch(value) is not None and set(value) != {"."}


def _check_name(name: str) -> None:
    """A name's compatibility form must not be a path either: U+2025 is "..", U+FF0F is "/"."""
    folded = unicodedata.normalize("NFKC", name)
    if ".." in folded or any(char in folded for char in "/\\") or folded != folded.strip("\r\n"):
        raise ValueError("must be a name, not a path (no '/', '\\', '..' or look-alikes of them)")
