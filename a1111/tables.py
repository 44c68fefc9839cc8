"""What A1111 v1.10.1 has built in, whatever is on disk: samplers, schedulers, latent upscale modes and the
upscalers of a fresh install, and how the API resolves a sampler name.

The sampler and scheduler tables are the recorded ``/sdapi/v1/samplers`` and ``/sdapi/v1/schedulers``
answers (tests/data/a1111-v1.10.1/observations/01-, 02-), in A1111's order.
"""

from __future__ import annotations

from typing import Any

VERSION = "v1.10.1"
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
# sd_schedulers.schedulers_map: names and labels, not aliases (those only work as a sampler-name suffix)
SCHEDULER_LABELS = {
    scheduler[key]: scheduler["label"] for scheduler in SCHEDULERS for key in ("name", "label")
}
# shared.latent_upscale_modes: hr_upscaler values that upscale the latent, not listed in /upscalers
LATENT_UPSCALE_MODES = [
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
]
# Upscalers without weights: UpscalerNone, UpscalerLanczos, UpscalerNearest (scale 4, no model).
BUILTIN_UPSCALERS = ["None", "Lanczos", "Nearest"]
# What a fresh install lists with no weights on disk: each points at the URL its weights are
# downloaded from on first use (name, model_name, URL).
_KAIR = "https://github.com/cszn/KAIR/releases/download/v1.0"
_REALESRGAN = "https://github.com/xinntao/Real-ESRGAN/releases/download"
_DAT = "https://github.com/zhengchen1999/DAT/releases/download/v1.0"
DOWNLOADABLE_UPSCALERS: list[tuple[str, str | None, str]] = [
    ("DAT x2", None, f"{_DAT}/DAT_x2.pth"),
    ("DAT x3", None, f"{_DAT}/DAT_x3.pth"),
    ("DAT x4", None, f"{_DAT}/DAT_x4.pth"),
    ("ESRGAN_4x", "ESRGAN_4x", f"{_KAIR}/ESRGAN.pth"),
    ("R-ESRGAN 4x+", None, f"{_REALESRGAN}/v0.1.0/RealESRGAN_x4plus.pth"),
    ("R-ESRGAN 4x+ Anime6B", None, f"{_REALESRGAN}/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth"),
    ("ScuNET GAN", None, f"{_KAIR}/scunet_color_real_gan.pth"),
    ("ScuNET PSNR", None, f"{_KAIR}/scunet_color_real_psnr.pth"),
    ("SwinIR 4x", None, "https://github.com/JingyunLiang/SwinIR/releases/download/v0.0/SwinIR_4x.pth"),
]


def resolve_sampler(
    name: str | None, scheduler: str | None, convert_automatic: bool = True
) -> tuple[str, str, bool]:
    """sd_samplers.get_sampler_and_scheduler: (sampler, scheduler label, whether the name was known).

    Names only, never aliases: the recording shows "k_euler_a" running "DPM++ 2M". A scheduler may
    be glued to the name ("DPM++ 2M Karras", by label, name or alias) since 1.9.
    """
    label = SCHEDULER_LABELS.get(scheduler or "", "Automatic")
    name = name or SAMPLERS[0][0]
    for scheduler_item in SCHEDULERS:
        for suffix in (scheduler_item["label"], scheduler_item["name"], *(scheduler_item["aliases"] or [])):
            if name.endswith(" " + suffix):
                label, name = scheduler_item["label"], name[: -len(suffix) - 1]
                break
    known = name in SAMPLER_OPTIONS
    sampler = name if known else SAMPLERS[0][0]
    default = SAMPLER_OPTIONS[sampler].get("scheduler")
    if convert_automatic and default and SCHEDULER_LABELS[default] == label:
        label = "Automatic"
    return sampler, label, known


def samplers_body() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": aliases, "options": options} for name, aliases, options in SAMPLERS]
