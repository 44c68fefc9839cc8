"""sidecar.assets.Catalog: against the stand-in as a real HTTP server (which lists and finds assets the
way A1111 v1.10.1 does, tests/test_standin_contract.py), and against httpx.MockTransport for the
refresh rate limit and failures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.a1111 import http_client
from sidecar.assets import Catalog, CatalogError, Checkpoint, Problem, Snapshot, lora_names
from sidecar.dev.devenv import Child, Standin, free_port, standin_argv
from sidecar.jobs import LEGACY_SAMPLERS, parse_job
from sidecar.prompts import generate_jobs

ROOT = Path(__file__).resolve().parents[1]
ESRGAN_URL = "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth"
FLAGS = [
    "--upscalers",
    f"4x-UltraSharp,R-ESRGAN 4x+={ESRGAN_URL}",
    "--style",
    "cinematic=cinematic still, {prompt}, film grain",
    "--style",
    "sparkle=<lora:glitter:0.4>, sparkles",
]


@pytest.fixture(scope="module")
def server() -> Iterator[Standin]:
    port = free_port()
    a1111 = Standin(Child(standin_argv(port, 0.01, FLAGS)), port)
    asyncio.run(a1111.start())
    yield a1111
    a1111.stop()


@pytest.fixture
async def http(server: Standin) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(server.url) as client:  # the worker's own client
        (await client.post("/standin/reset")).raise_for_status()
        yield client


@pytest.fixture
async def catalog(http: httpx.AsyncClient) -> Catalog:
    found = Catalog(http, refresh_interval=30)
    await found.load()
    return found


def payload(**fields: Any) -> dict[str, Any]:
    return parse_job(json.dumps({"prompt": "a fox", **fields}), "message-id").txt2img_payload()


def summary(problems: list[Problem]) -> list[tuple[str, str, str, bool]]:
    return [(p.kind, p.name, p.field, p.elsewhere) for p in problems]


async def add_assets(http: httpx.AsyncClient, *assets: dict[str, Any], **extra: Any) -> None:
    (await http.post("/standin/assets", json={"add": list(assets), **extra})).raise_for_status()


async def test_load_reads_what_the_node_has(catalog: Catalog) -> None:
    snap = catalog.snapshot
    assert snap is not None
    assert {"add_detail", "epi_noiseoffset", "film_grain", "more_details"} <= {name for name, _ in snap.loras}
    assert [c.title for c in snap.checkpoints] == [
        "v1-5-pruned-emaonly.safetensors [6ce0161689]",
        "sd_xl_base_1.0.safetensors [31e35c80fc]",
    ]
    assert snap.vaes == {"vae-ft-mse-840000-ema-pruned.safetensors"}
    assert list(snap.samplers)[:2] == ["DPM++ 2M", "DPM++ SDE"] and len(snap.samplers) == 20
    assert snap.samplers["Euler a"] == ["k_euler_a", "k_euler_ancestral"]
    assert {"karras", "Karras", "automatic", "Automatic"} <= set(snap.schedulers)
    assert snap.upscalers["R-ESRGAN 4x+"] == ESRGAN_URL and snap.upscalers["None"] is None
    assert snap.upscalers["4x-UltraSharp"] == "/stable-diffusion-webui/models/ESRGAN/4x-UltraSharp.pth"
    assert snap.latent_modes >= {"Latent", "Latent (nearest-exact)"}
    assert snap.styles["cinematic"] == "cinematic still, {prompt}, film grain"


async def test_every_example_and_generated_job_runs_here(catalog: Catalog) -> None:
    lines = (ROOT / "examples" / "jobs.jsonl").read_text(encoding="utf-8").splitlines()
    jobs = [parse_job(line, f"m{i}") for i, line in enumerate(lines)]
    jobs += [parse_job(json.dumps(job), "g") for job in generate_jobs(200, seed=3)]
    for job in jobs:
        assert await catalog.check(job.txt2img_payload()) == [], job.id
    assert sum(catalog.refreshes.values()) == 0  # nothing was missing, nothing rescanned


LORA_CASES = [
    ({"prompt": "a fox <lora:add_detail:0.6>"}, []),
    ({"prompt": "a fox <lora:add_detail>"}, []),
    ({"prompt": "a fox <lora:absent:0.6>, <lora:more_details:1>"}, [("lora", "absent", "prompt", True)]),
    ({"prompt": "a fox <lyco:gone:1:0.5>"}, [("lora", "gone", "prompt", True)]),
    ({"prompt": "a fox <lora:absent:0.6> <lora:absent:0.2>"}, [("lora", "absent", "prompt", True)]),
    ({"prompt": "a fox <hypernet:absent:1>"}, []),  # another kind of extra network
    ({"prompt": "a", "hr_prompt": "<lora:absent:1>"}, []),  # no hires pass, no hr_prompt
    (
        {"prompt": "a", "enable_hr": True, "hr_prompt": "<lora:absent:1>", "denoising_strength": 0.5},
        [("lora", "absent", "hr_prompt", True)],
    ),
    ({"prompt": "a", "negative_prompt": "<lora:absent:1>"}, []),  # A1111 never loads these
    ({"prompt": "a", "styles": ["sparkle"]}, [("lora", "glitter", "styles", True)]),
]


@pytest.mark.parametrize(("fields", "expected"), LORA_CASES)
async def test_lora_tags(catalog: Catalog, fields: dict[str, Any], expected: list[Any]) -> None:
    problems = await catalog.check(payload(**fields))
    assert summary(problems) == expected
    for problem in problems:
        where = "style 'sparkle' (styles)" if problem.field == "styles" else problem.field
        assert problem.reason == f"LoRA '{problem.name}' named in {where} is not installed on this node"


async def test_lora_tags_in_negative_prompts_on_request(http: httpx.AsyncClient) -> None:
    catalog = Catalog(http, check_negative_prompts=True)
    job = payload(negative_prompt="<lora:absent:1>", enable_hr=True, hr_negative_prompt="<lora:gone:1>")
    problems = await catalog.check(job)
    assert summary(problems) == [
        ("lora", "absent", "negative_prompt", True),
        ("lora", "gone", "hr_negative_prompt", True),
    ]


async def test_a_lora_is_found_by_alias_unless_two_loras_share_it(
    http: httpx.AsyncClient, catalog: Catalog
) -> None:
    await add_assets(
        http,
        {"kind": "lora", "name": "detail_tweaker_v2", "alias": "detail"},
        {"kind": "lora", "name": "x1", "alias": "twin"},
        {"kind": "lora", "name": "x2", "alias": "twin"},
    )
    await catalog.load()
    assert await catalog.check(payload(prompt="<lora:detail:1> <lora:detail_tweaker_v2:1> <lora:x1:1>")) == []
    assert summary(await catalog.check(payload(prompt="<lora:twin:1>"))) == [("lora", "twin", "prompt", True)]
    info = json.loads(
        (
            await http.post(
                "/sdapi/v1/txt2img", json={"prompt": "<lora:detail:1> <lora:twin:1>", "send_images": False}
            )
        ).json()["info"]
    )
    assert info["extra_generation_params"]["Lora hashes"].startswith("detail: ")  # A1111 found it too
    assert "twin" not in info["extra_generation_params"]["Lora hashes"]


async def test_a_lora_copied_onto_the_node_is_found_after_a_refresh(
    http: httpx.AsyncClient, catalog: Catalog
) -> None:
    job = payload(prompt="a fox <lora:fresh_lora:0.8>")
    assert summary(await catalog.check(job)) == [("lora", "fresh_lora", "prompt", True)]
    assert catalog.refreshes["lora"] == 1  # looked once, found nothing
    await add_assets(http, {"kind": "lora", "name": "fresh_lora", "pending": True})
    assert "fresh_lora" not in {lora["name"] for lora in (await http.get("/sdapi/v1/loras")).json()}
    fresh = Catalog(http)
    await fresh.load()
    assert await fresh.check(job) == []  # the miss refreshed the list
    assert fresh.refreshes == {"lora": 1, "checkpoint": 0, "vae": 0, "upscaler": 0, "style": 0}
    assert "fresh_lora" in {lora["name"] for lora in (await http.get("/sdapi/v1/loras")).json()}


async def test_a_checkpoint_and_a_vae_copied_onto_the_node_are_found_after_a_refresh(
    http: httpx.AsyncClient, catalog: Catalog
) -> None:
    await add_assets(
        http,
        {"kind": "checkpoint", "name": "juggernaut_v9", "pending": True},
        {"kind": "vae", "name": "sdxl_vae.safetensors", "pending": True},
    )
    job = payload(
        override_settings={"sd_model_checkpoint": "juggernaut_v9", "sd_vae": "sdxl_vae.safetensors"}
    )
    assert await catalog.check(job) == []
    assert (catalog.refreshes["checkpoint"], catalog.refreshes["vae"], catalog.refreshes["lora"]) == (1, 1, 0)
    info = json.loads(
        (await http.post("/sdapi/v1/txt2img", json={**job, "send_images": False})).json()["info"]
    )
    assert (info["sd_model_name"], info["sd_vae_name"]) == ("juggernaut_v9", "sdxl_vae.safetensors")


MODEL_CASES = [
    ({"override_settings": {"sd_model_checkpoint": "sd_xl_base_1.0"}}, []),
    ({"override_settings": {"sd_model_checkpoint": "absent_model"}}, [("checkpoint", "absent_model")]),
    ({"override_settings": {"sd_vae": "Automatic"}}, []),
    ({"override_settings": {"sd_vae": "None"}}, []),
    ({"override_settings": {"sd_vae": "vae-ft-mse-840000-ema-pruned.safetensors"}}, []),
    (
        {"override_settings": {"sd_vae": "vae-ft-mse-840000-ema-pruned"}},
        [("vae", "vae-ft-mse-840000-ema-pruned")],
    ),
    ({"enable_hr": True, "hr_upscaler": "Latent", "denoising_strength": 0.5}, []),
    ({"enable_hr": True, "hr_upscaler": "4x-UltraSharp", "denoising_strength": 0.5}, []),
    ({"enable_hr": True, "hr_upscaler": "Lanczos", "denoising_strength": 0.5}, []),
    ({"enable_hr": True, "hr_upscaler": "SwinIR 9x", "denoising_strength": 0.5}, [("upscaler", "SwinIR 9x")]),
    (
        {"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+", "denoising_strength": 0.5},
        [("download", "R-ESRGAN 4x+")],
    ),
    ({"hr_upscaler": "SwinIR 9x"}, []),  # no hires pass
    (
        {"enable_hr": True, "hr_checkpoint_name": "absent_model", "denoising_strength": 0.5},
        [("checkpoint", "absent_model")],
    ),
    ({"enable_hr": True, "hr_checkpoint_name": "Use same checkpoint", "denoising_strength": 0.5}, []),
    ({"hr_checkpoint_name": "absent_model"}, []),
    ({"styles": ["cinematic"]}, []),
    ({"styles": ["cinematic", "noir"]}, [("style", "noir")]),
    ({"restore_faces": True}, [("download", "face restoration")]),
    ({"restore_faces": False}, []),
]


@pytest.mark.parametrize(("fields", "expected"), MODEL_CASES)
async def test_models_vaes_upscalers_styles_and_downloads(
    catalog: Catalog, fields: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    problems = await catalog.check(payload(**fields))
    assert [(p.kind, p.name) for p in problems] == expected
    assert all(p.elsewhere for p in problems)  # another node may have it: give the job back


async def test_reasons_name_the_asset_and_the_field(catalog: Catalog) -> None:
    job = payload(
        enable_hr=True,
        denoising_strength=0.5,
        hr_upscaler="R-ESRGAN 4x+",
        hr_checkpoint_name="absent_model",
        override_settings={"sd_model_checkpoint": "other_model", "sd_vae": "absent.vae.pt"},
        styles=["noir"],
        restore_faces=True,
    )
    reasons = {p.field: p.reason for p in await catalog.check(job)}
    assert reasons == {
        "override_settings.sd_model_checkpoint": "checkpoint 'other_model' named in override_settings."
        "sd_model_checkpoint is not on this node (A1111 would silently run its loaded model)",
        "hr_checkpoint_name": "checkpoint 'absent_model' named in hr_checkpoint_name is not on this node "
        "(A1111 would fail the job)",
        "override_settings.sd_vae": "VAE 'absent.vae.pt' named in override_settings.sd_vae is not on this "
        "node (A1111 would silently use none)",
        "hr_upscaler": "upscaler 'R-ESRGAN 4x+' named in hr_upscaler has no weights on this node: A1111 "
        f"would try to download them from {ESRGAN_URL}",
        "styles": "style 'noir' named in styles is not defined on this node (A1111 would silently skip it)",
        "restore_faces": "restore_faces needs the face-restoration weights, which this node does not have: "
        "A1111 would try to download them for every image",
    }


async def test_face_restoration_is_fine_where_the_weights_are_baked_in(http: httpx.AsyncClient) -> None:
    assert await Catalog(http, face_restoration_available=True).check(payload(restore_faces=True)) == []


async def test_an_upscaler_downloaded_meanwhile_is_found_when_its_list_is_read_again(
    http: httpx.AsyncClient, catalog: Catalog
) -> None:
    job = payload(enable_hr=True, hr_upscaler="R-ESRGAN 4x+", denoising_strength=0.5)
    assert [p.kind for p in await catalog.check(job)] == ["download"]
    later = Catalog(http)
    await later.load()
    await add_assets(
        http, {"kind": "upscaler", "name": "R-ESRGAN 4x+", "model_path": "/models/RealESRGAN_x4plus.pth"}
    )
    assert await later.check(job) == []
    assert later.refreshes["upscaler"] == 1


SAMPLER_CASES = [
    ({"sampler_name": "Euler a"}, []),
    ({"sampler_name": "DPM++ 2M Karras"}, []),  # a scheduler glued to the name, as A1111 1.9+ takes it
    ({"sampler_name": "DPM++ 2M SGMUniform"}, []),  # ... by a scheduler's alias too
    ({"sampler_name": "NoSuchSampler"}, [("sampler", "NoSuchSampler", "sampler_name", False)]),
    (
        {"sampler_name": "euler a"},
        [("sampler", "euler a", "sampler_name", False)],
    ),  # names are case-sensitive
    ({"scheduler": "karras"}, []),
    ({"scheduler": "Karras"}, []),
    ({"scheduler": "SGM Uniform"}, []),
    (
        {"scheduler": "SGMUniform"},
        [("scheduler", "SGMUniform", "scheduler", False)],
    ),  # aliases only as a suffix
    ({"scheduler": "fancy"}, [("scheduler", "fancy", "scheduler", False)]),
    ({"enable_hr": True, "denoising_strength": 0.5, "hr_sampler_name": "Euler"}, []),
    (
        {"enable_hr": True, "denoising_strength": 0.5, "hr_sampler_name": "DPM++ 2M Karras"},
        [("sampler", "DPM++ 2M Karras", "hr_sampler_name", False)],  # create_sampler takes bare names
    ),
    (
        {"enable_hr": True, "denoising_strength": 0.5, "hr_scheduler": "fancy"},
        [("scheduler", "fancy", "hr_scheduler", False)],
    ),
    ({"hr_sampler_name": "Nope", "hr_scheduler": "nope"}, []),  # no hires pass
]


@pytest.mark.parametrize(("fields", "expected"), SAMPLER_CASES)
async def test_samplers_and_schedulers(catalog: Catalog, fields: dict[str, Any], expected: list[Any]) -> None:
    assert summary(await catalog.check(payload(**fields))) == expected
    assert sum(catalog.refreshes.values()) == 0  # an unknown sampler is nowhere: nothing to rescan


async def test_legacy_sampler_names_pass_once_mapped_and_not_before(catalog: Catalog) -> None:
    for legacy in LEGACY_SAMPLERS:
        mapped = payload(sampler_name=legacy)
        assert mapped["sampler_name"] != legacy
        assert await catalog.check(mapped) == [], legacy
    raw = payload()
    raw["sampler_name"] = "k_euler_a"  # what a worker that forgot the mapping would send
    (problem,) = await catalog.check(raw)
    assert (problem.kind, problem.elsewhere) == ("sampler", False)
    assert problem.reason == (
        "sampler 'k_euler_a' named in sampler_name is not one of A1111's samplers, an alias of 'Euler a' "
        "that the txt2img API does not take (it would silently run 'DPM++ 2M')"
    )


CHECKPOINTS = [
    Checkpoint(
        "sd_xl_base_1.0.safetensors [31e35c80fc]",
        "sd_xl_base_1.0",
        "31e35c80fc",
        "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
        "/models/Stable-diffusion/sd_xl_base_1.0.safetensors",
    ),
    Checkpoint(
        "SDXL/juggernaut_v9.safetensors [abcdef1234]",
        "SDXL_juggernaut_v9",
        "abcdef1234",
        "abcdef1234" + "0" * 54,
        "/models/Stable-diffusion/SDXL/juggernaut_v9.safetensors",
    ),
    Checkpoint("plain.ckpt", "plain", None, None, "/models/Stable-diffusion/plain.ckpt"),  # --no-hashing
]
# (what the job names, the checkpoint override_settings loads, the one hr_checkpoint_name loads)
MATCHES = [
    ("sd_xl_base_1.0.safetensors [31e35c80fc]", 0, 0),  # title
    ("sd_xl_base_1.0.safetensors", 0, 0),  # name
    ("sd_xl_base_1.0", 0, 0),  # model_name, file name without extension
    ("sd_xl_base_1.0 [31e35c80fc]", 0, 0),
    ("31e35c80fc", 0, 0),  # short hash
    ("31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b", 0, 0),  # sha256
    ("31e35c", None, 0),  # a prefix of the hash: only a substring of the title
    ("SDXL/juggernaut_v9.safetensors", 1, 1),
    ("SDXL_juggernaut_v9", 1, 1),
    ("juggernaut_v9", 1, 1),
    ("juggernaut_v9 [abcdef1234]", 1, 1),
    ("juggernaut", None, 1),
    ("juggernaut_v9 [0000000000]", None, 1),  # a stale hash: matched without it
    ("SDXL", None, 1),
    (".safetensors", None, 0),  # the shortest title wins
    ("plain.ckpt", 2, 2),
    ("plain", 2, 2),
    ("/models/Stable-diffusion/plain.ckpt", None, None),  # a path is no id
    ("absent", None, None),
]


@pytest.mark.parametrize(("name", "override", "hires"), MATCHES)
def test_checkpoints_match_as_in_a1111(name: str, override: int | None, hires: int | None) -> None:
    snap = Snapshot(checkpoints=CHECKPOINTS)
    assert snap.checkpoint(name) is (None if override is None else CHECKPOINTS[override])
    assert snap.closest_checkpoint(name) is (None if hires is None else CHECKPOINTS[hires])


@pytest.mark.parametrize(
    "name",
    ["sd_xl_base_1.0", "sd_xl_base_1.0.safetensors", "31e35c80fc", "sd_xl_base_1.0 [31e35c80fc]", "31e35c"],
)
async def test_the_catalog_and_the_stand_in_agree_on_checkpoint_overrides(
    http: httpx.AsyncClient, catalog: Catalog, name: str
) -> None:
    problems = await catalog.check(payload(override_settings={"sd_model_checkpoint": name}))
    body = {"prompt": "x", "send_images": False, "override_settings": {"sd_model_checkpoint": name}}
    info = json.loads((await http.post("/sdapi/v1/txt2img", json=body)).json()["info"])
    loaded = "v1-5-pruned-emaonly" if problems else "sd_xl_base_1.0"
    assert info["sd_model_name"] == loaded  # the stand-in ran the fallback exactly when the catalog said so


def test_lora_names_are_read_like_extra_networks() -> None:
    text = "<lora:a:0.5>, <lyco:b:1:0.3>, <lora:c>, <LoRA:d:1>, <lora:e:te=0.5>, <hypernet:f:1>, <lora:g h:1>"
    assert lora_names(text) == ["a", "b", "c", "e", "g h"]


class Recorder:
    """A fake A1111 for httpx.MockTransport: fixed lists, and the requests it got."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.loras: list[dict[str, Any]] = []
        self.copied: list[dict[str, Any]] = []  # on disk, listed after POST refresh-loras
        self.status = 200

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(f"{request.method} {request.url.path}")
        if request.method == "POST":
            await asyncio.sleep(0.05)  # a rescan takes a while: concurrent checks overlap it
            if request.url.path.endswith("refresh-loras"):
                self.loras, self.copied = self.loras + self.copied, []
            return httpx.Response(self.status, json=None)
        name = request.url.path.rsplit("/", 1)[-1]
        if name == "latent-upscale-modes":
            return httpx.Response(404, json={"detail": "Not Found"})
        if name == "samplers":
            return httpx.Response(
                self.status, json=[{"name": "Euler", "aliases": ["k_euler"], "options": {}}]
            )
        return httpx.Response(self.status, json=self.loras if name == "loras" else [])

    def posts(self) -> list[str]:
        return [call for call in self.calls if call.startswith("POST")]


def mock_http(handler: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url="http://a1111", transport=httpx.MockTransport(handler))


async def test_misses_within_the_interval_refresh_once() -> None:
    recorder, now = Recorder(), [100.0]
    async with mock_http(recorder) as http:
        await rate_limited(Catalog(http, refresh_interval=30, clock=lambda: now[0]), recorder, now)


async def rate_limited(catalog: Catalog, recorder: Recorder, now: list[float]) -> None:
    job = {"prompt": "<lora:x:1>"}
    assert [p.name for p in await catalog.check(job)] == ["x"]
    assert [p.name for p in await catalog.check(job)] == ["x"]
    now[0] += 29.9
    await catalog.check(job)
    assert recorder.posts() == ["POST /sdapi/v1/refresh-loras"]
    now[0] += 0.2
    await catalog.check({"prompt": "<lora:y:1>"})
    assert recorder.posts() == ["POST /sdapi/v1/refresh-loras"] * 2
    recorder.loras = [{"name": "y", "alias": "y", "path": "/m/y.safetensors", "metadata": {}}]
    now[0] += 31
    assert await catalog.check({"prompt": "<lora:y:1>"}) == []


async def test_each_kind_has_its_own_rate_limit_and_concurrent_misses_share_a_refresh() -> None:
    recorder = Recorder()
    async with mock_http(recorder) as http:
        catalog = Catalog(http, clock=lambda: 0.0)
        await catalog.load()
        await shared_refreshes(catalog, recorder)


async def shared_refreshes(catalog: Catalog, recorder: Recorder) -> None:
    recorder.copied = [{"name": "a", "alias": "a", "path": "/m/a.safetensors", "metadata": {}}]
    job = {"prompt": "<lora:a:1>", "override_settings": {"sd_model_checkpoint": "m"}}
    found = await asyncio.gather(*(catalog.check(job) for _ in range(5)))
    assert [[p.kind for p in problems] for problems in found] == [["checkpoint"]] * 5  # the LoRA for all
    assert sorted(recorder.posts()) == ["POST /sdapi/v1/refresh-checkpoints", "POST /sdapi/v1/refresh-loras"]
    assert recorder.calls.count("GET /sdapi/v1/loras") == 2  # load, then once after the refresh


async def test_a_refresh_that_fails_still_rereads_the_lists() -> None:
    recorder = Recorder()
    async with mock_http(recorder) as http:
        catalog = Catalog(http)
        await catalog.load()
        recorder.status = 500
        with pytest.raises(CatalogError, match="GET /sdapi/v1/loras answered 500"):
            await catalog.check({"prompt": "<lora:x:1>"})
    assert recorder.posts() == ["POST /sdapi/v1/refresh-loras"]


async def test_an_unreachable_or_odd_a1111_is_a_catalog_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with mock_http(refuse) as http:
        with pytest.raises(CatalogError, match="ConnectError"):
            await Catalog(http).check({"prompt": "x"})
    async with mock_http(lambda request: httpx.Response(200, json={})) as odd:
        with pytest.raises(CatalogError, match="did not answer a list"):
            await Catalog(odd).load()
