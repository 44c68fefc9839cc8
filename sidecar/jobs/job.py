"""A valid job, and the txt2img request it becomes (legacy sampler names made canonical)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.jobs.spec import JobSpec

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
