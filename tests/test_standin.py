"""The A1111 stand-in over real HTTP: ``python -m a1111.standin`` runs as a subprocess, driven with httpx."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SECONDS_PER_IMAGE = 0.05
TXT2IMG = "/sdapi/v1/txt2img"


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(server: Server, timeout: float = 20.0) -> None:
    """Poll like a client would: the stand-in is up once /sdapi/v1/sd-models answers."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, timeout=1.0) as http:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"the stand-in exited early:\n{server.log_text()}")
            try:
                if http.get("/sdapi/v1/sd-models").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.02)
    raise TimeoutError(f"the stand-in did not answer:\n{server.log_text()}")


@pytest.fixture(scope="module")
def spawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Start stand-ins with the given CLI flags; all are stopped when the module is done."""
    servers: list[Server] = []

    def start(*flags: str) -> Server:
        port = free_port()
        log = tmp_path_factory.mktemp("standin") / "standin.log"
        argv = [sys.executable, "-m", "a1111.standin", "--port", str(port)]
        argv += ["--seconds-per-image", str(SECONDS_PER_IMAGE), *flags]
        with log.open("wb") as out:
            process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        server = Server(process, f"http://127.0.0.1:{port}", log)
        servers.append(server)
        wait_ready(server)
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="module")
def shared(spawn: Any) -> Server:
    server: Server = spawn()
    return server


@pytest.fixture
async def http(shared: Server) -> Any:
    async with httpx.AsyncClient(base_url=shared.url, timeout=30.0) as client:
        (await client.post("/standin/reset")).raise_for_status()
        yield client


def image(b64: str) -> Image.Image:
    assert not b64.startswith("data:")
    picture = Image.open(io.BytesIO(base64.b64decode(b64)))
    picture.load()
    return picture


def info_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    info: dict[str, Any] = json.loads(response.json()["info"])
    return info


async def test_default_txt2img_is_one_512_png_with_its_infotext(http: httpx.AsyncClient) -> None:
    response = await http.post(TXT2IMG, json={"prompt": "a red fox", "seed": 1234, "steps": 15})
    info = info_of(response)
    body = response.json()
    assert len(body["images"]) == 1
    picture = image(body["images"][0])
    assert (picture.format, picture.size, picture.mode) == ("PNG", (512, 512), "RGB")
    infotext = picture.text["parameters"]  # type: ignore[attr-defined]
    assert infotext == info["infotexts"][0]
    assert infotext.startswith(
        "a red fox\nSteps: 15, Sampler: Euler, Schedule type: Automatic, CFG scale: 7.0, Seed: 1234, "
        "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly"
    )
    assert (info["seed"], info["all_seeds"], info["sampler_name"]) == (1234, [1234], "Euler")
    assert (body["parameters"]["sampler_name"], body["parameters"]["sampler_index"]) == (None, "Euler")
    assert body["parameters"]["steps"] == 15


async def test_batches_get_consecutive_random_seeds(http: httpx.AsyncClient) -> None:
    response = await http.post(TXT2IMG, json={"batch_size": 2, "n_iter": 2, "steps": 5})
    info = info_of(response)
    seeds = info["all_seeds"]
    assert seeds == [seeds[0] + i for i in range(4)] and seeds[0] >= 0
    assert len(response.json()["images"]) == 4
    assert [text.split("Seed: ")[1].split(",")[0] for text in info["infotexts"]] == [str(s) for s in seeds]


async def test_images_have_the_requested_size(http: httpx.AsyncClient) -> None:
    response = await http.post(TXT2IMG, json={"width": 640, "height": 384})
    assert image(response.json()["images"][0]).size == (640, 384)
    assert "Size: 640x384" in info_of(response)["infotexts"][0]
    hires = {
        "width": 256,
        "height": 256,
        "enable_hr": True,
        "denoising_strength": 0.5,
        "hr_upscaler": "Latent",
    }
    response = await http.post(TXT2IMG, json=hires)
    assert image(response.json()["images"][0]).size == (512, 512)  # the hires fix doubles by default
    assert "Size: 256x256" in info_of(response)["infotexts"][0]
    assert (
        "Denoising strength: 0.5, Hires upscale: 2.0, Hires upscaler: Latent"
        in info_of(response)["infotexts"][0]
    )


async def test_png_sizes_look_like_stable_diffusion_output(http: httpx.AsyncClient) -> None:
    response = await http.post(TXT2IMG, json={"seed": 100, "batch_size": 9})
    pngs = [base64.b64decode(b64) for b64 in response.json()["images"]]
    sizes = [len(png) for png in pngs]
    assert all(300_000 <= size <= 600_000 for size in sizes), sizes
    assert len(set(sizes[:8])) == 8
    assert len(set(pngs)) == 9  # seeds 100 and 108 share a pooled image, not the bytes


async def test_unknown_sampler_runs_the_default_sampler_as_a1111_1_10_does(
    http: httpx.AsyncClient, shared: Server
) -> None:
    info = info_of(await http.post(TXT2IMG, json={"sampler_name": "k_euler_a", "send_images": False}))
    assert info["sampler_name"] == "DPM++ 2M"
    assert "Unknown sampler 'k_euler_a'" in shared.log_text()


async def test_sampler_names_with_a_scheduler_suffix_are_split(http: httpx.AsyncClient) -> None:
    info = info_of(await http.post(TXT2IMG, json={"sampler_name": "DPM++ 2M Karras", "send_images": False}))
    assert info["sampler_name"] == "DPM++ 2M"
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in info["infotexts"][0]
    info = info_of(await http.post(TXT2IMG, json={"sampler_name": "Euler a", "scheduler": "exponential"}))
    assert "Sampler: Euler a, Schedule type: Exponential," in info["infotexts"][0]


async def test_wrong_types_get_fastapis_422(http: httpx.AsyncClient) -> None:
    response = await http.post(TXT2IMG, json={"steps": "abc"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail[0]["loc"] == ["body", "steps"]
    assert (await http.get("/standin/stats")).json()["received"] == [{"steps": "abc"}]


async def test_unknown_keys_are_ignored_and_recorded_as_sent(http: httpx.AsyncClient) -> None:
    sent = {"prompt": "x", "steps": 3, "not_an_a1111_field": {"a": 1}, "send_images": False}
    response = await http.post(TXT2IMG, json=sent)
    assert response.status_code == 200
    assert "not_an_a1111_field" not in response.json()["parameters"]
    stats = (await http.get("/standin/stats")).json()
    assert stats["received"] == [sent] and stats["requests"] == 1


async def test_concurrent_generations_are_serialized_in_arrival_order(http: httpx.AsyncClient) -> None:
    finished: dict[str, float] = {}

    async def generate(prompt: str) -> None:
        body = {"prompt": prompt, "batch_size": 2, "send_images": False}
        assert (await http.post(TXT2IMG, json=body)).status_code == 200
        finished[prompt] = time.monotonic()

    await asyncio.gather(*(generate(f"p{i}") for i in range(3)))
    stats = (await http.get("/standin/stats")).json()
    generations = stats["generations"]
    assert [n for _, _, n in generations] == [2, 2, 2] and stats["images"] == 6
    for (_, end, _), (start, _, _) in itertools.pairwise(generations):
        assert end <= start
    assert stats["busy_seconds"] >= 6 * SECONDS_PER_IMAGE * 0.9
    arrival = [body["prompt"] for body in stats["received"]]
    assert sorted(finished, key=finished.__getitem__) == arrival


async def test_fail_next_fails_in_a1111s_error_shape_then_recovers(http: httpx.AsyncClient) -> None:
    faults = (await http.post("/standin/faults", json={"fail_next": 1})).json()
    assert faults["fail_next"] == 1
    response = await http.post(TXT2IMG, json={"send_images": False})
    assert response.status_code == 500
    assert response.json() == {
        "error": "OutOfMemoryError",
        "detail": "",
        "body": "",
        "errors": "CUDA out of memory. Tried to allocate 2.00 GiB",
    }
    assert (await http.post(TXT2IMG, json={"send_images": False})).status_code == 200
    assert [n for _, _, n in (await http.get("/standin/stats")).json()["generations"]] == [0, 1]


async def test_hang_next_holds_the_queue_until_interrupted(http: httpx.AsyncClient) -> None:
    await http.post("/standin/faults", json={"hang_next": 1})
    hung = asyncio.create_task(http.post(TXT2IMG, json={"seed": 7, "batch_size": 2, "n_iter": 3}))
    deadline = time.monotonic() + 5
    while (state := (await http.get("/sdapi/v1/progress")).json()["state"])["job_count"] != 3:
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.01)
    assert state["job"] == "Batch 1 out of 3"
    await asyncio.sleep(10 * SECONDS_PER_IMAGE)  # longer than the whole job would take
    assert not hung.done()
    assert (await http.post("/sdapi/v1/interrupt")).json() == {}
    response = await hung
    info = info_of(response)
    assert len(response.json()["images"]) == 2  # the batch it was in, as A1111 returns
    assert info["all_seeds"] == list(range(7, 13))
    progress = (await http.get("/sdapi/v1/progress")).json()
    state = progress["state"]
    assert (progress["progress"], state["job_count"], state["interrupted"]) == (0, 0, True)


async def test_overrides_and_options(http: httpx.AsyncClient) -> None:
    overrides = {
        "CLIP_stop_at_last_layers": 2,
        "samples_format": "jpg",
        "sd_model_checkpoint": "sd_xl_base_1.0",
    }
    response = await http.post(TXT2IMG, json={"override_settings": overrides})
    info = info_of(response)
    assert image(response.json()["images"][0]).format == "PNG"  # samples_format is not honoured
    assert (info["clip_skip"], info["sd_model_name"]) == (2, "sd_xl_base_1.0")
    assert "Clip skip: 2" in info["infotexts"][0]
    options = (await http.get("/sdapi/v1/options")).json()
    assert options["CLIP_stop_at_last_layers"] == 1  # restored afterwards
    assert options["sd_model_checkpoint"] == "v1-5-pruned-emaonly.safetensors [6ce0161689]"
    assert (await http.post("/sdapi/v1/options", json={"samples_save": False})).json() is None
    assert (await http.get("/sdapi/v1/options")).json()["samples_save"] is False
    # A1111's opts.set() looks the key up in its option table: an unknown one is a KeyError
    response = await http.post("/sdapi/v1/options", json={"standin_test": 1})
    assert (response.status_code, response.json()["error"], response.json()["errors"]) == (
        500,
        "KeyError",
        "'standin_test'",
    )
    assert "standin_test" not in (await http.get("/sdapi/v1/options")).json()
    response = await http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert (response.status_code, response.json()["error"]) == (500, "RuntimeError")


async def test_catalog_endpoints(http: httpx.AsyncClient) -> None:
    samplers = {s["name"]: s for s in (await http.get("/sdapi/v1/samplers")).json()}
    expected = {"Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE"}
    expected |= {
        "DPM++ 2M SDE",
        "DPM++ 3M SDE",
        "DPM fast",
        "DPM adaptive",
        "Restart",
        "DDIM",
        "PLMS",
        "UniPC",
        "LCM",
    }
    assert expected <= set(samplers)
    assert samplers["Euler a"]["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    assert samplers["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    schedulers = (await http.get("/sdapi/v1/schedulers")).json()
    assert schedulers[2] == {
        "name": "karras",
        "label": "Karras",
        "aliases": None,
        "default_rho": 7.0,
        "need_inner_model": False,
    }
    models = (await http.get("/sdapi/v1/sd-models")).json()
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    loras = (await http.get("/sdapi/v1/loras")).json()
    assert {"add_detail", "more_details"} <= {lora["name"] for lora in loras}
    assert set(loras[0]) == {"name", "alias", "path", "metadata"}
    assert (await http.get("/internal/ping")).status_code == 404
    idle = (await http.get("/sdapi/v1/progress")).json()
    assert (idle["progress"], idle["eta_relative"], idle["state"]["job_count"]) == (0, 0, 0)


async def test_a_missing_lora_only_logs_a_warning(http: httpx.AsyncClient, shared: Server) -> None:
    body = {"prompt": "a fox <lora:add_detail:0.5> <lora:not_installed:0.7>", "send_images": False}
    info = info_of(await http.post(TXT2IMG, json=body))
    assert "Lora not found: not_installed" in shared.log_text()
    assert info["extra_generation_params"]["Lora hashes"].startswith("add_detail: ")


async def test_startup_delay_strict_samplers_and_crash_next(spawn: Any) -> None:
    server: Server = spawn("--startup-delay", "1.5", "--strict-samplers")
    ready = time.time()
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
        started_at = (await http.get("/standin/stats")).json()["started_at"]
        assert ready < started_at + 1.5  # GET endpoints answer while the model loads
        response = await http.post(TXT2IMG, json={"sampler_name": "k_euler_a"})
        assert response.status_code == 404
        error = {"error": "HTTPException", "detail": "Sampler not found", "body": "", "errors": ""}
        assert response.json() == error
        waiting = asyncio.create_task(http.post(TXT2IMG, json={"send_images": False}))
        assert (await http.get("/sdapi/v1/progress")).status_code == 200
        assert not waiting.done()
        assert (await waiting).status_code == 200
        generation_start = (await http.get("/standin/stats")).json()["generations"][0][0]
        assert generation_start >= started_at + 1.5 - 0.01

        await http.post("/standin/faults", json={"crash_next": True})
        with pytest.raises(httpx.TransportError):
            await http.post(TXT2IMG, json={})
    assert server.process.wait(timeout=10) == 1


async def test_crash_after_flag_crashes_on_the_next_call(spawn: Any) -> None:
    server: Server = spawn("--crash-after", "1")
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
        assert (await http.post(TXT2IMG, json={"send_images": False})).status_code == 200
        with pytest.raises(httpx.TransportError):
            await http.post(TXT2IMG, json={"send_images": False})
    assert server.process.wait(timeout=10) == 1
