"""The worker end to end on real Azurite and the stand-in A1111 as a real HTTP server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from sidecar.app import run_worker
from sidecar.config import Settings
from sidecar.storage import Storage
from tests.conftest import run_cli
from tests.helpers import blob_names, poison_entries, queue_length, read_blob

SEED_JOB = (Path(__file__).parent / "data" / "seed_job.json").read_text().strip()


async def stand_in_received(settings: Settings) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=settings.a1111_url) as http:
        stats = (await http.get("/standin/stats")).json()
    # The worker's warm-up generation comes first; keep only the jobs' requests.
    return [body for body in stats["received"] if body.get("prompt") != "warm-up"]


def png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


@pytest.fixture(params=[0, 1], ids=["sequential", "pipelined"])
def prefetch(request: pytest.FixtureRequest) -> int:
    return int(request.param)


async def test_seed_job_verbatim(make_settings: Any, standin: Any, prefetch: int) -> None:
    settings = make_settings(prefetch=prefetch)
    storage = Storage.connect(settings)
    try:
        await storage.ensure()
        queue = settings.queue_name[0]
        sent = await storage.queue(queue).send_message(SEED_JOB)
        assert await run_worker(settings, exit_when_empty=True) == 0

        job_id = sent.id
        assert await blob_names(storage) == [f"{job_id}/0.png", f"{job_id}/job.json"]
        assert png_size(await read_blob(storage, f"{job_id}/0.png")) == (512, 512)
        props = await storage.container.get_blob_client(f"{job_id}/0.png").get_blob_properties()
        assert props.content_settings.content_type == "image/png"

        record = json.loads(await read_blob(storage, f"{job_id}/job.json"))
        assert record["job"] == json.loads(SEED_JOB)
        assert record["job_id"] == job_id and record["message_id"] == job_id
        assert record["info"]["all_seeds"] and set(record["timings"]) >= {"generate_s", "upload_s"}
        assert record["worker"]["id"] == settings.worker_id

        received = await stand_in_received(settings)
        assert len(received) == 1
        assert received[0]["sampler_name"] == "Euler a"
        assert received[0]["steps"] == 15 and received[0]["cfg_scale"] == 7
        assert "<lora:add_detail:0.6>" in received[0]["prompt"]
        assert await queue_length(storage, queue) == 0
        assert await poison_entries(storage, queue) == []
    finally:
        await storage.close()


async def test_base64_message_is_processed_the_same(
    settings: Settings, storage: Storage, standin: Any
) -> None:
    queue = settings.queue_name[0]
    encoded = base64.b64encode(SEED_JOB.encode()).decode()
    sent = await storage.queue(queue).send_message(encoded)
    assert await run_worker(settings, exit_when_empty=True) == 0
    assert await blob_names(storage) == [f"{sent.id}/0.png", f"{sent.id}/job.json"]
    record = json.loads(await read_blob(storage, f"{sent.id}/job.json"))
    assert record["job"] == json.loads(SEED_JOB)
    assert (await stand_in_received(settings))[0]["sampler_name"] == "Euler a"
    assert await queue_length(storage, queue) == 0


async def test_batch_of_two_gives_two_images(settings: Settings, storage: Storage, standin: Any) -> None:
    job = {**json.loads(SEED_JOB), "id": "pair-1", "batch_size": 2, "width": 640, "height": 384}
    await storage.send(settings.queue_name[0], json.dumps(job))
    assert await run_worker(settings, exit_when_empty=True) == 0
    assert await blob_names(storage) == ["pair-1/0.png", "pair-1/1.png", "pair-1/job.json"]
    first, second = await read_blob(storage, "pair-1/0.png"), await read_blob(storage, "pair-1/1.png")
    assert png_size(first) == png_size(second) == (640, 384)
    assert first != second
    record = json.loads(await read_blob(storage, "pair-1/job.json"))
    assert len(record["info"]["all_seeds"]) == 2


@pytest.mark.parametrize("prefetch_setting", [0, 2])
async def test_bad_messages_are_poisoned_and_good_ones_still_run(
    make_settings: Any, standin: Any, prefetch_setting: int
) -> None:
    settings = make_settings(prefetch=prefetch_setting)
    queue = settings.queue_name[0]
    bad = {
        "not json {": "message",
        json.dumps({"prompt": "a cat", "colour": "red"}): "colour",
        json.dumps({"prompt": "a cat", "script_name": "x/y.py", "script_args": []}): "script_name",
        json.dumps({"prompt": "a cat", "steps": 10_000}): "steps",
        json.dumps({"prompt": "a cat", "id": "../../etc"}): "id",
    }
    storage = Storage.connect(settings)
    try:
        await storage.ensure()
        for text in bad:
            await storage.send(queue, text)
        await storage.send(queue, json.dumps({**json.loads(SEED_JOB), "id": "good-after"}))
        assert await run_worker(settings, exit_when_empty=True) == 0

        poisoned = await poison_entries(storage, queue)
        assert sorted(entry["original"] for entry in poisoned) == sorted(bad)
        for entry in poisoned:
            field = bad[entry["original"]]
            assert entry["error"]["type"] == "InvalidJob"
            assert entry["error"]["detail"].startswith(f"{field}:"), entry
            assert entry["message_id"] and entry["dequeue_count"] == 1
        assert await blob_names(storage) == ["good-after/0.png", "good-after/job.json"]
        assert await queue_length(storage, queue) == 0
        assert len(await stand_in_received(settings)) == 1  # nothing bad reached A1111
    finally:
        await storage.close()


async def test_exit_when_empty_as_a_process(settings: Settings, storage: Storage, standin: Any) -> None:
    for index in range(3):
        await storage.send(settings.queue_name[0], json.dumps({**json.loads(SEED_JOB), "id": f"p{index}"}))
    done = await asyncio.to_thread(run_cli, settings, "run", "--exit-when-empty")
    assert done.returncode == 0, done.stderr
    finished = [json.loads(line) for line in done.stderr.splitlines() if '"job done"' in line]
    assert sorted(entry["job_id"] for entry in finished) == ["p0", "p1", "p2"]
    assert await queue_length(storage, settings.queue_name[0]) == 0


async def test_invalid_job_gets_a_failed_result_and_keeps_its_id(make_settings: Any, standin: Any) -> None:
    """Steps: with a result queue, a job refused at validation still gets its completion message
    (status failed, the producer's id) and its poison entry names the same id."""
    settings = make_settings(result_queue_name=f"results-{make_settings().queue_name[0][5:]}")
    storage = Storage.connect(settings)
    try:
        await storage.ensure()
        queue = settings.queue_name[0]
        await storage.send(queue, json.dumps({"id": "bad-1", "prompt": "x", "script_name": "evil.py"}))
        assert await run_worker(settings, exit_when_empty=True) == 0
        [entry] = await poison_entries(storage, queue)
        assert entry["job_id"] == "bad-1"
        peeked = await storage.queue(settings.result_queue_name).peek_messages()
        results = [json.loads(message.content) for message in peeked]
        assert [(r["job_id"], r["status"], r["blobs"]) for r in results] == [("bad-1", "failed", [])]
        assert results[0]["error"]["type"] == "InvalidJob" and "script_name" in results[0]["error"]["detail"]
    finally:
        await storage.close()
