"""One txt2img job as A1111 v1.10.1's process_images resolves it, and the answer it gives: which model,
VAE, LoRAs, styles and sizes apply, the silent fallbacks, the exceptions (answered 500), the
infotexts and the ``info`` JSON.

Silent, as recorded: an unknown sampler runs "DPM++ 2M"; a missing LoRA is skipped; an unknown
``override_settings.sd_model_checkpoint`` runs the loaded model; an unknown VAE or style is ignored.
Exceptions, as in A1111's source: an unknown key in ``override_settings`` (KeyError); with
``enable_hr``, an unknown ``hr_checkpoint_name`` or ``hr_upscaler`` (Exception) and an unknown
``hr_sampler_name`` (AssertionError, only after the first pass).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from a1111.assets import AssetStore, Checkpoint, Lora, Style, Upscaler, Vae
from a1111.pngs import png_base64
from a1111.shapes import A1111Failure, Txt2ImgRequest, merge_style, quote
from a1111.tables import (
    LATENT_UPSCALE_MODES,
    SAMPLER_OPTIONS,
    SCHEDULER_LABELS,
    TIMESTEP_SAMPLERS,
    VERSION,
    resolve_sampler,
)

# extra_networks.re_extra_net; the Lora extension answers to "lora" and its alias "lyco"
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_CALLABLES = {"Hires prompt", "Hires negative prompt"}


def lora_names(prompt: str) -> list[str]:
    """The LoRA names a prompt mentions, in order: the first ':'-separated item of each tag."""
    return [args.split(":")[0] for kind, args in EXTRA_NETWORK.findall(prompt) if kind in ("lora", "lyco")]


def fixed_seed(seed: int | None) -> int:
    """processing.get_fixed_seed: -1 (or nothing) means a random seed."""
    return random.randrange(4294967294) if seed is None or seed == -1 else seed


@dataclass
class Plan:
    req: Txt2ImgRequest  # nulls settled
    parameters: dict[str, Any]  # the request as sent, with defaults: A1111 echoes vars(request)
    sampler: str
    scheduler: str  # the label process_images reports before the sampler spells out its default
    model: Checkpoint
    vae: Vae | None
    clip_skip: int
    seeds: list[int]
    subseeds: list[int]
    prompt: str  # with the styles applied: what info.prompt and the infotexts show
    negative: str
    size: tuple[int, int]  # first pass, on the latent grid
    hires_size: tuple[int, int] | None
    face_model: str
    loras: list[Lora] = field(default_factory=list)
    missing_loras: list[str] = field(default_factory=list)
    hr_model: Checkpoint | None = None
    hr_upscaler: Upscaler | None = None
    hr_sampler_error: str | None = None  # create_sampler's assertion, raised at the hires pass
    extra: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # the override_settings that apply
    job_timestamp: str = "0"

    @property
    def steps(self) -> int:
        return self.req.steps or 50

    @property
    def hr_steps(self) -> int:
        return self.req.hr_second_pass_steps or self.steps

    def infotext(self, i: int) -> str:
        req, strength = self.req, self.req.subseed_strength or 0
        resize = (req.seed_resize_from_w or 0, req.seed_resize_from_h or 0)
        params: dict[str, Any] = {
            "Steps": req.steps,
            "Sampler": self.sampler,
            "Schedule type": self.scheduler,
            "CFG scale": req.cfg_scale,
            "Seed": self.seeds[i],
            "Face restoration": self.face_model if req.restore_faces else None,
            "Size": f"{req.width}x{req.height}",
            "Model hash": self.model.shorthash,
            "Model": self.model.name_for_extra,
            "VAE hash": self.vae.sha256[:10] if self.vae and self.vae.sha256 else None,
            "VAE": self.vae.name if self.vae else None,
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
        negative = f"\nNegative prompt: {self.negative}" if self.negative else ""
        return f"{self.prompt}{negative}\n{text}".strip()

    def info(self, infotexts: list[str]) -> str:
        req, count = self.req, len(self.seeds)
        obj = {
            "prompt": self.prompt,
            "all_prompts": [self.prompt] * count,
            "negative_prompt": self.negative,
            "all_negative_prompts": [self.negative] * count,
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
            "face_restoration_model": self.face_model if req.restore_faces else None,
            "sd_model_name": self.model.name_for_extra,
            "sd_model_hash": self.model.shorthash,
            "sd_vae_name": self.vae.name if self.vae else None,
            "sd_vae_hash": self.vae.sha256[:10] if self.vae and self.vae.sha256 else None,
            "seed_resize_from_w": req.seed_resize_from_w,
            "seed_resize_from_h": req.seed_resize_from_h,
            "denoising_strength": req.denoising_strength,
            # the hires prompts are callables in A1111's dict: json.dumps writes them as null
            "extra_generation_params": {k: None if k in _CALLABLES else v for k, v in self.extra.items()},
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": req.styles,
            "job_timestamp": self.job_timestamp,
            "clip_skip": self.clip_skip,
            "is_using_inpainting_conditioning": False,
            "version": VERSION,
        }
        return json.dumps(obj, default=lambda o: None)

    def response(self, pngs: list[bytes], images: int) -> bytes:
        """The txt2img body (runs in a worker thread: base64 and JSON of MBs take a while).

        ``pngs`` holds the pooled PNG chosen for each image made (their sizes may differ: an interrupt
        before the hires pass returns first-pass images)."""
        infotexts = [self.infotext(i) for i in range(max(1, images))]
        shown = [png_base64(png, "parameters", text) for png, text in zip(pngs, infotexts, strict=False)]
        body = {"images": shown, "parameters": self.parameters, "info": self.info(infotexts)}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def hires_target(req: Txt2ImgRequest) -> tuple[int, int]:
    """StableDiffusionProcessingTxt2Img.calculate_target_resolution, then the truncation to the target."""
    width, height = req.width or 512, req.height or 512
    rx, ry = req.hr_resize_x or 0, req.hr_resize_y or 0
    if rx == 0 and ry == 0:
        scale = 2.0 if req.hr_scale is None else req.hr_scale
        return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8
    if ry == 0:
        return rx // 8 * 8, rx * height // width // 8 * 8
    if rx == 0:
        return ry * width // height // 8 * 8, ry // 8 * 8
    ux, uy = (rx, rx * height // width) if width / height < rx / ry else (ry * width // height, ry)
    return (ux // 8 - (ux - rx) // 8) * 8, (uy // 8 - (uy - ry) // 8) * 8


def build_plan(req: Txt2ImgRequest, assets: AssetStore, options: dict[str, Any], sampler: str) -> Plan:
    """process_images up to the first batch; raises A1111Failure where A1111 raises."""
    overrides = dict(req.override_settings or {})
    if assets.checkpoint(overrides.get("sd_model_checkpoint")) is None:
        overrides.pop("sd_model_checkpoint", None)  # silently: the loaded model runs
    for key in overrides:
        if key not in options:
            raise A1111Failure("KeyError", repr(key))  # opts.set() of an option that does not exist
    opts = {**options, **overrides}
    listed = [a for a in assets.listed["checkpoint"].values() if isinstance(a, Checkpoint)]
    model = assets.checkpoint(opts["sd_model_checkpoint"]) or (listed[0] if listed else None)
    if model is None:
        raise A1111Failure("FileNotFoundError", "No checkpoints found.")
    parameters = req.model_dump()
    # the API keeps the sampler's default scheduler implicit; process_images then spells it out
    _, scheduler, _ = resolve_sampler(sampler, req.scheduler, convert_automatic=False)
    req = req.model_copy(update=_settled(req, opts))
    if req.refiner_checkpoint not in (None, "", "None", "none"):
        if assets.closest_checkpoint(req.refiner_checkpoint) is None:
            raise A1111Failure("Exception", f"Could not find checkpoint with name {req.refiner_checkpoint}")
    styles = [assets.style(name) for name in req.styles or []]
    prompt = merge_all(req.prompt or "", styles, "prompt")
    negative = merge_all(req.negative_prompt or "", styles, "negative_prompt")
    count = (req.batch_size or 1) * (req.n_iter or 1)
    seed, subseed = fixed_seed(req.seed), fixed_seed(req.subseed)
    step = 0 if req.subseed_strength else 1  # variations share the seed and vary the subseed
    plan = Plan(
        req=req,
        parameters=parameters,
        sampler=sampler,
        scheduler=scheduler,
        model=model,
        vae=_vae(assets, opts.get("sd_vae")),
        clip_skip=int(opts.get("CLIP_stop_at_last_layers") or 1),
        seeds=[seed + i * step for i in range(count)],
        subseeds=[subseed + i for i in range(count)],
        prompt=prompt,
        negative=negative,
        size=((req.width or 512) // 8 * 8, (req.height or 512) // 8 * 8),
        hires_size=hires_target(req) if req.enable_hr else None,
        face_model=str(opts.get("face_restoration_model") or "CodeFormer"),
        overrides=overrides,
    )
    mentioned = lora_names(prompt)
    if req.enable_hr:
        hr_prompt = merge_all(req.hr_prompt or req.prompt or "", styles, "prompt")
        negative_source = req.hr_negative_prompt or req.negative_prompt or ""
        hr_negative = merge_all(negative_source, styles, "negative_prompt")
        _init_hires(plan, assets, hr_prompt, hr_negative)
        mentioned += lora_names(hr_prompt)
    for name in dict.fromkeys(mentioned):
        lora = assets.lora(name)  # a miss rescans the folder, as networks.load_networks does
        if lora is None:
            plan.missing_loras.append(name)
        else:
            plan.loras.append(lora)
    hashes = {lora_tag(lora, mentioned): lora.sha256[:12] for lora in plan.loras if lora.sha256}
    if hashes:
        plan.extra["Lora hashes"] = ", ".join(f"{name}: {sha}" for name, sha in hashes.items())
    _schedule_type(plan, sampler, scheduler, "Schedule type")
    return plan


def merge_all(prompt: str, styles: list[Style | None], which: str) -> str:
    """StyleDatabase.apply_styles_to_prompt (or _negative_): unknown style names are skipped."""
    for style in styles:
        if style is not None:
            prompt = merge_style(getattr(style, which), prompt)
    return prompt


def lora_tag(lora: Lora, mentioned: list[str]) -> str:
    """The name the prompt used for a LoRA (its file name or its alias), without ':' and ','."""
    name = next((m for m in mentioned if m in (lora.name, lora.alias)), lora.name)
    return name.replace(":", "").replace(",", "")


def _settled(req: Txt2ImgRequest, opts: dict[str, Any]) -> dict[str, Any]:
    """Nulls the stand-in settles (A1111 would fail on most of them), and what comes from the options."""
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
        "restore_faces": bool(opts["face_restoration"] if req.restore_faces is None else req.restore_faces),
        "tiling": bool(opts["tiling"] if req.tiling is None else req.tiling),
    }


def _vae(assets: AssetStore, name: Any) -> Vae | None:
    """sd_vae.resolve_vae: "Automatic" finds no VAE beside the checkpoint here; unknown names run None."""
    return assets.vae(name) if isinstance(name, str) and name not in ("Automatic", "None") else None


def _init_hires(plan: Plan, assets: AssetStore, hr_prompt: str, hr_negative: str) -> None:
    """StableDiffusionProcessingTxt2Img.init with enable_hr."""
    req, extra = plan.req, plan.extra
    extra["Denoising strength"] = req.denoising_strength
    if req.hr_checkpoint_name and req.hr_checkpoint_name != "Use same checkpoint":
        plan.hr_model = assets.closest_checkpoint(req.hr_checkpoint_name)
        if plan.hr_model is None:
            raise A1111Failure("Exception", f"Could not find checkpoint with name {req.hr_checkpoint_name}")
        extra["Hires checkpoint"] = f"{plan.hr_model.name_for_extra} [{plan.hr_model.shorthash}]"
    if req.hr_sampler_name is not None and req.hr_sampler_name != plan.sampler:
        extra["Hires sampler"] = req.hr_sampler_name
    extra["Hires prompt"] = hr_prompt if hr_prompt != plan.prompt else None
    extra["Hires negative prompt"] = hr_negative if hr_negative != plan.negative else None
    extra["Hires schedule type"] = None
    upscaler = req.hr_upscaler
    if upscaler is not None and upscaler not in LATENT_UPSCALE_MODES:
        plan.hr_upscaler = assets.upscaler(upscaler)
        if plan.hr_upscaler is None:
            raise A1111Failure("Exception", f"could not find upscaler named {upscaler}")
    rx, ry = req.hr_resize_x or 0, req.hr_resize_y or 0
    if rx == 0 and ry == 0:
        extra["Hires upscale"] = req.hr_scale
    else:
        extra["Hires resize"] = f"{rx}x{ry}"
    if req.hr_second_pass_steps:
        extra["Hires steps"] = req.hr_second_pass_steps
    if upscaler is not None:
        extra["Hires upscaler"] = upscaler
    hr_sampler = req.hr_sampler_name or plan.sampler
    if hr_sampler not in SAMPLER_OPTIONS:
        plan.hr_sampler_error = f"bad sampler name: {hr_sampler}"
        return
    hr_scheduler = SCHEDULER_LABELS.get(req.hr_scheduler or "", plan.scheduler)
    _schedule_type(plan, hr_sampler, hr_scheduler, "Hires schedule type")


def _schedule_type(plan: Plan, sampler: str, scheduler: str, key: str) -> None:
    """KDiffusionSampler.get_sigmas: "Automatic" is the sampler's default schedule, spelled out."""
    default = SAMPLER_OPTIONS[sampler].get("scheduler")
    effective = SCHEDULER_LABELS[default] if scheduler == "Automatic" and default else scheduler
    if effective != "Automatic" and sampler not in TIMESTEP_SAMPLERS:
        plan.extra[key] = effective
