"""The stand-in's assets and costs over real HTTP: what it lists by default and by flag, files copied
on at run time and the rescans that find them, downloads of missing weights, the hires pass and its
failures, VAEs, model switches, pydantic v1's coercions, and the stats that identify generations."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from sidecar.dev.devenv import Child, Standin, free_port, standin_argv
from sidecar.prompts import LORAS as GENERATED_LORAS

ROOT = Path(__file__).resolve().parents[1]
TXT2IMG = "/sdapi/v1/txt2img"
SECONDS_PER_IMAGE = 0.05
FLAGS = ["--download-seconds", "0.3", "--model-load-seconds", "0.3", "--style", "noir=film noir, {prompt}"]


def start(*flags: str) -> Standin:
    port = free_port()
    server = Standin(Child(standin_argv(port, SECONDS_PER_IMAGE, flags)), port)
    asyncio.run(server.start())
    return server


@pytest.fixture(scope="module")
def server() -> Iterator[Standin]:
    shared = start(*FLAGS)
    yield shared
    shared.stop()


@pytest.fixture
async def http(server: Standin) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
        (await client.post("/standin/reset")).raise_for_status()
        yield client


@asynccontextmanager
async def own(*flags: str) -> AsyncIterator[httpx.AsyncClient]:
    server = await asyncio.to_thread(start, *flags)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
            yield client
    finally:
        server.stop()


def info_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    info: dict[str, Any] = json.loads(response.json()["info"])
    return info


async def generate(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    return info_of(await http.post(TXT2IMG, json={"prompt": "a fox", "send_images": False, **body}))


async def names(http: httpx.AsyncClient, path: str, key: str = "name") -> list[str]:
    return [item[key] for item in (await http.get(path)).json()]


async def until(http: httpx.AsyncClient, check: Callable[[dict[str, Any]], bool]) -> None:
    """Poll /sdapi/v1/progress until its state passes ``check``."""
    deadline = time.monotonic() + 10
    while True:
        state = (await http.get("/sdapi/v1/progress")).json()["state"]
        if check(state):
            return
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.01)


async def details(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = (await http.get("/standin/stats")).json()["generations_detail"]
    return found


async def test_by_default_it_has_what_the_examples_and_the_generator_name(http: httpx.AsyncClient) -> None:
    text = (ROOT / "examples" / "jobs.jsonl").read_text(encoding="utf-8")
    wanted = set(re.findall(r"<lora:([^:>]+)", text)) | {
        re.findall(r"<lora:([^:>]+)", t)[0] for t in GENERATED_LORAS
    }
    assert wanted <= set(await names(http, "/sdapi/v1/loras"))
    assert await names(http, "/sdapi/v1/sd-models", "model_name") == ["v1-5-pruned-emaonly", "sd_xl_base_1.0"]
    assert (await http.get("/sdapi/v1/sd-vae")).json() == [
        {
            "model_name": "vae-ft-mse-840000-ema-pruned.safetensors",
            "filename": "/stable-diffusion-webui/models/VAE/vae-ft-mse-840000-ema-pruned.safetensors",
        }
    ]
    upscalers = (await http.get("/sdapi/v1/upscalers")).json()
    assert [u["name"] for u in upscalers[:3]] == ["None", "Lanczos", "Nearest"]
    assert upscalers[0] == {
        "name": "None",
        "model_name": None,
        "model_path": None,
        "model_url": None,
        "scale": 4,
    }
    assert all(u["model_path"].startswith("https://") and u["model_url"] is None for u in upscalers[3:])
    assert await names(http, "/sdapi/v1/latent-upscale-modes") == [
        "Latent",
        "Latent (antialiased)",
        "Latent (bicubic)",
        "Latent (bicubic antialiased)",
        "Latent (nearest)",
        "Latent (nearest-exact)",
    ]
    assert (await http.get("/sdapi/v1/prompt-styles")).json() == [
        {"name": "noir", "prompt": "film noir, {prompt}", "negative_prompt": ""}
    ]


async def test_flags_set_the_files_and_no_hashing_drops_the_hashes() -> None:
    flags = ["--checkpoints", "anime/cartoon_v1,base", "--loras", "", "--vaes", "", "--upscalers", "4x-Ultra"]
    async with own(*flags, "--no-hashing") as http:
        models = (await http.get("/sdapi/v1/sd-models")).json()
        assert models[0] == {
            "title": "anime/cartoon_v1.safetensors",
            "model_name": "anime_cartoon_v1",
            "hash": None,
            "sha256": None,
            "filename": "/stable-diffusion-webui/models/Stable-diffusion/anime/cartoon_v1.safetensors",
            "config": None,
        }
        options = (await http.get("/sdapi/v1/options")).json()
        assert (options["sd_model_checkpoint"], options["sd_checkpoint_hash"]) == (
            "anime/cartoon_v1.safetensors",
            None,
        )
        assert (await http.get("/sdapi/v1/loras")).json() == (await http.get("/sdapi/v1/sd-vae")).json() == []
        assert (await names(http, "/sdapi/v1/upscalers"))[3:] == ["4x-Ultra"]
        info = await generate(http)
        assert (info["sd_model_name"], info["sd_model_hash"]) == ("cartoon_v1", None)
        assert "Model hash" not in info["infotexts"][0] and "Model: cartoon_v1," in info["infotexts"][0]


async def test_a_lora_copied_on_is_listed_after_refresh_loras(http: httpx.AsyncClient) -> None:
    update = {"add": [{"kind": "lora", "name": "new_style", "pending": True}]}
    assert (await http.post("/standin/assets", json=update)).json()["pending"]["lora"] == ["new_style"]
    assert "new_style" not in await names(http, "/sdapi/v1/loras")
    assert (await http.post("/sdapi/v1/refresh-loras")).json() is None
    assert "new_style" in await names(http, "/sdapi/v1/loras")
    removed = {"remove": [{"kind": "lora", "name": "new_style"}]}
    assert "new_style" not in (await http.post("/standin/assets", json=removed)).json()["listed"]["lora"]
    info = await generate(http, prompt="a fox <lora:new_style:1>")
    assert "Lora hashes" not in info["extra_generation_params"]
    assert (await details(http))[-1]["missing_loras"] == ["new_style"]


async def test_txt2img_finds_a_lora_copied_on_without_a_refresh(http: httpx.AsyncClient) -> None:
    """networks.load_networks rescans the folder when a prompt names a LoRA it does not know."""
    await http.post("/standin/assets", json={"add": [{"kind": "lora", "name": "late", "pending": True}]})
    info = await generate(http, prompt="a fox <lora:late:0.5>")
    assert info["extra_generation_params"]["Lora hashes"].startswith("late: ")
    assert "late" in await names(http, "/sdapi/v1/loras")


async def test_a_checkpoint_copied_on_is_used_after_refresh_checkpoints(http: httpx.AsyncClient) -> None:
    await http.post(
        "/standin/assets", json={"add": [{"kind": "checkpoint", "name": "dreamy", "pending": True}]}
    )
    body = {"override_settings": {"sd_model_checkpoint": "dreamy"}}
    assert (await generate(http, **body))["sd_model_name"] == "v1-5-pruned-emaonly"  # not seen yet: ignored
    assert (await http.post("/sdapi/v1/refresh-checkpoints")).json() is None
    assert (await generate(http, **body))["sd_model_name"] == "dreamy"


async def test_refresh_checkpoints_and_vae_wait_for_the_queue_lock_refresh_loras_does_not(
    http: httpx.AsyncClient,
) -> None:
    await http.post("/standin/faults", json={"hang_next": 1})
    hung = asyncio.create_task(http.post(TXT2IMG, json={"prompt": "long", "send_images": False}))
    await until(http, lambda state: bool(state["job"]))
    waiting = [asyncio.create_task(http.post(f"/sdapi/v1/refresh-{kind}")) for kind in ("checkpoints", "vae")]
    assert (await http.post("/sdapi/v1/refresh-loras")).status_code == 200
    await asyncio.sleep(0.3)
    assert not any(task.done() for task in waiting)
    await http.post("/sdapi/v1/interrupt")
    assert (await hung).status_code == 200
    assert [(await task).status_code for task in waiting] == [200, 200]


async def test_restore_faces_without_the_weights_tries_to_download_them_per_image(
    http: httpx.AsyncClient,
) -> None:
    started = time.monotonic()
    info = await generate(http, restore_faces=True, batch_size=2)
    assert time.monotonic() - started >= 2 * 0.3  # one failed try per image
    assert (
        info["face_restoration_model"] == "CodeFormer"
        and "Face restoration: CodeFormer" in info["infotexts"][0]
    )
    assert (await details(http))[-1]["downloads"] == [
        {"what": "face restoration", "seconds": 0.3, "ok": False}
    ] * 2
    await http.post("/standin/assets", json={"face_restoration": True})
    await generate(http, restore_faces=True, batch_size=2)
    assert (await details(http))[-1]["downloads"] == []


async def test_a_download_that_succeeds_leaves_the_weights_on_disk() -> None:
    async with own("--download-seconds", "0.2", "--downloads", "succeed") as http:
        await generate(http, restore_faces=True, batch_size=2)
        assert [d["ok"] for d in (await details(http))[-1]["downloads"]] == [True]
        assert (await http.get("/standin/assets")).json()["face_restoration"] is True
        hires = {
            "enable_hr": True,
            "hr_upscaler": "R-ESRGAN 4x+",
            "denoising_strength": 0.5,
            "width": 64,
            "height": 64,
        }
        await generate(http, **hires)
        await generate(http, **hires)
        assert [d["downloads"] for d in (await details(http))[-2:]] == [
            [{"what": "upscaler R-ESRGAN 4x+", "seconds": 0.2, "ok": True}],
            [],
        ]
        esrgan = next(
            u for u in (await http.get("/sdapi/v1/upscalers")).json() if u["name"] == "R-ESRGAN 4x+"
        )
        assert esrgan["model_path"] == "/stable-diffusion-webui/models/ESRGAN/RealESRGAN_x4plus.pth"


HIRES = {"enable_hr": True, "denoising_strength": 0.5, "width": 256, "height": 256}


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ({**HIRES, "hr_upscaler": "SwinIR 9x"}, "Exception", "could not find upscaler named SwinIR 9x"),
        (
            {**HIRES, "hr_checkpoint_name": "absent"},
            "Exception",
            "Could not find checkpoint with name absent",
        ),
        (
            {**HIRES, "hr_sampler_name": "DPM++ 2M Karras"},
            "AssertionError",
            "bad sampler name: DPM++ 2M Karras",
        ),
        ({"override_settings": {"no_such_option": 1}}, "KeyError", "'no_such_option'"),
        ({"refiner_checkpoint": "absent"}, "Exception", "Could not find checkpoint with name absent"),
    ],
)
async def test_what_a1111_raises_is_a_500_in_its_shape(
    http: httpx.AsyncClient, body: dict[str, Any], error: str, message: str
) -> None:
    response = await http.post(TXT2IMG, json={"prompt": "x", **body})
    assert (response.status_code, response.json()) == (
        500,
        {"error": error, "detail": "", "body": "", "errors": message},
    )
    (detail,) = await details(http)
    assert detail["images"] == 0 and detail["error"]["errors"] == message


async def test_a_bad_hr_sampler_fails_only_after_the_first_pass(http: httpx.AsyncClient) -> None:
    started = time.monotonic()
    response = await http.post(TXT2IMG, json={"prompt": "x", **HIRES, "hr_sampler_name": "nope"})
    assert response.status_code == 500 and time.monotonic() - started >= SECONDS_PER_IMAGE
    assert (await details(http))[0]["steps_done"] == 50


async def test_hires_images_and_an_interrupt_before_the_hires_pass(http: httpx.AsyncClient) -> None:
    response = await http.post(TXT2IMG, json={"prompt": "x", **HIRES, "hr_upscaler": "Latent", "steps": 10})
    picture = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert picture.size == (512, 512)
    info = info_of(response)
    assert info["extra_generation_params"] == {
        "Denoising strength": 0.5,
        "Hires prompt": None,
        "Hires negative prompt": None,
        "Hires schedule type": None,
        "Hires upscale": 2.0,
        "Hires upscaler": "Latent",
    }
    assert (await details(http))[-1]["steps_done"] == 20
    await http.post("/standin/faults", json={"hang_next": 1})
    hung = asyncio.create_task(
        http.post(TXT2IMG, json={"prompt": "x", **HIRES, "hr_resize_x": 512, "hr_resize_y": 384})
    )
    await until(http, lambda state: state["job_count"] == 2)
    await http.post("/sdapi/v1/interrupt")
    response = await hung
    picture = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert picture.size == (256, 256)  # sample_hr_pass returns the first pass when interrupted
    assert "Hires resize: 512x384" in info_of(response)["infotexts"][0]


async def test_a_vae_override_is_reported_and_an_unknown_one_ignored(http: httpx.AsyncClient) -> None:
    vae = "vae-ft-mse-840000-ema-pruned.safetensors"
    info = await generate(http, override_settings={"sd_vae": vae})
    assert (info["sd_vae_name"], len(info["sd_vae_hash"])) == (vae, 10)
    assert f"VAE hash: {info['sd_vae_hash']}, VAE: {vae}, Version" in info["infotexts"][0]
    info = await generate(http, override_settings={"sd_vae": "absent.pt"})
    assert (info["sd_vae_name"], info["sd_vae_hash"]) == (None, None)


async def test_styles_apply_to_the_prompt_and_unknown_ones_are_skipped(http: httpx.AsyncClient) -> None:
    info = await generate(http, prompt="a fox", styles=["noir", "absent"])
    assert (info["prompt"], info["styles"]) == ("film noir, a fox", ["noir", "absent"])
    assert info["infotexts"][0].startswith("film noir, a fox\nSteps: 50")


async def switches(http: httpx.AsyncClient) -> int:
    count: int = (await http.get("/standin/stats")).json()["model_switches"]
    return count


async def test_a_checkpoint_override_costs_a_switch_there_and_back(http: httpx.AsyncClient) -> None:
    started = time.monotonic()
    info = await generate(http, override_settings={"sd_model_checkpoint": "sd_xl_base_1.0"})
    assert time.monotonic() - started >= 0.3 and info["sd_model_name"] == "sd_xl_base_1.0"
    assert await switches(http) == 1
    options = (await http.get("/sdapi/v1/options")).json()
    assert options["sd_model_checkpoint"] == "v1-5-pruned-emaonly.safetensors [6ce0161689]"  # restored
    assert options["sd_checkpoint_hash"].startswith("31e35c80fc")  # ... but the SDXL weights are loaded
    started = time.monotonic()
    assert (await generate(http))["sd_model_name"] == "v1-5-pruned-emaonly"
    assert time.monotonic() - started >= 0.3
    assert await switches(http) == 2
    await generate(http)
    assert await switches(http) == 2  # the weights were loaded already: no switch, no cost


async def test_pydantic_v1_coerces_what_pydantic_2_would_refuse(http: httpx.AsyncClient) -> None:
    sent = {"prompt": 5, "steps": 3.9, "cfg_scale": "7.5", "restore_faces": "no", "tiling": 0, "styles": [1]}
    response = await http.post(TXT2IMG, json={**sent, "send_images": False})
    parameters = response.json()["parameters"]
    assert [parameters[k] for k in sent] == ["5", 3, 7.5, False, False, ["1"]]
    cases = [
        (
            {"send_images": None},
            {
                "loc": ["body", "send_images"],
                "msg": "none is not an allowed value",
                "type": "type_error.none.not_allowed",
            },
        ),
        (
            {"override_settings": [1]},
            {
                "loc": ["body", "override_settings"],
                "msg": "value is not a valid dict",
                "type": "type_error.dict",
            },
        ),
        (
            {"seed": [1]},
            {"loc": ["body", "seed"], "msg": "value is not a valid integer", "type": "type_error.integer"},
        ),
        (
            {"cfg_scale": "high"},
            {"loc": ["body", "cfg_scale"], "msg": "value is not a valid float", "type": "type_error.float"},
        ),
        (
            {"script_args": {}},
            {"loc": ["body", "script_args"], "msg": "value is not a valid list", "type": "type_error.list"},
        ),
    ]
    for body, error in cases:
        response = await http.post(TXT2IMG, json=body)
        assert (response.status_code, response.json()) == (422, {"detail": [error]}), body
    for raw, error in [
        ("[]", {"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}),
        ("", {"loc": ["body"], "msg": "field required", "type": "value_error.missing"}),
    ]:
        response = await http.post(TXT2IMG, content=raw, headers={"content-type": "application/json"})
        assert (response.status_code, response.json()) == (422, {"detail": [error]}), raw


async def test_stats_identify_each_generation_by_what_job_json_keeps(http: httpx.AsyncClient) -> None:
    info = await generate(http, prompt="a red fox <lora:add_detail:0.5> <lora:absent:1>", seed=42, n_iter=2)
    (detail,) = await details(http)
    assert {k: detail[k] for k in ("index", "prompt", "seed", "all_seeds", "job_timestamp")} == {
        "index": 0,
        "prompt": info["prompt"],
        "seed": info["seed"],
        "all_seeds": info["all_seeds"],
        "job_timestamp": info["job_timestamp"],
    }
    assert (detail["interrupted"], detail["steps"], detail["steps_done"], detail["steps_total"]) == (
        False,
        50,
        100,
        100,
    )
    assert (detail["loras"], detail["missing_loras"], detail["images"]) == (["add_detail"], ["absent"], 2)
    assert detail["task_id"].startswith("task(txt2img-") and detail["ended"] >= detail["started"]
    stats = (await http.get("/standin/stats")).json()
    assert stats["generations"][0][2] == 2 and stats["images"] == 2 and stats["requests"] == 1


async def test_crash_on_prompt_kills_the_server_for_that_prompt_only() -> None:
    server = await asyncio.to_thread(start, "--crash-on-prompt", "killer")
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
            await generate(http, prompt="a harmless prompt")
            (await http.post("/standin/reset")).raise_for_status()
            assert (await http.get("/standin/faults")).json()["crash_on_prompt"] == "killer"
            with pytest.raises(httpx.TransportError):
                await http.post(TXT2IMG, json={"prompt": "a killer prompt"})
        assert server.child.process is not None and server.child.process.wait(timeout=10) == 1
    finally:
        server.stop()
