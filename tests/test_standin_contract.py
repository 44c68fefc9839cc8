"""The stand-in against the recording of the real A1111 v1.10.1 (tests/data/a1111-v1.10.1): every
recorded probe is sent to the stand-in, a real HTTP server configured like the recorded one (one
checkpoint, random-sd15, no LoRA, models in /opt/webui/models), and the answer must match: status,
body keys in order, value types, and the values that do not depend on chance (seeds, timestamps)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from sidecar.dev.devenv import Child, Standin, free_port, standin_argv

DATA = Path(__file__).parent / "data" / "a1111-v1.10.1"
RECORDED_SHA = "4958f9b4af38887b980d05f54f8156dd28bd747318fa462dedcdaa59d9267d41"
AS_RECORDED = [
    "--models-dir",
    "/opt/webui/models",
    "--checkpoints",
    f"random-sd15.safetensors={RECORDED_SHA}",
    "--loras",
    "",
    "--seconds-per-step",
    "0.05",
]
RANDOM_INFO = {"seed", "all_seeds", "subseed", "all_subseeds", "job_timestamp"}
TIMESTAMP = re.compile(r"^\d{14}$")


def recording(name: str, folder: str = "observations*") -> dict[str, Any]:
    """A probe by name; the first pass (observations/) unless the folder is given."""
    found = sorted(DATA.glob(f"{folder}/*-{name}.json"))
    assert found, name
    probe: dict[str, Any] = json.loads(found[0].read_text(encoding="utf-8"))
    return probe


def recorded(path: Path) -> dict[str, Any]:
    probe: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return probe


def recorded_body(probe: dict[str, Any]) -> Any:
    return json.loads(probe["body"])


def assert_same_shape(actual: Any, expected: Any, where: str = "body") -> None:
    """Same JSON types all the way down (int is not float, null is not a string), dict keys in order."""
    assert type(actual) is type(expected), f"{where}: {actual!r} is not like {expected!r}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key, value in expected.items():
            assert_same_shape(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list) and expected and actual:
        for i, item in enumerate(actual):
            assert_same_shape(item, expected[min(i, len(expected) - 1)], f"{where}[{i}]")


def without_seeds(infotext: str) -> str:
    return re.sub(r"Seed: \d+", "Seed: N", infotext)


def check_txt2img(response: httpx.Response, probe: dict[str, Any]) -> dict[str, Any]:
    """A 200 txt2img answer as recorded: parameters exactly, info in shape and in every value that is
    not random, one decodable PNG of the size recorded per image, carrying its infotext."""
    assert response.status_code == probe["status"] == 200, response.text
    body, expected = response.json(), recorded_body(probe)
    assert list(body) == list(expected) == ["images", "parameters", "info"]
    assert body["parameters"] == expected["parameters"]
    assert list(body["parameters"]) == list(expected["parameters"])
    info: dict[str, Any] = json.loads(body["info"])
    expected_info = json.loads(expected["info"])
    assert_same_shape(info, expected_info, "info")
    seeded = probe["request"].get("seed") is not None
    random_keys = {"subseed", "all_subseeds", "job_timestamp", "infotexts"} | (
        set() if seeded else RANDOM_INFO
    )
    for key in expected_info.keys() - random_keys:
        assert info[key] == expected_info[key], key
    if seeded:  # the same seed gives the same infotext, letter for letter
        assert info["infotexts"] == expected_info["infotexts"]
    assert [without_seeds(t) for t in info["infotexts"]] == [
        without_seeds(t) for t in expected_info["infotexts"]
    ]
    assert TIMESTAMP.match(info["job_timestamp"])
    assert len(body["images"]) == len(expected["images"])
    for b64, old, text in zip(body["images"], expected["images"], info["infotexts"], strict=True):
        picture, real = (
            Image.open(io.BytesIO(base64.b64decode(b64))),
            Image.open(io.BytesIO(base64.b64decode(old))),
        )
        assert (picture.format, picture.size) == (real.format, real.size) == ("PNG", (64, 64))
        assert picture.text["parameters"] == text  # type: ignore[attr-defined]
    return info


def check_headers(response: httpx.Response, probe: dict[str, Any]) -> None:
    headers = probe.get("headers")
    if headers:
        assert response.headers["content-type"] == headers["content-type"] == "application/json"
        assert float(response.headers["x-process-time"]) >= 0  # api_middleware times every answer


@pytest.fixture(scope="module")
def server() -> Iterator[Standin]:
    port = free_port()
    a1111 = Standin(Child(standin_argv(port, 0.01, AS_RECORDED)), port)
    asyncio.run(a1111.start())
    yield a1111
    a1111.stop()


@pytest.fixture
async def http(server: Standin) -> Any:
    async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as client:
        (await client.post("/standin/reset")).raise_for_status()
        yield client


LISTINGS = ["get-samplers", "get-schedulers", "get-sd-models", "get-loras", "get-unknown-route"]


@pytest.mark.parametrize("name", LISTINGS)
async def test_listings_and_404_are_the_recorded_bytes(http: httpx.AsyncClient, name: str) -> None:
    probe = recording(name)
    response = await http.request(probe["method"], probe["path"])
    assert response.status_code == probe["status"]
    assert response.json() == recorded_body(probe)
    assert response.text == probe["body"]  # byte for byte: order, separators, 1.0 not 1
    check_headers(response, probe)


def txt2img_probes() -> list[Path]:
    paths = sorted(DATA.glob("observations*/*.json"))
    return [p for p in paths if p.name[0].isdigit() and recorded(p).get("path") == "/sdapi/v1/txt2img"]


STATIC_TXT2IMG = txt2img_probes()  # one at a time here; the scenarios below interrupt and queue them


@pytest.mark.parametrize("path", STATIC_TXT2IMG, ids=lambda p: f"{p.parent.name}/{p.stem}")
async def test_txt2img_probe_answers_as_recorded(http: httpx.AsyncClient, path: Path) -> None:
    probe = recorded(path)
    request = probe["request"]
    if isinstance(request, str):  # sent as raw bytes: not JSON
        response = await http.post(
            probe["path"], content=request, headers={"content-type": "application/json"}
        )
    else:
        response = await http.post(probe["path"], json=request)
    check_headers(response, probe)
    if probe["status"] != 200:
        assert response.status_code == probe["status"]
        assert response.json() == recorded_body(probe)  # pydantic v1's 422, exactly
        assert response.text == probe["body"]
        return
    check_txt2img(response, probe)


async def test_the_silent_fallbacks_are_only_visible_in_info(http: httpx.AsyncClient) -> None:
    """k_euler_a and an unknown sampler run DPM++ 2M (Karras); a missing LoRA and a missing checkpoint
    override change nothing: 200, no error, no warning in the answer, options untouched."""
    before = (await http.get("/sdapi/v1/options")).json()
    for name in ("txt2img-k_euler_a", "txt2img-unknown-sampler"):
        probe = recording(name)
        info = check_txt2img(await http.post(probe["path"], json=probe["request"]), probe)
        assert (info["sampler_name"], info["extra_generation_params"]) == (
            "DPM++ 2M",
            {"Schedule type": "Karras"},
        )
    probe = recording("txt2img-override-bad-checkpoint")
    info = check_txt2img(await http.post(probe["path"], json=probe["request"]), probe)
    assert info["sd_model_name"] == "random-sd15"
    after = (await http.get("/sdapi/v1/options")).json()
    assert after == before == recorded_body(recording("get-options-after-override"))
    details = (await http.get("/standin/stats")).json()["generations_detail"]
    assert [d["missing_loras"] for d in details] == [["missing"], [], []]


async def test_options_have_the_recorded_keys_and_types(http: httpx.AsyncClient) -> None:
    for name in ("get-options", "get-options-after-override"):
        probe = recording(name)
        options, expected = (await http.get(probe["path"])).json(), recorded_body(probe)
        assert_same_shape(options, expected, "options")
        assert options == expected  # configured like the recorded server: the same model, the same values


async def test_progress_when_idle_after_a_job(http: httpx.AsyncClient) -> None:
    probe = recording("get-progress-idle")
    response = await http.post(
        "/sdapi/v1/txt2img", json={"prompt": "warm-up", "steps": 2, "width": 64, "height": 64}
    )
    assert response.status_code == 200
    progress = (await http.get(probe["path"])).json()
    expected = recorded_body(probe)
    assert_same_shape(progress, expected)
    assert "current_task" not in progress  # API-only A1111 never reports it
    stamp = progress["state"].pop("job_timestamp")
    assert stamp == json.loads(response.json()["info"])["job_timestamp"] and TIMESTAMP.match(stamp)
    expected["state"].pop("job_timestamp")
    assert progress == expected


async def wait_sampling(
    http: httpx.AsyncClient, steps: int, at_step: int = 1, not_job: str | None = None
) -> dict[str, Any]:
    """Poll progress until a job (not the one stamped ``not_job``) samples step ``at_step`` of ``steps``."""
    deadline = time.monotonic() + 20
    while True:
        progress: dict[str, Any] = (await http.get("/sdapi/v1/progress?skip_current_image=true")).json()
        state = progress["state"]
        sampling = state["job"] and state["sampling_steps"] == steps and state["sampling_step"] >= at_step
        if sampling and state["job_timestamp"] != not_job:
            return progress
        assert time.monotonic() < deadline, progress
        await asyncio.sleep(0.02)


async def wait_received(http: httpx.AsyncClient, requests: int) -> None:
    """Poll the stand-in's stats until it has had ``requests`` txt2img requests (since the reset): it
    counts each as it arrives, before the queue lock."""
    deadline = time.monotonic() + 20
    while (stats := (await http.get("/standin/stats")).json())["requests"] < requests:
        assert time.monotonic() < deadline, stats["requests"]
        await asyncio.sleep(0.02)


async def test_interrupt_mid_sampling_returns_the_partial_image_with_the_full_step_count(
    http: httpx.AsyncClient,
) -> None:
    """observations2: progress mid-sampling, interrupt, the 40-step job's 200, progress after, an
    interrupt when idle and a job after it that runs to the end."""
    long_probe = recording("long-40-steps", "observations2")
    running = asyncio.create_task(http.post(long_probe["path"], json=long_probe["request"]))
    progress = await wait_sampling(http, 40, at_step=2)
    mid = recorded_body(recording("progress-mid-sampling", "observations2"))
    assert_same_shape(progress, mid)
    state = progress["state"]
    assert (state["job"], state["job_count"], state["job_no"], state["interrupted"]) == (
        "scripts_txt2img",
        1,
        0,
        False,
    )
    assert progress["progress"] == pytest.approx(0.01 + state["sampling_step"] / 40)
    interrupt = recording("interrupt", "observations2")
    response = await http.post(interrupt["path"])
    assert (response.status_code, response.text) == (interrupt["status"], interrupt["body"]) == (200, "{}")
    info = check_txt2img(await running, long_probe)
    assert info["steps"] == 40 and "Steps: 40," in info["infotexts"][0]
    after = (await http.get("/sdapi/v1/progress?skip_current_image=true")).json()
    expected_after = recorded_body(recording("progress-after-interrupt", "observations2"))
    assert_same_shape(after, expected_after)
    assert after["state"].pop("job_timestamp") == info["job_timestamp"]
    expected_after["state"].pop("job_timestamp")
    assert after == expected_after
    idle = recording("interrupt-when-idle", "observations2")
    assert (await http.post(idle["path"])).text == idle["body"] == "{}"
    next_probe = recording("txt2img-after-idle-interrupt", "observations2")
    check_txt2img(await http.post(next_probe["path"], json=next_probe["request"]), next_probe)
    details = (await http.get("/standin/stats")).json()["generations_detail"]
    assert [(d["interrupted"], d["steps"]) for d in details] == [(True, 40), (False, 2)]
    assert 2 <= details[0]["steps_done"] < 40 and details[1]["steps_done"] == 2


async def test_concurrent_requests_queue_and_an_interrupt_hits_only_the_running_one(
    http: httpx.AsyncClient,
) -> None:
    """observations2/07, 08 and the progress trace: B waits at the queue lock while A runs, progress
    shows only the running job (A's timestamp, then B's). An interrupt that hits A leaves B whole."""
    a, b = recording("concurrent-A", "observations2"), recording("concurrent-B", "observations2")
    first = asyncio.create_task(http.post(a["path"], json=a["request"]))
    await wait_sampling(http, 4)
    second = asyncio.create_task(http.post(b["path"], json=b["request"]))
    await wait_received(http, 2)  # B is at the queue lock
    while_a = (await http.get("/sdapi/v1/progress")).json()
    assert_same_shape(while_a, recorded_body(recording("progress-while-A-runs-B-waits")))
    assert while_a["state"]["job_count"] == 1  # nothing about the request waiting
    assert (await http.post("/sdapi/v1/interrupt")).json() == {}
    info_a = check_txt2img(await first, a)
    info_b = check_txt2img(await second, b)
    assert info_a["job_timestamp"] < info_b["job_timestamp"]
    details = (await http.get("/standin/stats")).json()["generations_detail"]
    assert [(d["prompt"], d["interrupted"], d["steps_done"] == 4) for d in details] == [
        ("job A", True, False),
        ("job B", False, True),
    ]
    assert details[0]["ended"] <= details[1]["started"]


async def test_an_interrupt_reaches_the_queued_request_once_it_runs(http: httpx.AsyncClient) -> None:
    a, b = recording("concurrent-A", "observations2"), recording("concurrent-B", "observations2")
    first = asyncio.create_task(http.post(a["path"], json=a["request"]))
    await wait_sampling(http, 4)
    second = asyncio.create_task(http.post(b["path"], json=b["request"]))
    await wait_received(http, 2)  # B is at the queue lock
    info_a = check_txt2img(await first, a)  # A runs to the end: nobody interrupted it
    await wait_sampling(http, 4, not_job=info_a["job_timestamp"])
    await http.post("/sdapi/v1/interrupt")
    check_txt2img(await second, b)
    details = (await http.get("/standin/stats")).json()["generations_detail"]
    assert [d["interrupted"] for d in details] == [False, True]


async def test_job_timestamps_are_unique_and_in_a1111s_format(http: httpx.AsyncClient) -> None:
    body = {"prompt": "burst", "steps": 1, "width": 64, "height": 64, "send_images": False}
    stamps = []
    for _ in range(4):
        stamps.append(
            json.loads((await http.post("/sdapi/v1/txt2img", json=body)).json()["info"])["job_timestamp"]
        )
    assert len(set(stamps)) == 4 and stamps == sorted(stamps)
    assert all(TIMESTAMP.match(stamp) for stamp in stamps)
    details = (await http.get("/standin/stats")).json()["generations_detail"]
    assert [d["job_timestamp"] for d in details] == stamps
    assert [d["index"] for d in details] == [0, 1, 2, 3]
