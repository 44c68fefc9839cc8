"""Property tests: no id or name with a control character, a trailing newline or a look-alike dot or
slash is accepted, whatever surrounds it; the reasons name the real problem."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import InvalidJob
from sidecar.jobs import parse_job

C0 = [chr(code) for code in range(0x00, 0x20)]
C1 = [chr(code) for code in range(0x7F, 0xA0)]
# Characters whose compatibility form (NFKC) is a dot pair or a path separator.
LOOK_ALIKES = ["\u2025", "\uff0e\uff0e", "\ufe52\ufe52", "\u2024\u2024", "\uff0f", "\uff3c", "..", "/", "\\"]
SAFE = st.text(st.characters(whitelist_categories=("L", "N"), max_codepoint=0x2FFF), min_size=0, max_size=12)
NOT_A_NAME = "must be a name, not a path (no '/', '\\', '..' or control characters)"
NOT_A_LOOK_ALIKE = "must be a name, not a path (no '/', '\\', '..' or look-alikes of them)"
NAME_FIELDS = [
    "sampler_name",
    "scheduler",
    "hr_upscaler",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
]


def _refused(body: dict[str, object]) -> InvalidJob:
    with pytest.raises(InvalidJob) as refused:
        parse_job(json.dumps(body), "message-id")
    return refused.value


@settings(max_examples=300, deadline=None)
@given(
    before=SAFE,
    after=SAFE,
    bad=st.sampled_from(C0 + C1 + LOOK_ALIKES),
    field=st.sampled_from([*NAME_FIELDS, "styles", "sd_model_checkpoint", "sd_vae"]),
)
def test_no_name_with_a_control_character_or_a_look_alike_path_is_accepted(
    before: str, after: str, bad: str, field: str
) -> None:
    name = before + bad + after
    body: dict[str, object] = {"prompt": "a cat"}
    if field == "styles":
        body["styles"] = ["fine", name]
    elif field in ("sd_model_checkpoint", "sd_vae"):
        body["override_settings"] = {field: name}
    else:
        body[field] = name
    error = _refused(body)
    # control characters and ASCII dots and slashes fail the name's pattern (a list's item is named);
    # look-alikes pass it and are caught once NFKC-folded (the whole list is named)
    by_pattern = bad in C0 + C1 or bad in ("..", "/", "\\")
    if field == "styles":
        expected = "styles.1" if by_pattern else "styles"
    elif field in ("sd_model_checkpoint", "sd_vae"):
        expected = f"override_settings.{field}"
    else:
        expected = field
    assert error.field == expected
    assert error.reason == (NOT_A_NAME if by_pattern else NOT_A_LOOK_ALIKE)


@settings(max_examples=200, deadline=None)
@given(name=SAFE.filter(bool), field=st.sampled_from(NAME_FIELDS))
def test_a_trailing_newline_is_refused_where_the_name_alone_is_accepted(name: str, field: str) -> None:
    parse_job(json.dumps({"prompt": "a cat", field: name}), "m")
    assert _refused({"prompt": "a cat", field: name + "\n"}).field == field


@settings(max_examples=300, deadline=None)
@given(
    stem=st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True),
    bad=st.sampled_from([*C0, *C1, "\u2025", "\uff0e", "/", "\\", " ", "\u00e9", "\u0430"]),
    at_end=st.booleans(),
)
def test_no_job_id_outside_the_id_alphabet_is_accepted(stem: str, bad: str, at_end: bool) -> None:
    job_id = stem + bad if at_end else bad + stem
    assert _refused({"id": job_id, "prompt": "a cat"}).field == "id"
    assert parse_job(json.dumps({"id": stem, "prompt": "a cat"}), "m").id == stem


@pytest.mark.parametrize("job_id", [".", "..", "...", "abc\n", "..\n", "a\u2024b"])
def test_ids_that_are_dots_or_end_in_a_newline_are_refused(job_id: str) -> None:
    assert _refused({"id": job_id, "prompt": "a cat"}).field == "id"


@settings(max_examples=200, deadline=None)
@given(before=SAFE, after=SAFE, bad=st.sampled_from([c for c in C0 + C1 if c not in "\t\n\r"]))
def test_no_prompt_with_a_c0_or_c1_control_is_accepted(before: str, after: str, bad: str) -> None:
    assert _refused({"prompt": before + bad + after}).reason == "contains control characters"


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ('{"prompt": "x", "cfg_scale": NaN}', "cfg_scale", "must be a finite number, not NaN"),
        ('{"prompt": "x", "cfg_scale": Infinity}', "cfg_scale", "must be a finite number, not Infinity"),
        ('{"prompt": "x", "denoising_strength": -Infinity}', "denoising_strength", "not -Infinity"),
        ('{"prompt": "x", "": 1}', "message", "has an empty key"),
        ('{"prompt": "x", "steps": 2, "steps": 3}', "steps", "appears twice in the message"),
        (
            '{"prompt": "x", "enable_hr": true, "width": 2048, "height": 2048, "hr_scale": 4}',
            "hr_scale",
            "8192x8192",
        ),
        (
            '{"prompt": "x", "enable_hr": true, "width": 512, "height": 1024, "hr_resize_x": 2048}',
            "hr_resize_x",
            "2048x4096",
        ),
        ('{"prompt": "x", "enable_hr": true, "width": 1536, "height": 512}', "hr_scale", "3072x1024"),
    ],
)
def test_reasons_name_the_real_problem(text: str, field: str, reason: str) -> None:
    with pytest.raises(InvalidJob) as refused:
        parse_job(text, "m")
    assert refused.value.field == field
    assert reason in refused.value.reason


def test_a_prompt_keeps_its_tabs_and_newlines() -> None:
    assert parse_job(json.dumps({"prompt": "a\tcat\non a\r\nmat"}), "m").spec.prompt == "a\tcat\non a\r\nmat"
