"""SIDECAR_IMAGE_FORMAT and SIDECAR_IMAGE_QUALITY: A1111's global samples_format and jpeg_quality set
at start and read back, every image checked to be in that format before it is stored (a format
changed behind the worker's back is set again and the job generated again, never stored wrong), blobs
named and typed by format; and the stand-in encoding as A1111 does: PNG with its text chunk, JPEG or
WEBP with the infotext in the EXIF UserComment, from the global options after a request's overrides
are restored, each image labelled with its prompt, seed and size."""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from a1111.pngs import adler32_combine
from sidecar.a1111 import FORMAT_REMAKES, IMAGE_FORMATS
from sidecar.app import run_worker
from sidecar.config import load_settings
from sidecar.errors import ConfigError
from sidecar.storage import Storage
from tests.conftest import run_cli
from tests.fakes import generation, image_text
from tests.helpers import WorkerProcess, blob_names, poison_entries, read_blob
from tests.rig import JOB, Rig, policies

TXT2IMG = "/sdapi/v1/txt2img"
# SIDECAR_IMAGE_FORMAT -> (A1111's samples_format, content type, what Pillow reads)
FORMATS = {
    "png": ("png", "image/png", "PNG"),
    "webp": ("webp", "image/webp", "WEBP"),
    "jpeg": ("jpg", "image/jpeg", "JPEG"),
}
USER_COMMENT, EXIF_IFD = 0x9286, 0x8769


def embedded_parameters(image: Image.Image) -> str:
    """A1111's infotext as stored in the file: PNG text chunk, or piexif's UNICODE UserComment."""
    if image.format == "PNG":
        return str(image.text["parameters"])  # type: ignore[attr-defined]
    comment = image.getexif().get_ifd(EXIF_IFD)[USER_COMMENT]
    assert comment.startswith(b"UNICODE\0"), comment[:16]
    return str(comment[8:].decode("utf-16-be"))


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture
async def a1111(standin: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The shared stand-in, reset before and after: these tests change its options and faults."""
    async with httpx.AsyncClient(base_url=standin.url, timeout=30.0) as http:
        yield http
        (await http.post("/standin/reset")).raise_for_status()


async def prompts_generated(http: httpx.AsyncClient) -> list[str]:
    return [entry["prompt"] for entry in (await http.get("/standin/stats")).json()["generations_detail"]]


# -- configuration -------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("SIDECAR_") or name == "AZURE_STORAGE_CONNECTION_STRING":
            monkeypatch.delenv(name)
    monkeypatch.setenv("SIDECAR_STORAGE_CONNECTION_STRING", "UseDevelopmentStorage=true")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SIDECAR_IMAGE_FORMAT", "gif"),
        ("SIDECAR_IMAGE_FORMAT", ""),
        ("SIDECAR_IMAGE_QUALITY", "0"),
        ("SIDECAR_IMAGE_QUALITY", "101"),
        ("SIDECAR_IMAGE_QUALITY", "high"),
    ],
)
def test_a_bad_format_or_quality_names_the_variable_in_one_line(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert str(refused.value).startswith(f"{variable}:") and "\n" not in str(refused.value)


def test_format_defaults_and_spellings(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert (settings.image_format, settings.image_quality) == ("png", 80)  # A1111's jpeg_quality default
    for spelling in ("jpeg", "JPEG", "jpg", " Jpg "):
        monkeypatch.setenv("SIDECAR_IMAGE_FORMAT", spelling)
        assert load_settings().image_format == "jpeg"
    monkeypatch.setenv("SIDECAR_IMAGE_FORMAT", "WebP")
    monkeypatch.setenv("SIDECAR_IMAGE_QUALITY", "100")
    assert (load_settings().image_format, load_settings().image_quality) == ("webp", 100)


def test_the_worker_refuses_to_start_on_a_bad_format() -> None:
    env = {"SIDECAR_STORAGE_CONNECTION_STRING": "x", "SIDECAR_IMAGE_FORMAT": "tiff", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"], env=env, capture_output=True, text=True, timeout=60
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "SIDECAR_IMAGE_FORMAT" in lines[0], done.stderr


# -- the worker, end to end ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
async def test_images_are_stored_in_the_configured_format(
    make_settings: Any, a1111: httpx.AsyncClient, fmt: str
) -> None:
    option, content_type, pillow = FORMATS[fmt]
    settings = make_settings(image_format=fmt, image_quality=55)
    storage = Storage.connect(settings)
    try:
        await storage.ensure()
        job: dict[str, Any] = {
            "id": f"fmt-{fmt}",
            "prompt": "a lighthouse in fog",
            "batch_size": 2,
            "width": 320,
            "height": 256,
        }
        await storage.send(settings.queue_name[0], json.dumps(job))
        assert await run_worker(settings, exit_when_empty=True) == 0

        names = [f"fmt-{fmt}/0.{fmt}", f"fmt-{fmt}/1.{fmt}"]
        assert await blob_names(storage) == [*names, f"fmt-{fmt}/job.json"]
        record = json.loads(await read_blob(storage, f"fmt-{fmt}/job.json"))
        assert record["image_format"] == fmt and record["images"] == names
        for name, infotext in zip(names, record["info"]["infotexts"], strict=True):
            props = await storage.container.get_blob_client(name).get_blob_properties()
            assert props.content_settings.content_type == content_type
            image = opened(await read_blob(storage, name))
            assert (image.format, image.size) == (pillow, (320, 256))
            assert embedded_parameters(image) == infotext
        if pillow == "JPEG":  # encoded at the quality set: the same tables as Pillow's at 55
            reference = io.BytesIO()
            Image.new("RGB", (16, 16)).save(reference, format="JPEG", quality=55)
            assert image.quantization == Image.open(reference).quantization  # type: ignore[attr-defined]
        options = (await a1111.get("/sdapi/v1/options")).json()
        assert (options["samples_format"], options["jpeg_quality"]) == (option, 55)
        # set at start: the job was generated once, in the right format from the first
        assert (await prompts_generated(a1111)).count(job["prompt"]) == 1
        assert await poison_entries(storage, settings.queue_name[0]) == []
    finally:
        await storage.close()


async def test_the_finisher_stores_only_what_the_generation_was_checked_to_be() -> None:
    """The last guard: an image whose bytes are not of the generation's format is never stored."""
    rig = Rig(policies())
    try:
        webp = b"RIFF\x24\x00\x00\x00WEBPVP8 fake"
        made = generation()  # a PNG
        made.image_format = IMAGE_FORMATS["webp"]
        await rig.finisher.finish(await rig.hold({**JOB, "id": "wrong"}), made)
        assert rig.store.blobs == {} and rig.book.outcomes == {"retried": 1}
        made.images = [image_text(webp)]
        await rig.finisher.finish(await rig.hold({**JOB, "id": "right"}), made)
        assert rig.store.blobs["right/0.webp"] == (webp, "image/webp")
        assert json.loads(rig.store.blobs["right/job.json"][0])["image_format"] == "webp"
    finally:
        rig.close()


async def test_a_format_changed_behind_the_workers_back_is_set_again_and_never_stored(
    make_settings: Any, a1111: httpx.AsyncClient, tmp_path: Path
) -> None:
    settings = make_settings(image_format="webp")
    queue = settings.queue_name[0]
    storage = Storage.connect(settings)
    worker = WorkerProcess(settings, "--max-jobs", "2", log_dir=tmp_path)
    try:
        await storage.ensure()
        await storage.send(queue, json.dumps({"id": "before", "prompt": "a quiet harbour"}))
        await worker.wait_for(lambda: "before" in worker.done_jobs(), what="the first job")
        # someone (the web UI, another client) switches A1111 to PNG while the worker runs
        (await a1111.post("/sdapi/v1/options", json={"samples_format": "png"})).raise_for_status()
        await storage.send(queue, json.dumps({"id": "after", "prompt": "a windmill at noon"}))
        assert await worker.wait_exit() == 0, worker.tail()

        names = await blob_names(storage)
        assert names == ["after/0.webp", "after/job.json", "before/0.webp", "before/job.json"]
        image = opened(await read_blob(storage, "after/0.webp"))
        assert image.format == "WEBP"
        props = await storage.container.get_blob_client("after/0.webp").get_blob_properties()
        assert props.content_settings.content_type == "image/webp"
        warnings = [
            entry
            for entry in worker.lines()
            if entry["level"] == "warning" and entry["msg"].startswith("A1111 sent png images where webp")
        ]
        assert len(warnings) == 1, worker.tail()
        # the PNG generation was thrown away and the job made again, after the option was set again
        assert (await prompts_generated(a1111)).count("a windmill at noon") == 2
        assert (await a1111.get("/sdapi/v1/options")).json()["samples_format"] == "webp"
        assert json.loads(await read_blob(storage, "after/job.json"))["dequeue_count"] == 1
    finally:
        worker.stop()
        await storage.close()


async def test_a_format_that_will_not_hold_fails_the_try_and_stores_nothing(
    make_settings: Any, a1111: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Something on the node keeps A1111 at PNG: each generation is made FORMAT_REMAKES more times
    with the option set again, then the try fails (the job is handed back, not poisoned); once the
    node lets go, the job is stored in the right format."""
    settings = make_settings(image_format="jpeg", release_delay=2, max_dequeue_count=10)
    queue = settings.queue_name[0]
    storage = Storage.connect(settings)
    worker = WorkerProcess(settings, "--max-jobs", "1", log_dir=tmp_path)
    try:
        await storage.ensure()
        await worker.wait_for(lambda: bool(worker.messages("A1111 is ready")), what="the start")
        faults = {"pinned_options": {"samples_format": "png"}}
        (await a1111.post("/standin/faults", json=faults)).raise_for_status()
        await storage.send(queue, json.dumps({"id": "stuck", "prompt": "a red kite"}))
        await worker.wait_for(
            lambda: any(e["msg"].startswith("job failed, retried in") for e in worker.lines()),
            what="the failed try",
        )
        (await a1111.post("/standin/faults", json={"pinned_options": {}})).raise_for_status()
        failed = [entry for entry in worker.lines() if entry["msg"].startswith("job failed, retried in")]
        assert (
            failed[0]["job_id"] == "stuck" and "A1111 sent png images where jpeg was set" in failed[0]["msg"]
        )
        assert (await prompts_generated(a1111)).count("a red kite") >= FORMAT_REMAKES + 1
        # nothing of the PNG generations was stored (only the note of the failed try)
        assert [name for name in await blob_names(storage) if not name.startswith("_failures/")] == []
        assert await worker.wait_exit() == 0, worker.tail()

        assert await blob_names(storage) == ["stuck/0.jpeg", "stuck/job.json"]
        assert opened(await read_blob(storage, "stuck/0.jpeg")).format == "JPEG"
        record = json.loads(await read_blob(storage, "stuck/job.json"))
        assert record["image_format"] == "jpeg" and record["dequeue_count"] >= 2
        assert await poison_entries(storage, queue) == []
    finally:
        worker.stop()
        await storage.close()


async def test_an_a1111_that_will_not_keep_the_format_stops_the_start_in_one_line(
    make_settings: Any, a1111: httpx.AsyncClient
) -> None:
    faults = {"pinned_options": {"samples_format": "png"}}
    (await a1111.post("/standin/faults", json=faults)).raise_for_status()
    done = run_cli(make_settings(image_format="webp"), "run")
    assert done.returncode == 3, done.stderr
    errors = [json.loads(line)["msg"] for line in done.stderr.splitlines() if '"level": "error"' in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert errors[0].startswith("A1111 is not usable: A1111 did not keep its image format")
    assert "'samples_format': 'webp'" in errors[0] and "'samples_format': 'png'" in errors[0]
    stats = (await a1111.get("/standin/stats")).json()
    assert stats["received"] == []  # not even the warm-up: the format is set before it


# -- the stand-in, as A1111 encodes --------------------------------------------------------------


async def image_of(http: httpx.AsyncClient, body: dict[str, Any]) -> tuple[Image.Image, str]:
    response = await http.post(TXT2IMG, json={"prompt": "a teapot", "width": 64, "height": 64, **body})
    assert response.status_code == 200, response.text
    return opened(base64.b64decode(response.json()["images"][0])), json.loads(response.json()["info"])[
        "infotexts"
    ][0]


async def test_a_per_request_samples_format_does_not_change_the_encoding(a1111: httpx.AsyncClient) -> None:
    """As in A1111: process_images restores the overrides before the API encodes, so only the
    global option counts (unless the request asks not to restore them)."""
    image, infotext = await image_of(a1111, {"override_settings": {"samples_format": "jpg"}})
    assert image.format == "PNG" and embedded_parameters(image) == infotext
    assert (await a1111.get("/sdapi/v1/options")).json()["samples_format"] == "png"

    await a1111.post("/sdapi/v1/options", json={"samples_format": "webp", "jpeg_quality": 90})
    image, infotext = await image_of(a1111, {"override_settings": {"samples_format": "png"}})
    assert image.format == "WEBP" and embedded_parameters(image) == infotext

    kept = {"override_settings": {"samples_format": "jpg"}, "override_settings_restore_afterwards": False}
    image, infotext = await image_of(a1111, kept)
    assert image.format == "JPEG" and embedded_parameters(image) == infotext
    assert (await a1111.get("/sdapi/v1/options")).json()["samples_format"] == "jpg"


async def test_an_unknown_samples_format_is_a1111s_500(a1111: httpx.AsyncClient) -> None:
    await a1111.post("/sdapi/v1/options", json={"samples_format": "gif"})
    response = await a1111.post(TXT2IMG, json={"prompt": "x", "width": 64, "height": 64})
    assert response.status_code == 500
    assert response.json() == {
        "error": "HTTPException",
        "detail": "Invalid image format",
        "body": "",
        "errors": "",
    }
    assert (await a1111.post(TXT2IMG, json={"prompt": "x", "send_images": False})).status_code == 200


def idat_stream(png: bytes) -> bytes:
    """The PNG's IDAT chunks joined (each chunk's CRC checked on the way)."""
    at, data = 8, b""
    while at < len(png):
        (length,), kind = struct.unpack(">I", png[at : at + 4]), png[at + 4 : at + 8]
        body, crc = png[at + 8 : at + 8 + length], png[at + 8 + length : at + 12 + length]
        assert struct.unpack(">I", crc)[0] == zlib.crc32(kind + body), kind
        data += body if kind == b"IDAT" else b""
        at += 12 + length
    return data


async def test_each_image_is_labelled_with_its_prompt_seed_and_size(a1111: httpx.AsyncClient) -> None:
    """The label band differs with the prompt and the seed; below it the pooled canvas is the same
    (seeds 5 and 13 share a canvas); the PNG's zlib stream, spliced from two parts, is whole."""

    async def pixels(prompt: str, seed: int) -> tuple[bytes, bytes]:
        body = {"prompt": prompt, "seed": seed, "width": 512, "height": 512}
        png = base64.b64decode((await a1111.post(TXT2IMG, json=body)).json()["images"][0])
        zlib.decompress(idat_stream(png))  # raises on a wrong Adler-32 or a broken stream
        return opened(png).convert("RGB").tobytes(), png

    band = 512 * 3 * 40  # the label's first lines
    first, png = await pixels("a lighthouse in fog", 5)
    assert opened(png).size == (512, 512)
    other_prompt, _ = await pixels("a windmill at noon", 5)
    other_seed, _ = await pixels("a lighthouse in fog", 13)
    assert first[:band] != other_prompt[:band] and first[:band] != other_seed[:band]
    assert first[512 * 3 * 200 :] == other_prompt[512 * 3 * 200 :] == other_seed[512 * 3 * 200 :]
    white = sum(1 for i in range(0, band, 3) if first[i : i + 3] == b"\xff\xff\xff")
    assert white > 100  # ink on the bar
    again, _ = await pixels("a lighthouse in fog", 5)
    assert again == first  # the same job draws the same image


def test_adler32_of_two_parts_is_that_of_the_whole() -> None:
    rng = random.Random(3)
    for _ in range(50):
        first, second = rng.randbytes(rng.randrange(0, 3000)), rng.randbytes(rng.randrange(0, 200_000))
        assert adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second)) == zlib.adler32(
            first + second
        )
