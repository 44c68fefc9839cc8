"""Poison pills and stalls: no message, job or hang can stop a node for long, and none loops forever.

The bar is the Azure Functions queue trigger: the dequeue count is checked when a message is received,
before anything else is done with it, and an exception is contained to its message. Each test runs the
worker as a real process on real Azurite and the stand-in."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import Settings
from sidecar.storage import Storage
from tests.conftest import make_azurite
from tests.helpers import (
    WorkerProcess,
    blob_names,
    poison_entries,
    standin_call,
    standin_generating,
    visible_messages,
    wait_until,
)

JOB = {
    "prompt": "a red bicycle in a quiet alley <lora:add_detail:0.6>",
    "sampler_name": "k_euler_a",
    "steps": 2,
}


def deep(levels: int) -> str:
    return '{"prompt": "x", "a": ' + '{"a": ' * levels + "1" + "}" * levels + "}"


async def run_until_exit(
    settings: Settings, tmp_path: Path, *args: str, timeout: float = 60
) -> WorkerProcess:
    worker = WorkerProcess(settings, *args, log_dir=tmp_path)
    try:
        await worker.wait_exit(timeout)
    finally:
        worker.stop()
    return worker


async def test_a_message_nested_1001_deep_is_poisoned_and_every_good_job_stored(
    make_settings: Any, storage: Storage, settings: Settings, standin: Any, tmp_path: Path
) -> None:
    """Steps: five good jobs with two 1,001-deep messages (an object and an array) between them. Both
    are poisoned on their first receipt with a reason, every good job is stored, the worker never exits
    early (it ran to the drain: exit 0)."""
    queue = settings.queue_name[0]
    for index in range(5):
        await storage.send(queue, json.dumps({**JOB, "id": f"good-{index}"}))
        if index in (1, 3):
            await storage.send(queue, deep(1001) if index == 1 else "[" * 1001 + "]" * 1001)
    worker = await run_until_exit(make_settings(prefetch=4), tmp_path, "--exit-when-empty")
    assert worker.proc.returncode == 0, worker.tail()
    assert sorted(worker.done_jobs()) == [f"good-{index}" for index in range(5)]
    entries = await poison_entries(storage, queue)
    assert len(entries) == 2
    for entry in entries:
        assert entry["dequeue_count"] == 1 and entry["error"]["type"] == "InvalidJob"
        assert entry["error"]["detail"].startswith("message: ")
    assert sorted(len(e["original"]) for e in entries) == sorted([len(deep(1001)), 2002])


async def test_a_message_over_its_dequeue_limit_is_poisoned_on_receipt_with_what_happened_last(
    make_settings: Any, storage: Storage, settings: Settings, standin: Any, tmp_path: Path
) -> None:
    """Steps: two jobs were received three times each by consumers that died (dequeue count 3, the limit
    2); one of those tries had recorded its failure. The worker poisons both on receipt, before
    generating anything, saying how often they were tried and what happened last where it is known."""
    settings = make_settings(max_dequeue_count=2)
    queue = settings.queue_name[0]
    for job_id in ("died-on", "failed-on"):
        await storage.send(queue, json.dumps({**JOB, "id": job_id}))
    for attempt in range(3):
        for message in await storage.receive(queue, 2, 30):
            if attempt == 2 and json.loads(message.content)["id"] == "failed-on":
                await storage.record_failure(
                    message, "A1111ServerError: A1111 answered 500: CUDA out of memory"
                )
            await storage.set_visibility(message, 0)
    worker = await run_until_exit(settings, tmp_path, "--exit-when-empty")
    assert worker.proc.returncode == 0, worker.tail()
    by_id = {entry["job_id"]: entry for entry in await poison_entries(storage, queue)}
    assert set(by_id) == {"died-on", "failed-on"}
    for entry in by_id.values():
        assert entry["error"]["type"] == "TooManyTries" and entry["dequeue_count"] == 4
        assert "received 4 times, more than SIDECAR_MAX_DEQUEUE_COUNT=2" in entry["error"]["detail"]
    assert "a worker may have died on it" in by_id["died-on"]["error"]["detail"]
    assert "last failure: try 3: A1111ServerError" in by_id["failed-on"]["error"]["detail"]
    stats = await standin_call(settings.a1111_url, "GET", "/standin/stats")
    assert stats["requests"] == 1, "only the warm-up: neither job reached A1111"
    assert not [name for name in await blob_names(storage) if name.startswith("_failures/")]


async def test_a_worker_killed_while_its_job_hangs_does_not_stall_the_next_one(
    make_settings: Any, storage: Storage, settings: Settings, own_standin: Any, tmp_path: Path
) -> None:
    """Steps: a job hangs in A1111 and its worker is SIGKILLed. The next worker (generation deadline
    4 s, start timeout 900 s) finds A1111 generating for nobody, interrupts it, and stores the job,
    which comes back when the dead worker's lease runs out, within the generation deadline plus a
    margin: not after the start timeout."""
    async with own_standin(0.05) as a1111:
        base = make_settings(a1111_url=a1111.url, visibility_timeout=3)
        queue = base.queue_name[0]
        first = WorkerProcess(base, log_dir=tmp_path)
        try:
            await first.wait_for(lambda: bool(first.messages("A1111 is ready")), what="warm-up")
            await standin_call(a1111.url, "POST", "/standin/faults", {"hang_next": 1})
            await storage.send(queue, json.dumps({**JOB, "id": "hung"}))
            await wait_until(lambda: standin_generating(a1111.url), what="the job hanging")
            first.signal(signal.SIGKILL)
            await first.wait_exit()
        finally:
            first.stop()
        assert await standin_generating(a1111.url), "the hung generation outlived its worker"
        second = WorkerProcess(
            make_settings(a1111_url=a1111.url, generation_timeout=4, a1111_start_timeout=900),
            log_dir=tmp_path,
        )
        try:
            await second.wait_for(lambda: second.done_jobs() == ["hung"], timeout=4 + 15, what="the job")
            assert time.monotonic() - second.started < 4 + 15
            assert second.messages(
                "A1111 is generating for nobody (a previous worker's job): interrupting it"
            )
        finally:
            second.stop()
    assert await blob_names(storage) == ["hung/0.png", "hung/job.json"]


async def test_sigterm_gives_prefetched_jobs_back_at_once(
    make_settings: Any, storage: Storage, settings: Settings, own_standin: Any, tmp_path: Path
) -> None:
    """Steps: 12 s generations (8 images of 1.5 s), prefetch 4. On SIGTERM while the first job
    generates, the four prefetched jobs are visible to another client within a second: they are not
    kept until the current generation ends."""
    async with own_standin(1.5) as a1111:
        run_settings = make_settings(a1111_url=a1111.url, prefetch=4, shutdown_grace=20)
        queue = run_settings.queue_name[0]
        for index in range(7):
            await storage.send(queue, json.dumps({**JOB, "id": f"long-{index}", "n_iter": 8}))
        worker = WorkerProcess(run_settings, log_dir=tmp_path)
        try:
            await wait_until(lambda: standin_generating(a1111.url), timeout=30, what="the first job")

            async def prefetched() -> bool:  # one generating, one queued at A1111, four waiting
                return len(await storage.queue(queue).peek_messages(max_messages=32)) == 1

            await wait_until(prefetched, timeout=10, what="the prefetch filled")
            signalled = time.monotonic()
            worker.signal(signal.SIGTERM)
            seen: set[str] = set()

            async def four_back() -> bool:
                seen.update(json.loads(text)["id"] for text in await visible_messages(storage, queue))
                return len(seen) >= 5  # the four prefetched, and the one nobody had taken yet

            await wait_until(four_back, timeout=10, what="the prefetched jobs back")
            back_after = time.monotonic() - signalled
            assert back_after < 1.0 + 1.0, (
                f"back after {back_after:.2f}s"
            )  # 1 s, and a loaded machine's slack
            assert worker.messages("giving back 4 prefetched jobs")
        finally:
            worker.stop()


async def test_sigterm_with_storage_down_exits_within_the_grace_period(
    make_settings: Any, own_standin: Any, tmp_path: Path
) -> None:
    """Steps: jobs generating and prefetched, then Azurite is stopped and SIGTERM sent (grace 3 s). The
    uploads and releases that cannot reach storage are cut to the grace period: the worker exits
    within it plus 2 s, not after the 60 s read timeout or the retry budget."""
    server, workdir = make_azurite()
    await server.start()
    try:
        async with own_standin(0.5) as a1111:
            settings = make_settings(
                storage_connection_string=server.connection_string,
                a1111_url=a1111.url,
                prefetch=4,
                shutdown_grace=3,
                retry_budget=60,
                retry_base_delay=0.2,
                retry_max_delay=1.0,
            )
            store = Storage.connect(settings)
            await store.ensure()
            for index in range(10):
                await store.send(settings.queue_name[0], json.dumps({**JOB, "id": f"down-{index}"}))
            await store.close()
            worker = WorkerProcess(settings, log_dir=tmp_path)
            try:
                await worker.wait_for(lambda: len(worker.done_jobs()) >= 1, timeout=30, what="a job done")
                server.stop()
                stopped = time.monotonic()
                worker.signal(signal.SIGTERM)
                await worker.wait_exit(30)
                took = time.monotonic() - stopped
                assert took < 3 + 2, f"exit {took:.1f}s after SIGTERM"
            finally:
                worker.stop()
    finally:
        server.stop()
        workdir.cleanup()


async def test_exit_when_empty_says_how_many_messages_are_still_invisible(
    make_settings: Any, storage: Storage, settings: Settings, standin: Any, tmp_path: Path
) -> None:
    """Steps: one message is held by a consumer that died (invisible for 4 s). By default the drain
    exits 0 and its last line says one message is still invisible; with --wait-invisible 30 the
    worker waits for it to come back and runs it."""
    queue = settings.queue_name[0]
    await storage.send(queue, json.dumps({**JOB, "id": "held-by-the-dead"}))
    await storage.receive(queue, 1, 4)  # the dead consumer's lease
    worker = await run_until_exit(settings, tmp_path, "--exit-when-empty")
    assert worker.proc.returncode == 0
    (line,) = worker.messages("drained; 1 message still invisible under other consumers' leases")
    assert line["invisible"] == 1
    assert worker.done_jobs() == []
    waiting = await run_until_exit(settings, tmp_path, "--exit-when-empty", "--wait-invisible", "30")
    assert waiting.proc.returncode == 0
    assert waiting.done_jobs() == ["held-by-the-dead"]
    assert waiting.messages("drained; the queue is empty")


async def test_a_job_that_kills_a1111_every_time_is_poisoned_and_the_bystander_stored(
    make_settings: Any, storage: Storage, settings: Settings, own_standin: Any, tmp_path: Path
) -> None:
    """Steps: a job whose generation kills A1111 every time, and a bystander behind it. As an
    orchestrator would, each time the worker exits (A1111 died) A1111 and the worker are started
    again. The killer counts a try each time and is poisoned at the limit, naming A1111's death; the
    bystander is stored; the node stops dying."""
    limit = 3
    queue = settings.queue_name[0]
    await storage.send(queue, json.dumps({**JOB, "id": "killer", "prompt": "a killer prompt"}))
    await storage.send(queue, json.dumps({**JOB, "id": "bystander"}))
    exits = []
    for _ in range(limit + 2):
        async with own_standin(0.05, ["--crash-on-prompt", "killer"]) as a1111:
            run_settings = make_settings(a1111_url=a1111.url, max_dequeue_count=limit, prefetch=0)
            worker = await run_until_exit(run_settings, tmp_path, "--exit-when-empty")
            exits.append(worker.proc.returncode)
            if worker.proc.returncode == 0:
                break
    assert exits == [1] * limit + [0], exits
    (entry,) = await poison_entries(storage, queue)
    assert entry["job_id"] == "killer" and entry["dequeue_count"] == limit
    assert entry["error"]["type"] == "A1111Unavailable"
    assert f"A1111 went away during this job on try {limit} of {limit}" in entry["error"]["detail"]
    assert await blob_names(storage) == ["bystander/0.png", "bystander/job.json"]


async def test_an_exception_nobody_planned_for_poisons_only_its_message(
    settings: Settings, storage: Storage, standin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps: validating one message and building another's request raise errors the worker has no
    plan for (a bug, say). Each of those messages is poisoned with the exception's type and text; the
    good job between them is stored and the worker drains normally (exit 0)."""
    from sidecar.app import run_worker
    from sidecar.jobs import Job
    from sidecar.pipeline import fetch as fetch_stage

    real_parse, real_payload = fetch_stage.__dict__["parse_job"], Job.txt2img_payload

    def parse(text: str, *args: Any, **kwargs: Any) -> Any:
        if "explode-in-validation" in text:
            raise RecursionError("maximum recursion depth exceeded")
        return real_parse(text, *args, **kwargs)

    def payload(self: Job) -> dict[str, Any]:
        if self.id == "explode-in-generation":
            raise KeyError("sampler_name")
        return real_payload(self)

    monkeypatch.setattr(fetch_stage, "parse_job", parse)
    monkeypatch.setattr(Job, "txt2img_payload", payload)
    queue = settings.queue_name[0]
    for job_id in ("explode-in-validation", "fine", "explode-in-generation"):
        await storage.send(queue, json.dumps({**JOB, "id": job_id}))
    assert await run_worker(settings, exit_when_empty=True) == 0
    by_id = {entry["job_id"]: entry for entry in await poison_entries(storage, queue)}
    assert by_id["explode-in-validation"]["error"] == {
        "type": "RecursionError",
        "detail": "RecursionError: maximum recursion depth exceeded",
    }
    assert by_id["explode-in-generation"]["error"]["type"] == "KeyError"
    assert "sampler_name" in by_id["explode-in-generation"]["error"]["detail"]
    assert await blob_names(storage) == ["fine/0.png", "fine/job.json"]
