"""``status`` after a real run, and the result messages the worker sends (the contract's keys)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from sidecar.app import run_worker
from sidecar.config import Settings
from sidecar.status import Shard, Snapshot, compare, render
from sidecar.storage import Storage
from tests.conftest import ROOT, run_cli, settings_env
from tests.helpers import visible_messages

SEED_JOB = json.loads((Path(__file__).parent / "data" / "seed_job.json").read_text())
RESULT_KEYS = {"job_id", "status", "blobs", "seeds", "timings"}


async def test_status_and_result_messages_after_a_small_run(make_settings: Any, own_standin: Any) -> None:
    """Steps: an A1111 that refuses unknown samplers; 3 good jobs and 1 naming an unknown sampler, with
    a result queue. After the run, status shows the empty queue, 1 poisoned with its reason, 3 jobs and
    images stored and finished in the last minute, 4 result messages; the result messages carry the
    contract's keys for success and for failure."""
    async with own_standin(0.02, ["--strict-samplers"]) as strict:
        settings = make_settings(a1111_url=strict.url, result_queue_name=f"results-{uuid.uuid4().hex[:8]}")
        queue, results = settings.queue_name[0], settings.result_queue_name
        storage = Storage.connect(settings)
        try:
            await storage.ensure()
            for index in range(3):
                await storage.send(queue, json.dumps({**SEED_JOB, "id": f"ok-{index}"}))
            await storage.send(queue, json.dumps({**SEED_JOB, "id": "odd", "sampler_name": "Euler z"}))
            assert await run_worker(settings, exit_when_empty=True) == 0

            shown = await asyncio.to_thread(run_cli, settings, "status")
            assert shown.returncode == 0, shown.stderr
            out = shown.stdout
            assert re.search(rf"^  {queue}\s+0\s+1$", out, re.MULTILINE), out
            assert re.search(r"1 x UnknownAsset: sampler .Euler z.", out), out
            assert re.search(rf"results queue {results}\s+4 messages", out), out
            assert "3 jobs, 3 images" in out and "finished in the last minute: 3 jobs" in out

            as_json = await asyncio.to_thread(run_cli, settings, "status", "--json")
            assert as_json.returncode == 0, as_json.stderr
            snap = json.loads(as_json.stdout)
            assert (snap["depth"], snap["poison_depth"], snap["results_depth"]) == (0, 1, 4)
            assert (snap["stored_jobs"], snap["stored_images"], snap["scan_capped"]) == (3, 3, False)

            capped = await asyncio.to_thread(run_cli, settings, "status", "--scan-limit", "2")
            assert "listing stopped at 2 blobs" in capped.stdout and "+ jobs" in capped.stdout

            messages = [json.loads(text) for text in await visible_messages(storage, results)]
        finally:
            await storage.close()

    by_id = {message["job_id"]: message for message in messages}
    assert sorted(by_id) == ["odd", "ok-0", "ok-1", "ok-2"]
    for index in range(3):
        done = by_id[f"ok-{index}"]
        assert set(done) == RESULT_KEYS and done["status"] == "succeeded"
        assert done["blobs"] == [f"ok-{index}/0.png", f"ok-{index}/job.json"]
        assert len(done["seeds"]) == 1 and isinstance(done["seeds"][0], int)
        assert {"generate_s", "upload_s", "total_s"} <= set(done["timings"])
    failed = by_id["odd"]
    assert set(failed) == RESULT_KEYS | {"error"} and failed["status"] == "failed"
    assert failed["blobs"] == [] and failed["seeds"] == []
    assert failed["error"]["type"] == "UnknownAsset" and "'Euler z'" in failed["error"]["detail"]


async def test_status_before_anything_exists(make_settings: Any) -> None:
    settings = make_settings(queue_name=f"a-{uuid.uuid4().hex[:8]},b-{uuid.uuid4().hex[:8]}")
    shown = await asyncio.to_thread(run_cli, settings, "status")
    assert shown.returncode == 1  # what does not exist is an error: a typo in a name, or nothing set up
    for queue in settings.queue_name:
        assert re.search(rf"^  {queue}\s+missing\s+missing$", shown.stdout, re.MULTILINE), shown.stdout
        assert f"queue {queue} " in shown.stderr or f"queue {queue}," in shown.stderr, shown.stderr
    assert "does not exist yet" in shown.stdout


def test_storage_out_of_reach_is_one_line_and_exit_1(make_settings: Any) -> None:
    settings = make_settings(
        storage_connection_string=(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
            "BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;QueueEndpoint=http://127.0.0.1:9/devstoreaccount1;"
        ),
        retry_budget=0.5,
    )
    shown = run_cli(settings, "status")
    assert shown.returncode == 1
    assert shown.stderr.startswith("status: cannot read storage:") and "Traceback" not in shown.stderr


async def test_watch_refreshes_with_rates(settings: Settings, storage: Storage) -> None:
    """Steps: ``status --watch --json`` as a process; once its first snapshot is out, a job arrives;
    the refreshes after the first carry rates, one shows the job and one more follows; Ctrl-C ends it."""
    watch = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "sidecar", "status", "--watch", "--json", "--interval", "0.3"),
        env=settings_env(settings),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout = watch.stdout
    assert stdout is not None
    lines: list[str] = []

    async def next_snapshot() -> dict[str, Any]:
        line = await asyncio.wait_for(stdout.readline(), timeout=60)
        assert line, "status --watch ended early"
        lines.append(line.decode())
        return dict(json.loads(line))

    try:
        await next_snapshot()
        await storage.send(settings.queue_name[0], json.dumps(SEED_JOB))
        shown_by = time.monotonic() + 60
        while (await next_snapshot())["depth"] != 1:
            assert time.monotonic() < shown_by, "no snapshot showed the job"
        await next_snapshot()
    finally:
        watch.send_signal(signal.SIGINT)
        out_bytes, err = await asyncio.wait_for(watch.communicate(), timeout=30)
    assert watch.returncode == 130, err
    out = "".join(lines) + out_bytes.decode()
    snaps = [json.loads(line) for line in out.splitlines()]
    assert len(snaps) >= 3, out
    assert snaps[0]["rates"] is None and all(snap["rates"] is not None for snap in snaps[1:])
    assert snaps[0]["depth"] == 0 and snaps[-1]["depth"] == 1
    assert min(snap["rates"]["drained"] for snap in snaps[1:]) < 0  # the queue grew


def test_rates_between_two_snapshots() -> None:
    now = time.time()
    before = Snapshot(now - 60, [Shard("a", 1_000, "a-poison", 0)], results_queue="r", results_depth=10)
    after = Snapshot(now, [Shard("a", 880, "a-poison", 2)], results_queue="r", results_depth=125)
    before.scan_limit = after.scan_limit = 100
    before.stored_jobs, after.stored_jobs = 50, 168
    rates = compare(after, before)
    assert rates is not None
    assert (rates.drained, rates.results, rates.stored) == (120, 115, 118)
    assert rates.empty_in_s is not None and round(rates.empty_in_s) == 440  # 880 at 120/min
    after.rates = rates
    text = render(after)
    assert "queues drained 120 (empty in ~7m20s)" in text and "results queue +115" in text
    after.scan_capped = True  # a capped listing gives no stored rate
    assert compare(after, before).stored is None  # type: ignore[union-attr]
