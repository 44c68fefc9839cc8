"""Sharding: SIDECAR_QUEUE_NAME lists several queues. ``enqueue`` spreads jobs over them round-robin;
the worker polls them all fairly, backs off on empty ones and poisons onto each shard's own queue."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.app import run_worker
from sidecar.config import Settings
from sidecar.enqueue import enqueue, generated
from sidecar.storage import Storage
from tests.conftest import run_cli
from tests.helpers import WorkerProcess, blob_names, poison_entries, queue_length, read_blob

SEED_JOB = json.loads((Path(__file__).parent / "data" / "seed_job.json").read_text())
RECEIVES = re.compile(r'^sidecar_receives_total\{result="(?:messages|empty)"\} (\S+)$', re.MULTILINE)


def sharded(make_settings: Any, count: int = 3, **overrides: Any) -> Settings:
    tag = uuid.uuid4().hex[:8]
    names = ",".join(f"{letter}-{tag}" for letter in "abcdefgh"[:count])
    return make_settings(queue_name=names, **overrides)  # type: ignore[no-any-return]


async def test_jobs_spread_over_shards_are_all_done_once_and_none_starves(
    make_settings: Any, standin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps: 30 generated jobs over 3 queues (10 each); one worker drains them. Every job's blobs
    exist exactly once, every queue and poison queue is empty, and the first 9 jobs finished came
    from all three queues: no shard waits for another to drain."""
    settings = sharded(make_settings)
    queues = settings.queue_name
    storage = Storage.connect(settings)
    try:
        await storage.ensure()
        report = await enqueue(storage, queues, generated(30, seed=5))
        assert report.sent == 30 and report.per_queue == dict.fromkeys(queues, 10)
        assert [await queue_length(storage, q) for q in queues] == [10, 10, 10]

        caplog.set_level(logging.INFO, logger="sidecar")
        assert await run_worker(settings, exit_when_empty=True) == 0

        ids = [json.loads(text)["id"] for _, text in generated(30, seed=5)]
        assert await blob_names(storage) == sorted(
            f"{i}/{name}" for i in ids for name in ("0.png", "job.json")
        )
        queue_of = {}
        for job_id in ids:
            record = json.loads(await read_blob(storage, f"{job_id}/job.json"))
            queue_of[job_id] = record["queue"]
        assert Counter(queue_of.values()) == dict.fromkeys(queues, 10)

        finished = [r.__dict__["job_id"] for r in caplog.records if r.getMessage() == "job done"]
        assert sorted(finished) == sorted(ids)  # each once
        assert {queue_of[job_id] for job_id in finished[:9]} == set(queues), finished[:9]
        for queue in queues:
            assert await queue_length(storage, queue) == 0
            assert await queue_length(storage, settings.poison_queue_for(queue)) == 0
    finally:
        await storage.close()

    # status shows every shard and its poison queue
    shown = await asyncio.to_thread(run_cli, settings, "status")
    assert shown.returncode == 0, shown.stderr
    for queue in queues:
        assert re.search(rf"^  {queue}\s+0\s+0$", shown.stdout, re.MULTILINE), shown.stdout
    assert re.search(r"all 3 shards\s+0\s+0", shown.stdout) and "30 jobs, 30 images" in shown.stdout


async def receives(port: int) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    return sum(float(found) for found in RECEIVES.findall(text))  # with messages or empty


async def test_empty_shards_are_polled_with_backoff_not_in_a_hot_loop(
    make_settings: Any, standin: Any, tmp_path: Path
) -> None:
    """Steps: the worker as a process on 3 empty queues, polling from 0.1 s backing off to 1 s; once
    ready, it keeps polling (at least 3 receives, however long a loaded machine takes), and over the
    time watched (at least 3 s, measured) it makes at most one receive a second per queue plus the
    back-off's first steps (a hot loop would make thousands)."""
    settings = sharded(make_settings, poll_interval_min=0.1, poll_interval_max=1.0)
    worker = WorkerProcess(settings, log_dir=tmp_path)
    try:
        await worker.wait_for(lambda: bool(worker.messages("starting")), what="the starting line")
        port = int(worker.messages("starting")[0]["http_port"])

        async def ready() -> bool:
            async with httpx.AsyncClient() as http:
                try:
                    return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

        deadline = time.monotonic() + 30
        while not await ready():
            assert time.monotonic() < deadline and worker.proc.poll() is None, worker.tail()
            await asyncio.sleep(0.05)
        before, started = await receives(port), time.monotonic()
        while (polled := await receives(port) - before) < 3 or time.monotonic() - started < 3.0:
            assert time.monotonic() - started < 60, f"only {polled} receives in 60 s"
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started  # after the last read: a slow read only raises the bound
        # per queue: the back-off's steps (0.1 + 0.2 + 0.4 + 0.8 s), then one receive a second
        assert polled <= 3 * (elapsed / 1.0 + 5), f"{polled} receives in {elapsed:.1f} s"
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit() == 0
    finally:
        worker.stop()


async def test_a_poisoned_job_lands_on_its_own_shards_poison_queue(
    make_settings: Any, own_standin: Any
) -> None:
    """Steps: an A1111 that refuses unknown samplers; shard b gets a job naming one, shard c a job
    with an unknown field, shard a a good job. b's poison queue holds the refused job, c's the invalid
    one, a's nothing; the good job is done."""
    async with own_standin(0.02, ["--strict-samplers"]) as strict:
        settings = sharded(make_settings, a1111_url=strict.url)
        a, b, c = settings.queue_name
        storage = Storage.connect(settings)
        try:
            await storage.ensure()
            await storage.send(a, json.dumps({**SEED_JOB, "id": "fine"}))
            await storage.send(b, json.dumps({**SEED_JOB, "id": "odd", "sampler_name": "Euler z"}))
            await storage.send(c, json.dumps({**SEED_JOB, "id": "extra", "colour": "red"}))
            assert await run_worker(settings, exit_when_empty=True) == 0

            assert await poison_entries(storage, a) == []
            [refused] = await poison_entries(storage, b)
            assert refused["job_id"] == "odd" and refused["error"]["type"] == "UnknownAsset"
            assert json.loads(refused["original"])["sampler_name"] == "Euler z"
            [invalid] = await poison_entries(storage, c)
            assert invalid["error"]["type"] == "InvalidJob" and invalid["error"]["detail"].startswith(
                "colour:"
            )
            assert await blob_names(storage) == ["fine/0.png", "fine/job.json"]
            assert [await queue_length(storage, q) for q in (a, b, c)] == [0, 0, 0]
        finally:
            await storage.close()
