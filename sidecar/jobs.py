"""Jobs: from queue message text to the txt2img request A1111 gets.

Pure functions and pydantic models, no I/O. A message is UTF-8 JSON, raw or base64-encoded (the way
Azure Functions producers write it); ``{`` is not a base64 character, so the two never collide. Only
the txt2img fields a producer may set are accepted: anything that could run scripts or touch the
node's files, and any unknown field, is refused with the field's name and the reason.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from sidecar.errors import InvalidJob

MAX_MESSAGE_BYTES = 64 * 1024
# Matched whole (fullmatch): with re.match, "$" would also match before a trailing newline.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")

# Legacy k-diffusion names (the aliases of A1111's modules/sd_samplers_kdiffusion.py). Current A1111
# looks samplers up by their canonical name only: it answers 404 to these, or in 1.10 silently runs
# its default sampler instead. The "_ka" (Karras) variants became a scheduler in 1.9.
LEGACY_SAMPLERS: dict[str, tuple[str, str | None]] = {
    "k_euler_a": ("Euler a", None),
    "k_euler_ancestral": ("Euler a", None),
    "k_euler": ("Euler", None),
    "k_lms": ("LMS", None),
    "k_heun": ("Heun", None),
    "k_dpm_2": ("DPM2", None),
    "k_dpm_2_a": ("DPM2 a", None),
    "k_dpmpp_2s_a": ("DPM++ 2S a", None),
    "k_dpmpp_2m": ("DPM++ 2M", None),
    "k_dpmpp_sde": ("DPM++ SDE", None),
    "k_dpmpp_2m_sde": ("DPM++ 2M SDE", None),
    "k_dpmpp_2m_sde_heun": ("DPM++ 2M SDE Heun", None),
    "k_dpmpp_3m_sde": ("DPM++ 3M SDE", None),
    "k_dpm_fast": ("DPM fast", None),
    "k_dpm_ad": ("DPM adaptive", None),
    "k_lms_ka": ("LMS", "Karras"),
    "k_dpm_2_ka": ("DPM2", "Karras"),
    "k_dpm_2_a_ka": ("DPM2 a", "Karras"),
    "k_dpmpp_2s_a_ka": ("DPM++ 2S a", "Karras"),
    "k_dpmpp_2m_ka": ("DPM++ 2M", "Karras"),
    "k_dpmpp_sde_ka": ("DPM++ SDE", "Karras"),
    "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "Karras"),
    "ddim": ("DDIM", None),
    "plms": ("PLMS", None),
    "unipc": ("UniPC", None),
}

# Free text (prompts): any printable unicode, tabs and newlines; no other control characters, C0 or C1
# (U+0080-U+009F: U+009B is a terminal's escape). "\Z", not "$": "$" also matches before a final newline.
_TEXT = re.compile(r"\A[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*\Z")
# Names of things installed on the node (checkpoints, VAEs, styles, samplers, upscalers): never a path,
# no control characters at all (a newline included). Look-alike dots and slashes are caught after NFKC
# normalisation (``_check_name``).
_NAME = re.compile(r"\A(?!.*\.\.)[^\x00-\x1f\x7f-\x9f/\\:*?\"<>|]{1,256}\Z")

Text = Annotated[str, StringConstraints(max_length=32_768, pattern=_TEXT)]
Name = Annotated[str, StringConstraints(pattern=_NAME)]
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


@dataclass(frozen=True)
class Limits:
    """The configurable bounds of a job (SIDECAR_MAX_WIDTH, ...)."""

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_images: int = 8


@dataclass(frozen=True)
class Job:
    id: str
    spec: JobSpec
    received: dict[str, Any]  # the message's JSON object as it arrived

    @property
    def image_count(self) -> int:
        return (self.spec.batch_size or 1) * (self.spec.n_iter or 1)

    def txt2img_payload(self) -> dict[str, Any]:
        """The body for POST /sdapi/v1/txt2img: the producer's fields, canonical sampler names."""
        payload = self.spec.model_dump(exclude_none=True, exclude={"id"})
        for field, scheduler_field in (("sampler_name", "scheduler"), ("hr_sampler_name", "hr_scheduler")):
            legacy = LEGACY_SAMPLERS.get(payload.get(field, "").lower())
            if legacy:
                payload[field], scheduler = legacy
                if scheduler and scheduler_field not in payload:
                    payload[scheduler_field] = scheduler
        # Images come back in the response and never land on the node's disk.
        payload["send_images"] = True
        payload["save_images"] = False
        return payload


def decode_message(text: str) -> bytes:
    """The JSON bytes of a message, raw or base64-encoded."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidJob("message", f"is {len(raw)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    stripped = raw.strip()
    if stripped.startswith(b"{"):
        return stripped
    try:
        decoded = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidJob("message", "is not a JSON object, raw or base64-encoded") from None
    if not decoded.strip().startswith(b"{"):
        raise InvalidJob("message", "base64 text does not decode to a JSON object")
    return decoded.strip()


def _first_error(error: ValidationError) -> InvalidJob:
    first = error.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"]) or "message"
    kind = first["type"]
    if kind == "extra_forbidden" and first["loc"] and first["loc"][-1] == "":
        return InvalidJob("message", "has an empty key")
    if kind == "extra_forbidden":
        return InvalidJob(loc, "is not an allowed field")
    if kind == "finite_number":
        shown = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(str(first.get("input")), "that")
        return InvalidJob(loc, f"must be a finite number, not {shown}")
    if kind == "missing":
        return InvalidJob(loc, "is required")
    if kind == "json_invalid":
        return InvalidJob("message", f"is not valid JSON ({first['msg']})")
    if kind == "model_type":
        return InvalidJob(loc, "must be a JSON object")
    if kind == "string_pattern_mismatch":
        pattern = str((first.get("ctx") or {}).get("pattern", ""))
        if pattern == _NAME.pattern:
            return InvalidJob(loc, "must be a name, not a path (no '/', '\\', '..' or control characters)")
        return InvalidJob(loc, "contains control characters")
    return InvalidJob(loc, str(first["msg"]).removeprefix("Value error, "))


def check_limits(spec: JobSpec, limits: Limits) -> None:
    """The size, step and image limits; with ``enable_hr`` also the upscaled size A1111 would make."""
    for field, value, top in (
        ("width", spec.width, limits.max_width),
        ("height", spec.height, limits.max_height),
        ("hr_resize_x", spec.hr_resize_x, limits.max_width),
        ("hr_resize_y", spec.hr_resize_y, limits.max_height),
    ):
        if value is not None and value > top:
            raise InvalidJob(field, f"{value} is above the limit of {top}")
        if value and value % 8:
            raise InvalidJob(field, f"{value} is not a multiple of 8")
    for field, value in (("steps", spec.steps), ("hr_second_pass_steps", spec.hr_second_pass_steps)):
        if value is not None and value > limits.max_steps:
            raise InvalidJob(field, f"{value} is above the limit of {limits.max_steps}")
    if spec.enable_hr:
        width, height = spec.width or 512, spec.height or 512
        if spec.hr_resize_x or spec.hr_resize_y:
            # A1111 keeps the aspect ratio when only one of them is set
            out_w = spec.hr_resize_x or math.ceil(width * spec.hr_resize_y / height)  # type: ignore[operator]
            out_h = spec.hr_resize_y or math.ceil(height * spec.hr_resize_x / width)  # type: ignore[operator]
            # name the field the producer set (the one over the limit when both are)
            over_x = spec.hr_resize_x and (out_w > limits.max_width or not spec.hr_resize_y)
            field = "hr_resize_x" if over_x else "hr_resize_y"
        else:
            scale = 2.0 if spec.hr_scale is None else spec.hr_scale  # A1111's default
            out_w, out_h = int(width * scale), int(height * scale)
            field = "hr_scale"
        if out_w > limits.max_width or out_h > limits.max_height:
            raise InvalidJob(
                field,
                f"the upscaled image would be {out_w}x{out_h}; the limit is "
                f"{limits.max_width}x{limits.max_height}",
            )
    images = (spec.batch_size or 1) * (spec.n_iter or 1)
    if images > limits.max_images:
        raise InvalidJob("batch_size", f"batch_size*n_iter is {images}; the limit is {limits.max_images}")


def job_id_hint(text: str) -> str | None:
    """The producer's job id of a message that failed validation, when one can be read safely.

    Anything can be in such a message (1,000 levels of nesting make ``json`` raise RecursionError):
    no error of reading it may escape, the hint is only a courtesy."""
    try:
        data = json.loads(decode_message(text))
        job_id = data.get("id") if isinstance(data, dict) else None
    except Exception:
        return None
    if isinstance(job_id, str) and valid_job_id(job_id):
        return job_id
    return None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidJob(
                key or "message", "appears twice in the message" if key else "has two empty keys"
            )
        seen[key] = value
    return seen


def parse_job(text: str, message_id: str, limits: Limits | None = None) -> Job:
    """Turn a queue message into a Job, or raise InvalidJob naming the field and the reason."""
    data = decode_message(text)
    try:
        spec = JobSpec.model_validate_json(data)
    except ValidationError as error:
        raise _first_error(error) from None
    check_limits(spec, limits or Limits())
    # A duplicate key is a producer's bug: which of the two did it mean? (The model read the last.)
    received = json.loads(data, object_pairs_hook=_no_duplicate_keys)
    job_id = spec.id or message_id
    if not valid_job_id(job_id):
        raise InvalidJob("id", "the message id cannot serve as a job id")
    return Job(id=job_id, spec=spec, received=received)
