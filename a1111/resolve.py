"""One txt2img job as A1111 v1.10.1's process_images resolves it: which model, VAE, LoRAs, styles and
sizes apply, the silent fallbacks and the exceptions (answered 500).

Silent, as recorded: an unknown sampler runs "DPM++ 2M"; a missing LoRA is skipped; an unknown
``override_settings.sd_model_checkpoint`` runs the loaded model; an unknown VAE or style is ignored.
Exceptions, as in A1111's source: an unknown key in ``override_settings`` (KeyError); with
``enable_hr``, an unknown ``hr_checkpoint_name`` or ``hr_upscaler`` (Exception) and an unknown
``hr_sampler_name`` (AssertionError, only after the first pass).
"""

from __future__ import annotations

import random
import re
from typing import Any

from a1111.assets import AssetStore, Checkpoint, Lora, Style, Vae
from a1111.plan import Plan
from a1111.shapes import A1111Failure, Txt2ImgRequest, merge_style
from a1111.tables import (
    LATENT_UPSCALE_MODES,
    SAMPLER_OPTIONS,
    SCHEDULER_LABELS,
    TIMESTEP_SAMPLERS,
    resolve_sampler,
)

# extra_networks.re_extra_net; the Lora extension answers to "lora" and its alias "lyco"
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def lora_names(prompt: str) -> list[str]:
    """The LoRA names a prompt mentions, in order: the first ':'-separated item of each tag."""
    return [args.split(":")[0] for kind, args in EXTRA_NETWORK.findall(prompt) if kind in ("lora", "lyco")]


def lora_tags(prompt: str) -> list[tuple[str, str]]:
    """(name, the tag's arguments) of each LoRA tag: the name and the weights, as the Lora extension
    compares what it has applied with what a job wants."""
    return [
        (args.split(":")[0], args.strip())
        for kind, args in EXTRA_NETWORK.findall(prompt)
        if kind in ("lora", "lyco")
    ]


def fixed_seed(seed: int | None) -> int:
    """processing.get_fixed_seed: -1 (or nothing) means a random seed."""
    return random.randrange(4294967294) if seed is None or seed == -1 else seed


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
    found = {name for lora in plan.loras for name in (lora.name, lora.alias) if name}
    plan.lora_set = tuple(sorted({args for name, args in lora_tags(prompt) if name in found}))
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
