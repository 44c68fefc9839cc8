"""The job model: decoding, the allowlist, limits and legacy sampler names (pure, no I/O)."""

from __future__ import annotations

import base64
import json

import pytest

from sidecar.errors import InvalidJob
from sidecar.jobs import LEGACY_SAMPLERS, Limits, parse_job

GOOD = {
    "prompt": "a red bicycle <lora:add_detail:0.6>",
    "sampler_name": "k_euler_a",
    "steps": 15,
    "cfg_scale": 7,
}


def rejected(text: str, limits: Limits | None = None) -> InvalidJob:
    with pytest.raises(InvalidJob) as caught:
        parse_job(text, "msg-1", limits)
    return caught.value


def test_raw_and_base64_give_the_same_job() -> None:
    raw = json.dumps(GOOD)
    encoded = base64.b64encode(raw.encode()).decode()
    assert parse_job(raw, "m").txt2img_payload() == parse_job(encoded, "m").txt2img_payload()
    assert parse_job(encoded, "m").received == GOOD


def test_job_id_defaults_to_the_message_id() -> None:
    assert parse_job(json.dumps(GOOD), "abc-123").id == "abc-123"
    assert parse_job(json.dumps({**GOOD, "id": "mine.1"}), "abc-123").id == "mine.1"


@pytest.mark.parametrize(
    ("legacy", "canonical", "scheduler"),
    [
        ("k_euler_a", "Euler a", None),
        ("k_euler", "Euler", None),
        ("k_lms", "LMS", None),
        ("k_heun", "Heun", None),
        ("k_dpm_2", "DPM2", None),
        ("k_dpm_2_a", "DPM2 a", None),
        ("k_dpmpp_2m", "DPM++ 2M", None),
        ("k_dpmpp_2s_a", "DPM++ 2S a", None),
        ("k_dpmpp_sde", "DPM++ SDE", None),
        ("k_dpm_fast", "DPM fast", None),
        ("k_dpm_ad", "DPM adaptive", None),
        ("k_dpmpp_2m_ka", "DPM++ 2M", "Karras"),
        ("k_lms_ka", "LMS", "Karras"),
    ],
)
def test_legacy_sampler_names_map_to_canonical(legacy: str, canonical: str, scheduler: str | None) -> None:
    payload = parse_job(json.dumps({"prompt": "x", "sampler_name": legacy}), "m").txt2img_payload()
    assert payload["sampler_name"] == canonical
    assert payload.get("scheduler") == scheduler


def test_canonical_names_and_explicit_scheduler_are_kept() -> None:
    payload = parse_job(
        json.dumps({"prompt": "x", "sampler_name": "DPM++ 2M", "scheduler": "Exponential"}), "m"
    )
    assert payload.txt2img_payload()["sampler_name"] == "DPM++ 2M"
    assert payload.txt2img_payload()["scheduler"] == "Exponential"
    kept = parse_job(
        json.dumps({"prompt": "x", "sampler_name": "k_dpmpp_2m_ka", "scheduler": "Uniform"}), "m"
    )
    assert kept.txt2img_payload()["scheduler"] == "Uniform"
    assert all(name.startswith(("k_", "ddim", "plms", "unipc")) for name in LEGACY_SAMPLERS)


def test_payload_never_saves_on_the_node() -> None:
    payload = parse_job(json.dumps(GOOD), "m").txt2img_payload()
    assert payload["save_images"] is False and payload["send_images"] is True
    assert "id" not in payload


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ("not json", "message"),
        ("{", "message"),
        ("[1, 2]", "message"),
        (base64.b64encode(b"hello").decode(), "message"),
        (json.dumps({"steps": 15}), "prompt"),
        (json.dumps({**GOOD, "colour": "red"}), "colour"),
        (json.dumps({**GOOD, "script_name": "x"}), "script_name"),
        (json.dumps({**GOOD, "script_args": [1]}), "script_args"),
        (json.dumps({**GOOD, "alwayson_scripts": {}}), "alwayson_scripts"),
        (json.dumps({**GOOD, "save_images": True}), "save_images"),
        (
            json.dumps({**GOOD, "override_settings": {"outdir_samples": "/tmp"}}),
            "override_settings.outdir_samples",
        ),
        (
            json.dumps({**GOOD, "override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}),
            "override_settings.sd_model_checkpoint",
        ),
        (json.dumps({**GOOD, "steps": "15"}), "steps"),
        (json.dumps({**GOOD, "steps": 151}), "steps"),
        (json.dumps({**GOOD, "steps": 0}), "steps"),
        (json.dumps({**GOOD, "cfg_scale": True}), "cfg_scale"),
        (json.dumps({**GOOD, "width": 513}), "width"),
        (json.dumps({**GOOD, "width": 4096}), "width"),
        (json.dumps({**GOOD, "height": 32}), "height"),
        (json.dumps({**GOOD, "batch_size": 4, "n_iter": 3}), "batch_size"),
        (json.dumps({**GOOD, "seed": 2**40}), "seed"),
        (json.dumps({**GOOD, "id": "../x"}), "id"),
        (json.dumps({**GOOD, "id": "a/b"}), "id"),
        (json.dumps({**GOOD, "id": ".."}), "id"),
        (json.dumps({**GOOD, "id": "x" * 129}), "id"),
        (json.dumps({**GOOD, "prompt": "a\x00b"}), "prompt"),
        (json.dumps({**GOOD, "prompt": {"nested": "object"}}), "prompt"),
        (json.dumps({**GOOD, "styles": ["../style"]}), "styles.0"),
        (json.dumps({**GOOD, "prompt": "x" * 70_000}), "message"),
    ],
)
def test_bad_jobs_are_refused_naming_the_field(message: str, field: str) -> None:
    error = rejected(message)
    assert error.field == field
    assert str(error).startswith(f"{field}:") and error.reason


def test_limits_are_configurable() -> None:
    tight = Limits(max_width=512, max_height=512, max_steps=20, max_images=1)
    assert rejected(json.dumps({**GOOD, "width": 768}), tight).field == "width"
    assert rejected(json.dumps({**GOOD, "steps": 30}), tight).field == "steps"
    assert rejected(json.dumps({**GOOD, "batch_size": 2}), tight).field == "batch_size"
    assert parse_job(json.dumps({**GOOD, "width": 512}), "m", tight).spec.width == 512


def test_odd_unicode_in_prompts_is_fine() -> None:
    text = "un chat 猫 🐈 عربى \u200d\u0301 naïve\nsecond line\ttab"
    assert parse_job(json.dumps({"prompt": text}), "m").txt2img_payload()["prompt"] == text
