"""A txt2img job as A1111 v1.10.1's process_images has resolved it (``a1111.resolve`` builds it), and
the answer it gives: the infotexts, the ``info`` JSON and the txt2img body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from a1111.assets import Checkpoint, Lora, Upscaler, Vae
from a1111.pngs import Canvas, Encoding, image_base64
from a1111.shapes import Txt2ImgRequest, quote
from a1111.tables import VERSION

_CALLABLES = {"Hires prompt", "Hires negative prompt"}


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
    lora_set: tuple[str, ...] = ()  # the found LoRAs' tags ("name:weight"): what is applied
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

    def response(self, canvases: list[Canvas], images: int, encoding: Encoding) -> bytes:
        """The txt2img body (runs in a worker thread: base64 and JSON of MBs take a while).

        ``canvases`` holds the pooled canvas chosen for each image made (their sizes may differ: an
        interrupt before the hires pass returns first-pass images); each is labelled with the prompt
        and its seed, and encoded as A1111's options say."""
        infotexts = [self.infotext(i) for i in range(max(1, images))]
        shown = [
            image_base64(canvas, encoding, (self.prompt, self.seeds[i]), text)
            for i, (canvas, text) in enumerate(zip(canvases, infotexts, strict=False))
        ]
        body = {"images": shown, "parameters": self.parameters, "info": self.info(infotexts)}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
