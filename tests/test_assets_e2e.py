"""The image that was asked for, or none: jobs naming what this node's A1111 lacks are never run
without it, and a generation an interrupt may have cut short is never stored.

Real A1111 v1.10.1 answers 200 to a missing LoRA, a missing checkpoint or an unknown sampler and
silently does something else; the stand-in does the same, so only the worker's own checks stand
between such a job and a wrong image stored as a success."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import Settings
from sidecar.storage import Storage
from tests.helpers import (
    WorkerProcess,
    blob_names,
    poison_entries,
    read_blob,
    standin_call,
)

JOB = {"prompt": "a red bicycle", "sampler_name": "k_euler_a", "steps": 2}


async def run_to_exit(settings: Settings, tmp_path: Path, *args: str, timeout: float = 60) -> WorkerProcess:
    worker = WorkerProcess(settings, *args, log_dir=tmp_path)
    try:
        await worker.wait_exit(timeout)
    finally:
        worker.stop()
    return worker


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"prompt": "a red bicycle <lora:not_here:0.7>"}, ["LoRA 'not_here'", "prompt"]),
        ({"negative_prompt": "blurry <lora:not_there:1>"}, ["LoRA 'not_there'", "negative_prompt"]),
        ({"override_settings": {"sd_model_checkpoint": "dreamshaper_8"}}, ["'dreamshaper_8'", "checkpoint"]),
        ({"override_settings": {"sd_vae": "kl-f8-anime2.safetensors"}}, ["'kl-f8-anime2", "sd_vae"]),
        ({"restore_faces": True}, ["restore_faces"]),
    ],
    ids=["lora", "negative-lora", "checkpoint", "vae", "restore-faces"],
)
async def test_a_job_naming_what_this_node_lacks_is_never_run(
    make_settings: Any,
    storage: Storage,
    settings: Settings,
    standin: Any,
    tmp_path: Path,
    change: dict[str, Any],
    words: list[str],
) -> None:
    """Steps: with one dequeue allowed, a job naming an asset the stand-in lacks is handed back once and
    then poisoned, with a reason naming the asset and the field; A1111 never generates it."""
    run_settings = make_settings(max_dequeue_count=1, asset_refresh_interval=0)
    queue = run_settings.queue_name[0]
    await storage.send(queue, json.dumps({**JOB, "id": "lacking", **change}))
    worker = await run_to_exit(run_settings, tmp_path, "--exit-when-empty")
    assert worker.proc.returncode == 0, worker.tail()
    assert worker.done_jobs() == []
    (entry,) = await poison_entries(storage, queue)
    assert entry["job_id"] == "lacking" and entry["error"]["type"] == "AssetMissing"
    for word in words:
        assert word in entry["error"]["detail"], entry["error"]["detail"]
    assert await blob_names(storage) == []
    stats = await standin_call(run_settings.a1111_url, "GET", "/standin/stats")
    assert stats["requests"] == 1, "only the warm-up reached A1111"


async def test_a_lora_copied_onto_the_node_is_found_and_the_job_runs(
    make_settings: Any, storage: Storage, settings: Settings, own_standin: Any, tmp_path: Path
) -> None:
    """Steps: the job's LoRA is not on the node: the job is handed back (not a failure, not poisoned).
    The LoRA is then copied onto the node (listed only after A1111 rescans its folder): on its next
    try the worker's rescan finds it and the job is stored."""
    async with own_standin(0.05, ["--loras", ""]) as a1111:
        run_settings = make_settings(
            a1111_url=a1111.url, release_delay=2, asset_refresh_interval=0, max_dequeue_count=5
        )
        queue = run_settings.queue_name[0]
        await storage.send(queue, json.dumps({**JOB, "id": "late", "prompt": "a cat <lora:late_lora:0.6>"}))
        worker = WorkerProcess(run_settings, "--max-jobs", "1", log_dir=tmp_path)
        try:
            await worker.wait_for(lambda: bool(_handed_back(worker)), what="the job handed back")
            assert "LoRA 'late_lora'" in _handed_back(worker)[0]["msg"]
            await standin_call(
                a1111.url,
                "POST",
                "/standin/assets",
                {"add": [{"kind": "lora", "name": "late_lora", "pending": True}]},
            )
            assert await worker.wait_exit(30) == 0, worker.tail()
        finally:
            worker.stop()
    assert worker.done_jobs() == ["late"]
    record = json.loads(await read_blob(storage, "late/job.json"))
    assert record["dequeue_count"] == 2
    assert await poison_entries(storage, queue) == []
    stopped = worker.messages("stopped")[0]
    assert stopped.get("deferred") == 1 and not stopped.get("retried")


def _handed_back(worker: WorkerProcess) -> list[dict[str, Any]]:
    return [e for e in worker.lines() if e["msg"].startswith("handed back for another node")]


async def test_a_generation_an_interrupt_may_have_cut_short_is_made_again_never_stored(
    make_settings: Any, storage: Storage, settings: Settings, own_standin: Any, tmp_path: Path
) -> None:
    """Steps: queue-ahead on; the first job hangs in A1111 past its 2 s deadline while the second waits
    behind it at A1111's queue lock. The worker interrupts A1111. Real A1111 answers an interrupted
    generation with 200 and a partly denoised image: the timed-out job is given back, and the job that
    was queued behind it (which the interrupt may have hit) is generated again in full. No stored
    image comes from a generation the stand-in reports as interrupted."""
    async with own_standin(0.3) as a1111:
        run_settings = make_settings(a1111_url=a1111.url, generation_timeout=2, prefetch=2)
        queue = run_settings.queue_name[0]
        worker = WorkerProcess(run_settings, "--max-jobs", "3", log_dir=tmp_path)
        try:
            await worker.wait_for(lambda: bool(worker.messages("A1111 is ready")), what="warm-up")
            await standin_call(a1111.url, "POST", "/standin/faults", {"hang_next": 1})
            for index, seed in enumerate((101, 202, 303)):
                await storage.send(queue, json.dumps({**JOB, "id": f"cut-{index}", "seed": seed}))
            assert await worker.wait_exit(60) == 0, worker.tail()
        finally:
            worker.stop()
        stats = await standin_call(a1111.url, "GET", "/standin/stats")
    assert sorted(worker.done_jobs()) == ["cut-0", "cut-1", "cut-2"]
    interrupted = [g for g in stats["generations_detail"] if g["interrupted"]]
    assert interrupted, "the hang was never interrupted: the test did not test an interrupt"
    cut = {g["job_timestamp"] for g in interrupted}
    for index in range(3):
        info = json.loads(await read_blob(storage, f"cut-{index}/job.json"))["info"]
        assert info["job_timestamp"] not in cut, f"cut-{index} was stored from an interrupted generation"
    remade = [e for e in worker.lines() if "generating it again" in e["msg"]]
    assert [e["job_id"] for e in remade] == ["cut-1"], "the job queued behind the hung one was not remade"


async def test_the_catalog_is_read_once_a1111_is_ready(
    make_settings: Any, storage: Storage, settings: Settings, standin: Any, tmp_path: Path
) -> None:
    """A job that names only what the node has runs at once: no rescans, no hand-backs."""
    run_settings = make_settings()
    await storage.send(
        run_settings.queue_name[0],
        json.dumps(
            {
                **JOB,
                "id": "fine",
                "prompt": "a cat <lora:add_detail:0.5>",
                "override_settings": {"sd_model_checkpoint": "v1-5-pruned-emaonly"},
            }
        ),
    )
    worker = await run_to_exit(run_settings, tmp_path, "--exit-when-empty")
    assert worker.done_jobs() == ["fine"] and not _handed_back(worker)
