"""A stand-in for the AUTOMATIC1111 Stable Diffusion Web UI API (v1.10) for local runs, tests and benchmarks.

It serves what an A1111 client uses of ``webui.py --api --nowebui``: txt2img, progress, interrupt,
skip, samplers, schedulers, sd-models, options, loras. Field names, defaults, error bodies and the
queueing (one generation at a time, in arrival order) are A1111's, so a client written for the real
server works unchanged; but nothing is drawn. A generation sleeps ``seconds_per_image * batch_size *
n_iter`` seconds and the images are pooled PNGs of the requested size (``a1111.pngs``): no GPU, and
almost no CPU per request.

    python -m a1111.standin --host 127.0.0.1 --port 7860 --seconds-per-image 0.25 [--startup-delay S]

A1111 1.10 behaviour kept on purpose, surprising or not:
* an unknown sampler name (e.g. the legacy alias "k_euler_a") silently runs the first sampler,
  "DPM++ 2M" (``sd_samplers.get_sampler_and_scheduler``); ``--strict-samplers`` gives the
  ``404 Sampler not found`` of A1111 1.8 and earlier instead.
* errors have ``api_middleware``'s shape {"error", "detail", "body", "errors"}; bad field types get
  FastAPI's 422 {"detail": [...]}; unknown fields are ignored.
* ``--startup-delay S``: HTTP and the GET endpoints answer at once, txt2img waits for the model
  load, S seconds after start.
* ``POST /sdapi/v1/interrupt`` ends the running generation early: 200 with the images of the batches
  it started. A missing LoRA only logs a warning.

Knobs A1111 does not have, all under ``/standin/``:
* ``POST /standin/faults`` merges {"fail_next": N, "fail_status": 500, "fail_error": "OutOfMemoryError",
  "fail_message": "...", "hang_next": N, "crash_next": bool, "crash_after": N|null} and returns the
  result; ``GET`` shows it. fail: the call holds the queue a moment, then fails in A1111's shape.
  hang: it holds the queue until interrupted. crash: ``os._exit(1)`` when its generation starts
  (crash_after N: on the (N+1)-th generation).
* ``GET /standin/stats``: {"requests", "images", "busy_seconds", "started_at", "generations":
  [[start, end, n_images], ...], "received": [the last 1000 txt2img bodies as sent]}; unix times.
* ``POST /standin/reset`` clears the stats and the faults.
CLI equivalents: ``--fail-next N``, ``--hang-next N``, ``--crash-after N``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import string
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from a1111.pngs import PngPool, png_base64

log = logging.getLogger("a1111.standin")

VERSION = "v1.10.1"
TXT2IMG = "/sdapi/v1/txt2img"
# name | aliases | options: A1111's sampler table (sd_samplers_kdiffusion, _timesteps, _lcm) in its
# order; the first one is the fallback for unknown names. SamplerItem.options is Dict[str, str] and
# A1111's pydantic v1 turned True into "True", hence bare flags below become "True".
_SAMPLER_TABLE = """
DPM++ 2M          | k_dpmpp_2m                  | scheduler=karras
DPM++ SDE         | k_dpmpp_sde                 | scheduler=karras second_order brownian_noise
DPM++ 2M SDE      | k_dpmpp_2m_sde              | scheduler=exponential brownian_noise
DPM++ 2M SDE Heun | k_dpmpp_2m_sde_heun         | scheduler=exponential brownian_noise solver_type=heun
DPM++ 2S a        | k_dpmpp_2s_a                | scheduler=karras uses_ensd second_order
DPM++ 3M SDE      | k_dpmpp_3m_sde              | scheduler=exponential discard_next_to_last_sigma brownian_noise
Euler a           | k_euler_a k_euler_ancestral | uses_ensd
Euler             | k_euler                     |
LMS               | k_lms                       |
Heun              | k_heun                      | second_order
DPM2              | k_dpm_2                     | scheduler=karras discard_next_to_last_sigma second_order
DPM2 a            | k_dpm_2_a                   | scheduler=karras discard_next_to_last_sigma uses_ensd second_order
DPM fast          | k_dpm_fast                  | uses_ensd
DPM adaptive      | k_dpm_ad                    | uses_ensd
Restart           | restart                     | scheduler=karras second_order
DDIM              | ddim                        |
DDIM CFG++        | ddim_cfgpp                  |
PLMS              | plms                        |
UniPC             | unipc                       |
LCM               | k_lcm                       |
"""  # noqa: E501
# name | label | aliases | default_rho | need_inner_model, as modules/sd_schedulers.py
_SCHEDULER_TABLE = """
automatic        | Automatic        |            | -1 |
uniform          | Uniform          |            | -1 | yes
karras           | Karras           |            |  7 |
exponential      | Exponential      |            | -1 |
polyexponential  | Polyexponential  |            |  1 |
sgm_uniform      | SGM Uniform      | SGMUniform | -1 | yes
kl_optimal       | KL Optimal       |            | -1 |
align_your_steps | Align Your Steps |            | -1 |
simple           | Simple           |            | -1 | yes
normal           | Normal           |            | -1 | yes
ddim             | DDIM             |            | -1 | yes
beta             | Beta             |            | -1 | yes
"""


def _table(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")] for line in text.strip().splitlines()]


def _flags(text: str) -> dict[str, str]:
    """'scheduler=karras second_order' -> {"scheduler": "karras", "second_order": "True"}"""
    return {
        key: value if sep else "True" for key, sep, value in (item.partition("=") for item in text.split())
    }


SAMPLERS = [(name, aliases.split(), _flags(options)) for name, aliases, options in _table(_SAMPLER_TABLE)]
SAMPLER_OPTIONS = {name: options for name, _, options in SAMPLERS}
TIMESTEP_SAMPLERS = {"DDIM", "DDIM CFG++", "PLMS", "UniPC"}  # they never consult a scheduler
SCHEDULERS: list[dict[str, Any]] = [
    {
        "name": name,
        "label": label,
        "aliases": aliases.split() or None,
        "default_rho": float(rho),
        "need_inner_model": bool(inner),
    }
    for name, label, aliases, rho, inner in _table(_SCHEDULER_TABLE)
]
SCHEDULER_LABELS = {
    scheduler[key]: scheduler["label"] for scheduler in SCHEDULERS for key in ("name", "label")
}
MODELS_DIR = "/stable-diffusion-webui/models"
MODELS = [
    {
        "title": f"{name}.safetensors [{sha[:10]}]",
        "model_name": name,
        "hash": sha[:10],
        "sha256": sha,
        "filename": f"{MODELS_DIR}/Stable-diffusion/{name}.safetensors",
        "config": None,
    }
    for name, sha in (
        ("v1-5-pruned-emaonly", "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"),
        ("sd_xl_base_1.0", "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b"),
    )
]
LORAS = [
    {
        "name": name,
        "alias": name,
        "path": f"{MODELS_DIR}/Lora/{name}.safetensors",
        "metadata": {
            "ss_network_module": "networks.lora",
            "ss_network_dim": dim,
            "ss_base_model_version": "sd_v1",
        },
    }
    for name, dim in (("add_detail", "32"), ("more_details", "16"), ("lcm-lora-sdv1-5", "64"))
]
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)[^>]*>")
# a few of A1111's ~400 options: those clients read, and those the stand-in honours
DEFAULT_OPTIONS: dict[str, Any] = {
    "sd_model_checkpoint": MODELS[0]["title"],
    "sd_checkpoint_hash": MODELS[0]["sha256"],
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "samples_format": "png",
    "samples_save": True,
    "grid_save": True,
    "enable_pnginfo": True,
    "face_restoration": False,
    "face_restoration_model": "CodeFormer",
    "tiling": False,
    "eta_noise_seed_delta": 0,
    "sd_lora": "None",
}


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    seconds_per_image: float = 0.25
    startup_delay: float = 0.0
    log_level: str = "warning"
    strict_samplers: bool = False
    fail_next: int = 0
    hang_next: int = 0
    crash_after: int | None = None


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionTxt2ImgProcessingAPI: its fields and defaults, nullable, extras ignored."""

    # A1111 runs pydantic v1, which turned numbers into strings for str fields
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool | None = False
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    force_task_id: str | None = None
    sampler_index: str = "Euler"
    script_name: str | None = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    infotext: str | None = None


class Faults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fail_next: int = 0
    fail_status: int = 500
    fail_error: str = "OutOfMemoryError"
    fail_message: str = "CUDA out of memory. Tried to allocate 2.00 GiB"
    hang_next: int = 0
    crash_next: bool = False
    crash_after: int | None = None

    def take(self) -> str | None:
        """The fault for the generation that starts now, counting it off."""
        if self.crash_after is not None:
            self.crash_after -= 1
            self.crash_next = self.crash_next or self.crash_after < 0
        if self.crash_next:
            return "crash"
        for kind in ("fail", "hang"):
            if getattr(self, f"{kind}_next") > 0:
                setattr(self, f"{kind}_next", getattr(self, f"{kind}_next") - 1)
                return kind
        return None


@dataclass
class Stats:
    started_at: float = field(default_factory=time.time)
    requests: int = 0
    images: int = 0
    busy_seconds: float = 0.0
    generations: deque[tuple[float, float, int]] = field(default_factory=lambda: deque(maxlen=100_000))
    received: deque[Any] = field(default_factory=lambda: deque(maxlen=1000))


@dataclass
class State:
    """A1111's shared.state as /sdapi/v1/progress shows it; one job at a time, like A1111."""

    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    time_start: float = 0.0
    batch_started: float = 0.0
    batch_seconds: float | None = None
    task_id: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def begin(self, task_id: str, n_iter: int, steps: int) -> None:
        self.skipped = self.interrupted = False
        self.job, self.job_count, self.job_no, self.task_id = "scripts_txt2img", n_iter, 0, task_id
        self.job_timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
        self.time_start, self.sampling_step, self.sampling_steps = time.time(), 0, steps

    def end(self) -> None:
        self.job, self.job_count, self.task_id = "", 0, None

    async def run_batch(self, n: int, seconds: float | None) -> None:
        """Sleep through one batch, ended early by /interrupt or /skip (which set ``wake``)."""
        self.skipped, self.job_no, self.sampling_step = False, n, 0
        if self.job_count > 1:
            self.job = f"Batch {n + 1} out of {self.job_count}"
        self.batch_started, self.batch_seconds = time.time(), seconds
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)
        self.job_no = n + 1

    def as_dict(self) -> dict[str, Any]:
        if self.job_count and self.batch_seconds:
            done = (time.time() - self.batch_started) / self.batch_seconds
            self.sampling_step = min(self.sampling_steps, int(done * self.sampling_steps))
        keys = (
            "skipped",
            "interrupted",
            "job",
            "job_count",
            "job_timestamp",
            "job_no",
            "sampling_step",
            "sampling_steps",
        )
        return {"stopping_generation": False, **{key: getattr(self, key) for key in keys}}


def a1111_error(status: int, error: str, detail: str = "", errors: str = "") -> JSONResponse:
    """The body A1111's api_middleware builds from an exception that escapes an endpoint.

    ``errors`` is ``str(exception)``: empty for an HTTPException under A1111's pinned Starlette 0.26.
    """
    return JSONResponse({"error": error, "detail": detail, "body": "", "errors": errors}, status_code=status)


def resolve_sampler(
    name: str | None, scheduler: str | None, convert_automatic: bool = True
) -> tuple[str, str, bool]:
    """sd_samplers.get_sampler_and_scheduler: (sampler, scheduler label, whether the name was known)."""
    label = SCHEDULER_LABELS.get(scheduler or "", "Automatic")
    name = name or SAMPLERS[0][0]
    for scheduler_item in SCHEDULERS:
        for suffix in (scheduler_item["label"], scheduler_item["name"], *(scheduler_item["aliases"] or [])):
            if name.endswith(" " + suffix):  # "DPM++ 2M Karras" is sampler + scheduler since 1.9
                label, name = scheduler_item["label"], name[: -len(suffix) - 1]
                break
    known = name in SAMPLER_OPTIONS
    sampler = name if known else SAMPLERS[0][0]
    default = SAMPLER_OPTIONS[sampler].get("scheduler")
    if convert_automatic and default and SCHEDULER_LABELS[default] == label:
        label = "Automatic"
    return sampler, label, known


def fixed_seed(seed: int | None) -> int:
    """processing.get_fixed_seed: -1 (or nothing) means a random seed."""
    return random.randrange(4294967294) if seed is None or seed == -1 else seed


def find_checkpoint(alias: Any) -> dict[str, Any] | None:
    for model in MODELS:
        filename = str(model["filename"]).rsplit("/", 1)[-1]
        if alias in (model["title"], model["model_name"], model["hash"], model["sha256"], filename):
            return model
    return None


def quote(value: Any) -> Any:
    """infotext_utils.quote: values with separators in them are written as JSON strings."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else value


@dataclass
class Plan:
    """One txt2img job as process_images resolves it: what the infotexts and the info JSON report."""

    req: Txt2ImgRequest
    sampler: str
    scheduler: str
    model: dict[str, Any]
    clip_skip: int
    seeds: list[int]
    subseeds: list[int]
    size: tuple[int, int]
    extra: dict[str, Any]
    parameters: dict[str, Any]  # the request as sent, with defaults: A1111 echoes vars(request)
    job_timestamp: str = "0"

    def infotext(self, i: int) -> str:
        req, strength = self.req, self.req.subseed_strength or 0
        resize = (req.seed_resize_from_w or 0, req.seed_resize_from_h or 0)
        params: dict[str, Any] = {
            "Steps": req.steps,
            "Sampler": self.sampler,
            "Schedule type": self.scheduler,
            "CFG scale": req.cfg_scale,
            "Seed": self.seeds[i],
            "Face restoration": "CodeFormer" if req.restore_faces else None,
            "Size": f"{req.width}x{req.height}",
            "Model hash": self.model["hash"],
            "Model": self.model["model_name"],
            "Variation seed": self.subseeds[i] if strength else None,
            "Variation seed strength": strength or None,
            "Seed resize from": f"{resize[0]}x{resize[1]}" if min(resize) > 0 else None,
            "Denoising strength": self.extra.get("Denoising strength"),
            "Clip skip": self.clip_skip if self.clip_skip > 1 else None,
            "Tiling": "True" if req.tiling else None,
            **self.extra,
            "Version": VERSION,
        }
        text = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
        negative = f"\nNegative prompt: {req.negative_prompt}" if req.negative_prompt else ""
        return f"{req.prompt}{negative}\n{text}".strip()

    def info(self, infotexts: list[str]) -> str:
        req, count = self.req, len(self.seeds)
        obj = {
            "prompt": req.prompt,
            "all_prompts": [req.prompt] * count,
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * count,
            "seed": self.seeds[0],
            "all_seeds": self.seeds,
            "subseed": self.subseeds[0],
            "all_subseeds": self.subseeds,
            "subseed_strength": req.subseed_strength,
            "width": req.width,
            "height": req.height,
            "sampler_name": self.sampler,
            "cfg_scale": req.cfg_scale,
            "steps": req.steps,
            "batch_size": req.batch_size,
            "restore_faces": req.restore_faces,
            "face_restoration_model": "CodeFormer" if req.restore_faces else None,
            "sd_model_name": self.model["model_name"],
            "sd_model_hash": self.model["hash"],
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": req.seed_resize_from_w,
            "seed_resize_from_h": req.seed_resize_from_h,
            "denoising_strength": req.denoising_strength,
            "extra_generation_params": self.extra,
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": req.styles,
            "job_timestamp": self.job_timestamp,
            "clip_skip": self.clip_skip,
            "is_using_inpainting_conditioning": False,
            "version": VERSION,
        }
        return json.dumps(obj, default=lambda o: None)

    def response(self, pool: list[bytes], n_images: int) -> bytes:
        """The txt2img response body; runs in a worker thread since base64 and JSON of MBs take a while."""
        infotexts = [self.infotext(i) for i in range(max(1, n_images))]
        seeds = self.seeds[:n_images] if self.req.send_images else []
        images = [
            png_base64(pool[seed % len(pool)], "parameters", text)
            for seed, text in zip(seeds, infotexts, strict=False)
        ]
        body = {"images": images, "parameters": self.parameters, "info": self.info(infotexts)}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def output_size(req: Txt2ImgRequest) -> tuple[int, int]:
    """The size A1111 returns: the hires target if enabled, floored to the latent grid of 8 pixels."""
    width, height = max(8, req.width or 512), max(8, req.height or 512)
    if req.enable_hr:
        x, y = req.hr_resize_x or 0, req.hr_resize_y or 0
        scale = req.hr_scale or 2.0
        if x == 0 and y == 0:
            x, y = int(width * scale), int(height * scale)
        elif y == 0:
            y = x * height // width
        elif x == 0:
            x = y * width // height
        width, height = x, y
    return max(8, width // 8 * 8), max(8, height // 8 * 8)


def extra_params(req: Txt2ImgRequest, sampler: str, scheduler: str) -> dict[str, Any]:
    """What the sampler, the hires fix and the Lora extension add to p.extra_generation_params."""
    extra: dict[str, Any] = {}
    default = SAMPLER_OPTIONS[sampler].get("scheduler")
    effective = SCHEDULER_LABELS[default] if scheduler == "Automatic" and default else scheduler
    if effective != "Automatic" and sampler not in TIMESTEP_SAMPLERS:
        extra["Schedule type"] = effective
    if req.enable_hr:
        resize = (req.hr_resize_x or 0, req.hr_resize_y or 0)
        extra["Denoising strength"] = req.denoising_strength
        if resize == (0, 0):
            extra["Hires upscale"] = req.hr_scale
        else:
            extra["Hires resize"] = f"{resize[0]}x{resize[1]}"
        if req.hr_second_pass_steps:
            extra["Hires steps"] = req.hr_second_pass_steps
        extra["Hires upscaler"] = req.hr_upscaler
    loras = {name: lora_hash(name) for name in LORA_TAG.findall(req.prompt or "")}
    if any(loras.values()):
        extra["Lora hashes"] = ", ".join(f"{name}: {sha}" for name, sha in loras.items() if sha)
    return extra


def lora_hash(name: str) -> str | None:
    """The short hash of a known LoRA (made up, stable), or None for a LoRA the node does not have."""
    found = any(name in (lora["name"], lora["alias"]) for lora in LORAS)
    return hashlib.sha256(name.encode()).hexdigest()[:12] if found else None


class StandIn:
    """The server's state: A1111's queue lock, shared.state and options, plus the stand-in's knobs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lock = asyncio.Lock()  # A1111's queue_lock; asyncio.Lock wakes its waiters in FIFO order
        self.state = State()
        self.options = dict(DEFAULT_OPTIONS)
        self.faults = Faults(
            fail_next=settings.fail_next, hang_next=settings.hang_next, crash_after=settings.crash_after
        )
        self.stats = Stats()
        self.model_loaded_at = time.monotonic() + settings.startup_delay
        self.pngs = PngPool()

    def record(self, body: Any) -> None:
        self.stats.requests += 1
        self.stats.received.append(body)

    async def txt2img(self, req: Txt2ImgRequest) -> Response:
        sampler, scheduler, known = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
        if not known:
            if self.settings.strict_samplers:
                return a1111_error(404, "HTTPException", detail="Sampler not found")
            requested = req.sampler_name or req.sampler_index
            log.warning("Unknown sampler %r: running %r instead, as A1111 1.10 does", requested, sampler)
        missing = [name for name in LORA_TAG.findall(req.prompt or "") if lora_hash(name) is None]
        if missing:
            log.warning("Lora not found: %s", ", ".join(missing))
        async with self.lock:
            # the model loads in a background thread; txt2img blocks on it inside the queue lock
            await asyncio.sleep(self.model_loaded_at - time.monotonic())
            plan = self.plan(req, sampler, scheduler)
            outcome = await self.generate(plan)
        if isinstance(outcome, Response):
            return outcome
        pool = await self.pngs.get(*plan.size) if req.send_images and outcome else []
        body = await asyncio.to_thread(plan.response, pool, outcome)
        return Response(body, media_type="application/json")

    def plan(self, req: Txt2ImgRequest, sampler: str, scheduler: str) -> Plan:
        """Fix the seeds, the model and the settings as process_images does, under the queue lock."""
        overrides = dict(req.override_settings or {})
        if find_checkpoint(overrides.get("sd_model_checkpoint")) is None:
            overrides.pop("sd_model_checkpoint", None)
        # samples_format jpg/webp is honoured by the real server; the stand-in always answers PNG
        options = {**self.options, **overrides}
        if req.override_settings_restore_afterwards is False:
            self.options = options
        model = find_checkpoint(options["sd_model_checkpoint"]) or MODELS[0]
        parameters = req.model_dump()
        req = req.model_copy(update=self.resolved_fields(req, options))
        # the API keeps the sampler's default scheduler implicit; process_images then spells it out
        _, scheduler, _ = resolve_sampler(sampler, req.scheduler or scheduler, convert_automatic=False)
        count = (req.batch_size or 1) * (req.n_iter or 1)
        seed, subseed = fixed_seed(req.seed), fixed_seed(req.subseed)
        step = 0 if req.subseed_strength else 1  # variations share the seed and vary the subseed
        return Plan(
            req=req,
            sampler=sampler,
            scheduler=scheduler,
            model=model,
            clip_skip=int(options.get("CLIP_stop_at_last_layers") or 1),
            seeds=[seed + i * step for i in range(count)],
            subseeds=[subseed + i for i in range(count)],
            size=output_size(req),
            extra=extra_params(req, sampler, scheduler),
            parameters=parameters,
        )

    @staticmethod
    def resolved_fields(req: Txt2ImgRequest, options: dict[str, Any]) -> dict[str, Any]:
        """Nulls and out-of-range numbers the stand-in settles instead of failing like A1111 would."""
        return {
            "prompt": req.prompt or "",
            "negative_prompt": req.negative_prompt or "",
            "styles": req.styles or [],
            "batch_size": max(1, req.batch_size or 1),
            "n_iter": max(1, req.n_iter or 1),
            "steps": req.steps or 50,
            "cfg_scale": 7.0 if req.cfg_scale is None else req.cfg_scale,
            "width": max(8, req.width or 512),
            "height": max(8, req.height or 512),
            "restore_faces": bool(
                options["face_restoration"] if req.restore_faces is None else req.restore_faces
            ),
            "tiling": bool(options["tiling"] if req.tiling is None else req.tiling),
        }

    async def generate(self, plan: Plan) -> int | Response:
        """Hold the GPU: the number of images made, or the error of an injected failure."""
        batch, n_iter = plan.req.batch_size or 1, plan.req.n_iter or 1
        task_id = plan.req.force_task_id or f"task(txt2img-{''.join(random.choices(string.digits, k=7))})"
        self.state.begin(task_id, n_iter, plan.req.steps or 50)
        plan.job_timestamp = self.state.job_timestamp
        fault, started, made = self.faults.take(), time.time(), 0
        try:
            if fault == "crash":
                log.error("crash fault: exiting in the middle of a generation")
                os._exit(1)
            if fault == "fail":
                await asyncio.sleep(min(0.05, self.settings.seconds_per_image))
                return self.failure()
            seconds = None if fault == "hang" else self.settings.seconds_per_image * batch
            for n in range(n_iter):
                if self.state.interrupted:
                    break
                await self.state.run_batch(n, seconds)
                made += batch
            return made
        finally:
            self.state.end()
            self.stats.images += made
            self.stats.busy_seconds += time.time() - started
            self.stats.generations.append((started, time.time(), made))

    def failure(self) -> JSONResponse:
        f = self.faults
        if f.fail_error == "HTTPException":  # A1111 reports an HTTPException's text as "detail"
            return a1111_error(f.fail_status, f.fail_error, detail=f.fail_message)
        return a1111_error(f.fail_status, f.fail_error, errors=f.fail_message)

    def interrupt(self, skip: bool = False) -> None:
        """shared.state.interrupt() / skip(): ends the running batch; the next job's begin() clears it."""
        if skip:
            self.state.skipped = True
        else:
            self.state.interrupted = True
        self.state.wake.set()

    def progress(self) -> dict[str, Any]:
        """Modules/api progressapi: an estimate from the job and the sampling step."""
        state = self.state.as_dict()
        body = {
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": state,
            "current_image": None,
            "textinfo": None,
            "current_task": self.state.task_id,
        }
        if self.state.job_count:
            done = state["job_no"] + state["sampling_step"] / max(1, state["sampling_steps"])
            progress = 0.01 + done / self.state.job_count
            elapsed = time.time() - self.state.time_start
            body.update(progress=min(progress, 1.0), eta_relative=elapsed / progress - elapsed)
        return body

    def set_options(self, update: dict[str, Any]) -> Response | None:
        name = update.get("sd_model_checkpoint")
        if name is not None:
            model = find_checkpoint(name)
            if model is None:
                return a1111_error(500, "RuntimeError", errors=f"model {name!r} not found")
            update = {**update, "sd_model_checkpoint": model["title"], "sd_checkpoint_hash": model["sha256"]}
        self.options.update(update)
        return None

    def stats_body(self) -> dict[str, Any]:
        s = self.stats
        return {
            "requests": s.requests,
            "images": s.images,
            "busy_seconds": s.busy_seconds,
            "started_at": s.started_at,
            "generations": list(s.generations),
            "received": list(s.received),
        }

    def reset(self) -> None:
        self.stats = Stats(started_at=self.stats.started_at)
        self.faults = Faults()


def create_app(settings: Settings) -> FastAPI:
    standin = StandIn(settings)
    app = FastAPI(title="A1111 stand-in", version=VERSION)
    app.state.standin = standin

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        if request.url.path == TXT2IMG:
            standin.record(exc.body)
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        return a1111_error(500, type(exc).__name__, errors=str(exc))

    @app.post(TXT2IMG)
    async def txt2img(req: Txt2ImgRequest, request: Request) -> Response:
        standin.record(await request.json())
        return await standin.txt2img(req)

    add_a1111_routes(app, standin)
    add_standin_routes(app, standin)
    return app


def add_a1111_routes(app: FastAPI, standin: StandIn) -> None:
    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return standin.progress()

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict[str, Any]:
        standin.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip() -> None:
        standin.interrupt(skip=True)

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return [{"name": name, "aliases": aliases, "options": options} for name, aliases, options in SAMPLERS]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        return SCHEDULERS

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return MODELS

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict[str, Any]:
        return standin.options

    @app.post("/sdapi/v1/options", response_model=None)
    async def set_options(update: dict[str, Any]) -> Response | None:
        return standin.set_options(update)

    @app.get("/sdapi/v1/loras")
    async def loras() -> list[dict[str, Any]]:
        return LORAS

    @app.post("/sdapi/v1/refresh-loras")
    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh() -> None:
        return None


def add_standin_routes(app: FastAPI, standin: StandIn) -> None:
    @app.get("/standin/faults")
    async def get_faults() -> Faults:
        return standin.faults

    @app.post("/standin/faults")
    async def set_faults(update: Faults) -> Faults:
        standin.faults = standin.faults.model_copy(update=update.model_dump(exclude_unset=True))
        return standin.faults

    @app.get("/standin/stats")
    async def stats() -> dict[str, Any]:
        return standin.stats_body()

    @app.post("/standin/reset")
    async def reset() -> dict[str, Any]:
        standin.reset()
        return {}


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m a1111.standin", description="A1111 API stand-in")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--seconds-per-image", type=float, default=0.25, help="GPU time per image")
    parser.add_argument("--startup-delay", type=float, default=0.0, help="seconds until txt2img may start")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--strict-samplers", action="store_true", help="404 on unknown samplers (A1111 <= 1.8)"
    )
    parser.add_argument("--fail-next", type=int, default=0, help="fail the next N txt2img calls")
    parser.add_argument(
        "--hang-next", type=int, default=0, help="hang the next N txt2img calls until interrupted"
    )
    parser.add_argument("--crash-after", type=int, default=None, help="exit(1) on the (N+1)-th txt2img call")
    return Settings(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        http="httptools",
        access_log=False,
        log_level=settings.log_level,
        workers=1,
        timeout_graceful_shutdown=3,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
