"""Never lose a job: kills, signals, storage outages and A1111 faults, with the worker as a real process.

Every test ends by checking the books: each job's blobs exactly once under its own prefix, and the
queue and poison queue as expected.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path
from typing import Any

from sidecar.app import run_worker
from sidecar.config import Settings
from sidecar.storage import Storage
from tests.conftest import make_azurite, run_cli
from tests.helpers import (
    WorkerProcess,
    blob_names,
    poison_entries,
    queue_length,
    read_blob,
    standin_call,
    standin_generating,
    visible_messages,
    wait_until,
)

JOB = {
    "prompt": "a lighthouse on a foggy harbor <lora:add_detail:0.6>",
    "sampler_name": "k_euler_a",
    "steps": 15,
    "cfg_scale": 7,
    "width": 512,
    "height": 512,
}


async def warmed_worker(settings: Settings, **options: Any) -> asyncio.Task[int]:
    """The worker in this process, returned once its warm-up generation is done (so faults injected
    afterwards hit the jobs, not the warm-up)."""
    task = asyncio.create_task(run_worker(settings, **options))

    async def warmed() -> bool:
        if task.done():
            raise AssertionError(f"worker ended early: {task.result()}")
        stats = await standin_call(settings.a1111_url, "GET", "/standin/stats")
        return bool(stats["generations"])

    await wait_until(warmed, timeout=30, what="warm-up")
    return task


def expected_blobs(job_ids: list[str]) -> list[str]:
    return sorted(name for job_id in job_ids for name in (f"{job_id}/0.png", f"{job_id}/job.json"))


async def enqueue(storage: Storage, queue: str, count: int, prefix: str = "job", **fields: Any) -> list[str]:
    """Send ``count`` jobs: most with an explicit id, every fifth without (its message id names it)."""
    ids = []
    for index in range(count):
        if index % 5 == 4:
            sent = await storage.queue(queue).send_message(json.dumps({**JOB, **fields}))
            ids.append(sent.id)
        else:
            job_id = f"{prefix}-{index:03d}"
            await storage.send(queue, json.dumps({**JOB, **fields, "id": job_id}))
            ids.append(job_id)
    return ids


async def test_sigkill_mid_run_loses_nothing_and_duplicates_nothing(
    make_settings: Any, standin: Any, tmp_path: Path
) -> None:
    """Steps: 40 jobs; three workers in turn are SIGKILLed after a few jobs each (their held messages
    come back when the 2 s lease runs out); a fourth finishes. Every job has its blobs exactly once."""
    settings = make_settings(visibility_timeout=2, prefetch=2)
    queue = settings.queue_name[0]
    storage = Storage.connect(settings)
    try:
        await storage.ensure()
        ids = await enqueue(storage, queue, 40)
        ends = []  # how each of the three workers ended: killed by the signal, not exited by itself
        for _ in range(3):
            worker = WorkerProcess(settings, log_dir=tmp_path)
            try:

                def four_done(running: WorkerProcess = worker) -> bool:
                    return len(running.done_jobs()) >= 4

                await worker.wait_for(four_done, what="4 jobs done")
            finally:
                worker.signal(signal.SIGKILL)
                ends.append(await worker.wait_exit())
        last = WorkerProcess(settings, log_dir=tmp_path)
        try:
            await wait_until(lambda: _queue_drained(storage, queue), timeout=60, what="queue drained")
            last.signal(signal.SIGTERM)
            assert await last.wait_exit() == 0
        finally:
            last.stop()
        assert ends == [-signal.SIGKILL] * 3
        assert await blob_names(storage) == expected_blobs(ids)
        assert await poison_entries(storage, queue) == []
        for job_id in ids:
            record = json.loads(await read_blob(storage, f"{job_id}/job.json"))
            assert record["job_id"] == job_id
    finally:
        await storage.close()


async def _queue_drained(storage: Storage, queue: str) -> bool:
    # The approximate count includes invisible (held) messages: 0 means every job was deleted.
    return await queue_length(storage, queue) == 0


async def test_sigterm_finishes_the_current_job_and_releases_the_rest(
    make_settings: Any, own_standin: Any, storage: Storage, settings: Settings, tmp_path: Path
) -> None:
    """Steps: 8 jobs at 0.5 s per image, prefetch 2; SIGTERM right after the first job is done, while the
    second generates. The worker exits 0 within the grace time, the second job is completed, and every
    other message is visible at once (no lease to wait out)."""
    async with own_standin(0.5) as slow:
        settings = make_settings(
            a1111_url=slow.url,
            prefetch=2,
            shutdown_grace=10,
            visibility_timeout=60,
        )
        queue = settings.queue_name[0]
        ids = await enqueue(storage, queue, 8)
        worker = WorkerProcess(settings, log_dir=tmp_path)
        try:
            await worker.wait_for(lambda: len(worker.done_jobs()) >= 1, what="first job")
            signalled = time.monotonic()
            worker.signal(signal.SIGTERM)
            assert await worker.wait_exit(timeout=20) == 0
            assert time.monotonic() - signalled < settings.shutdown_grace
        finally:
            worker.stop()
        done = worker.done_jobs()
        assert len(done) >= 2, "the generation under way at SIGTERM was completed"
        assert await blob_names(storage) == expected_blobs(done)
        left = await visible_messages(storage, queue)
        assert len(left) == len(ids) - len(done)


async def test_second_signal_exits_at_once(
    make_settings: Any, own_standin: Any, storage: Storage, settings: Settings, tmp_path: Path
) -> None:
    """Steps: one job that takes 16 s; SIGTERM then SIGTERM again: the worker exits at once, non-zero."""
    async with own_standin(2) as slow:
        settings = make_settings(
            a1111_url=slow.url,
            shutdown_grace=60,
        )
        await enqueue(storage, settings.queue_name[0], 1, n_iter=8)
        worker = WorkerProcess(settings, log_dir=tmp_path)
        try:
            await _wait_generating(slow.url, worker)
            worker.signal(signal.SIGTERM)
            await worker.wait_for(
                lambda: bool(worker.messages("SIGTERM: draining, then stopping")), what="drain"
            )
            started = time.monotonic()
            worker.signal(signal.SIGTERM)
            assert await worker.wait_exit(timeout=10) == 1
            assert time.monotonic() - started < 5
        finally:
            worker.stop()


async def _wait_generating(url: str, worker: WorkerProcess) -> None:
    async def generating() -> bool:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited early:\n{worker.tail()}")
        return await standin_generating(url)

    await wait_until(generating, timeout=60, what="a job generating")


async def test_grace_deadline_gives_the_cut_off_job_back(
    make_settings: Any, own_standin: Any, storage: Storage, settings: Settings, tmp_path: Path
) -> None:
    """Steps: one job that takes 16 s, grace 1 s; SIGTERM while it generates. The worker exits 0 after
    the grace period, interrupts A1111, and the message is visible again at once."""
    async with own_standin(2) as slow:
        settings = make_settings(
            a1111_url=slow.url,
            shutdown_grace=1,
        )
        ids = await enqueue(storage, settings.queue_name[0], 1, n_iter=8)
        worker = WorkerProcess(settings, log_dir=tmp_path)
        try:
            await _wait_generating(slow.url, worker)
            worker.signal(signal.SIGTERM)
            assert await worker.wait_exit(timeout=30) == 0
        finally:
            worker.stop()
        assert len(await visible_messages(storage, settings.queue_name[0])) == len(ids)
        assert await blob_names(storage) == []
        progress = await standin_call(slow.url, "GET", "/sdapi/v1/progress")
        assert not progress["state"]["job"], "A1111 is idle"
        # the stand-in's record, not a clock: the 16 s job was cut short by the interrupt
        cut = (await standin_call(slow.url, "GET", "/standin/stats"))["generations_detail"][-1]
        assert cut["interrupted"] and cut["images"] < 8, cut


async def test_storage_outage_is_ridden_out(make_settings: Any, standin: Any, tmp_path: Path) -> None:
    """Steps: 20 jobs on an Azurite of the test's own; after 3 jobs Azurite stops until the worker has
    met the outage (a storage call retried, logged), then starts again on the same ports with its data.
    The worker backs off, resumes, and loses nothing."""
    server, workdir = make_azurite(persistent=True)
    try:
        await server.start()
        settings = make_settings(
            storage_connection_string=server.connection_string,
            visibility_timeout=6,
            retry_base_delay=0.2,
            retry_max_delay=1.0,
            retry_budget=30,
        )
        queue = settings.queue_name[0]
        storage = Storage.connect(settings)
        try:
            await storage.ensure()
            ids = await enqueue(storage, queue, 20)
            worker = WorkerProcess(settings, log_dir=tmp_path)
            try:
                await worker.wait_for(lambda: len(worker.done_jobs()) >= 3, what="3 jobs")
                server.stop()
                await worker.wait_for(
                    lambda: bool(_storage_retries(worker)), timeout=60, what="the outage met"
                )
                await server.start()
                await wait_until(lambda: _queue_drained(storage, queue), timeout=90, what="queue drained")
                worker.signal(signal.SIGTERM)
                assert await worker.wait_exit() == 0
            finally:
                worker.stop()
            assert await blob_names(storage) == expected_blobs(ids)
            assert await poison_entries(storage, queue) == []
            assert _storage_retries(worker), "the outage was met with retries of refused connections"
        finally:
            await storage.close()
    finally:
        server.stop()
        workdir.cleanup()


REFUSED_RETRY = re.compile(r"storage unreachable: 127\.0\.0\.1:\d+ connection refused; retry \d+ in ")


def _storage_retries(worker: WorkerProcess) -> list[dict[str, Any]]:
    """The worker's warnings that a storage call met a refused connection and is retried."""
    return [
        entry
        for entry in worker.lines()
        if entry.get("level") == "warning"
        and entry.get("stage") == "retry"
        and entry.get("error") == "StorageUnavailable"
        and REFUSED_RETRY.match(entry.get("msg", ""))
    ]


async def test_out_of_memory_is_retried_then_poisoned(
    settings: Settings, storage: Storage, standin: Any, make_settings: Any
) -> None:
    """Steps: A1111 answers 500 (CUDA out of memory) six times; with 2 dequeues allowed the job is tried
    3 times per dequeue, released in between, then poisoned with the reason. The worker goes on."""
    settings = make_settings(max_dequeue_count=2)
    queue = settings.queue_name[0]
    worker = await warmed_worker(settings, max_jobs=1)
    await standin_call(settings.a1111_url, "POST", "/standin/faults", {"fail_next": 6})
    await storage.send(queue, json.dumps({**JOB, "id": "oom"}))
    assert await worker == 0
    [entry] = await poison_entries(storage, queue)
    assert entry["job_id"] == "oom" and entry["dequeue_count"] == 2
    assert entry["error"]["type"] == "A1111ServerError"
    assert "CUDA out of memory" in entry["error"]["detail"]
    assert json.loads(entry["original"])["id"] == "oom"
    faults = await standin_call(settings.a1111_url, "GET", "/standin/faults")
    assert faults["fail_next"] == 0, "all six failures were consumed: 3 tries per dequeue"
    await storage.send(queue, json.dumps({**JOB, "id": "after"}))
    assert await run_worker(settings, exit_when_empty=True) == 0
    assert await blob_names(storage) == expected_blobs(["after"])


async def test_a1111_rejection_goes_to_poison_at_once(
    settings: Settings, storage: Storage, standin: Any
) -> None:
    """Steps: A1111 refuses the job with a 4xx (as A1111 up to 1.9 did for an unknown sampler); the job
    is poisoned after a single try, with A1111's own error detail."""
    worker = await warmed_worker(settings, max_jobs=1)
    await standin_call(
        settings.a1111_url,
        "POST",
        "/standin/faults",
        {
            "fail_next": 1,
            "fail_status": 404,
            "fail_error": "HTTPException",
            "fail_message": "Sampler not found",
        },
    )
    await storage.send(settings.queue_name[0], json.dumps({**JOB, "id": "odd"}))
    assert await worker == 0
    [entry] = await poison_entries(storage, settings.queue_name[0])
    assert entry["error"]["type"] == "A1111Rejected" and entry["dequeue_count"] == 1
    assert "404" in entry["error"]["detail"] and "Sampler not found" in entry["error"]["detail"]


async def test_a_sampler_no_a1111_has_is_poisoned_before_a1111_sees_it(
    settings: Settings, storage: Storage, standin: Any
) -> None:
    """Steps: a job names a sampler A1111 does not list. Real A1111 1.10 would silently run DPM++ 2M; the
    worker poisons it at once, naming the sampler, and A1111 never gets it."""
    await storage.send(settings.queue_name[0], json.dumps({**JOB, "id": "odd", "sampler_name": "Euler z"}))
    assert await run_worker(settings, exit_when_empty=True) == 0
    [entry] = await poison_entries(storage, settings.queue_name[0])
    assert entry["error"]["type"] == "UnknownAsset" and entry["dequeue_count"] == 1
    assert "'Euler z'" in entry["error"]["detail"] and "sampler_name" in entry["error"]["detail"]
    stats = await standin_call(settings.a1111_url, "GET", "/standin/stats")
    assert stats["requests"] == 1, "only the warm-up reached A1111"


async def test_hung_generation_is_interrupted_and_retried(
    settings: Settings, storage: Storage, standin: Any, make_settings: Any
) -> None:
    """Steps: A1111 hangs on the first generation; after the 1 s deadline the worker interrupts it,
    releases the job, and the second try succeeds."""
    settings = make_settings(generation_timeout=1)
    worker = await warmed_worker(settings, max_jobs=1)
    await standin_call(settings.a1111_url, "POST", "/standin/faults", {"hang_next": 1})
    await storage.send(settings.queue_name[0], json.dumps({**JOB, "id": "hung"}))
    assert await worker == 0
    assert await blob_names(storage) == expected_blobs(["hung"])
    record = json.loads(await read_blob(storage, "hung/job.json"))
    assert record["dequeue_count"] == 2


def test_a1111_not_up_at_start_exits_non_zero(make_settings: Any) -> None:
    """Steps: nothing listens at SIDECAR_A1111_URL; after the 1 s start timeout the worker exits 3
    with one clear line."""
    from sidecar.dev.devenv import free_port

    settings = make_settings(a1111_url=f"http://127.0.0.1:{free_port()}", a1111_start_timeout=1)
    done = run_cli(settings, "run")
    assert done.returncode == 3
    errors = [json.loads(line) for line in done.stderr.splitlines() if '"level": "error"' in line]
    assert errors and "A1111" in errors[0]["msg"] and "not up after 1s" in errors[0]["msg"]


async def test_a1111_dying_mid_run_releases_everything_and_exits_non_zero(
    make_settings: Any, own_standin: Any, storage: Storage, settings: Settings, tmp_path: Path
) -> None:
    """Steps: 8 jobs, prefetch 2; the stand-in crashes on its 4th txt2img call (the warm-up is the 1st).
    The worker exits 1 within seconds and every unfinished job is visible again at once.

    The crash comes as the 3rd call's answer is being encoded (outside the queue lock, as in A1111),
    so that answer may die with the process: 1 or 2 jobs finish, and every other one is back."""
    async with own_standin(0.1, ["--crash-after", "3"]) as fragile:
        settings = make_settings(
            a1111_url=fragile.url,
            prefetch=2,
            visibility_timeout=60,
        )
        ids = await enqueue(storage, settings.queue_name[0], 8)
        worker = WorkerProcess(settings, log_dir=tmp_path)
        try:
            assert await worker.wait_exit(timeout=30) == 1
        finally:
            worker.stop()
        done = worker.done_jobs()
        assert len(done) in (1, 2)
        names = await blob_names(storage)
        # the jobs A1111 died under (the one running and the one queued behind it) left a note of it
        # for their next try, and count that try
        notes = [name for name in names if name.startswith("_failures/")]
        assert len(notes) in (1, 2)
        assert [name for name in names if name not in notes] == expected_blobs(done)
        assert len(await visible_messages(storage, settings.queue_name[0])) == len(ids) - len(done)
        assert any("A1111" in entry["msg"] for entry in worker.lines() if entry["level"] == "error")


async def test_a_sick_node_stops_after_failures_in_a_row(
    settings: Settings, storage: Storage, standin: Any, make_settings: Any
) -> None:
    """Steps: A1111 fails every call; the worker gives up after 5 failed jobs in a row (exit 1) instead
    of eating the queue, and the jobs stay on the queue, not on the poison queue."""
    settings = make_settings(max_dequeue_count=100)
    worker = await warmed_worker(settings)
    await standin_call(settings.a1111_url, "POST", "/standin/faults", {"fail_next": 1000})
    ids = await enqueue(storage, settings.queue_name[0], 3)
    assert await worker == 1
    assert await poison_entries(storage, settings.queue_name[0]) == []
    assert len(await visible_messages(storage, settings.queue_name[0])) == len(ids)


async def test_lease_is_renewed_while_a_long_job_runs(
    make_settings: Any, own_standin: Any, storage: Storage, settings: Settings
) -> None:
    """Steps: a 5 s generation with a 2 s visibility timeout. Throughout the generation another consumer
    finds nothing on the queue (the lease is renewed at half-life); the job completes once."""
    async with own_standin(1) as slow:
        settings = make_settings(
            a1111_url=slow.url,
            visibility_timeout=2,
        )
        queue = settings.queue_name[0]
        await storage.send(queue, json.dumps({**JOB, "id": "long", "n_iter": 5}))
        worker = asyncio.create_task(run_worker(settings, exit_when_empty=True))
        try:
            await wait_until(lambda: standin_generating(slow.url), timeout=30, what="generation")
            stolen = 0
            while not worker.done():
                stolen += len([m async for m in storage.queue(queue).receive_messages(visibility_timeout=1)])
                await asyncio.sleep(0.2)
            assert await worker == 0
        finally:
            worker.cancel()
        assert stolen == 0
        assert await blob_names(storage) == [*(f"long/{i}.png" for i in range(5)), "long/job.json"]
        assert await queue_length(storage, queue) == 0


async def test_lost_lease_never_deletes_someone_elses_message(
    make_settings: Any, own_standin: Any, storage: Storage, settings: Settings, tmp_path: Path
) -> None:
    """Steps: while a 4 s job generates, the worker is frozen (SIGSTOP) past its 2 s lease; another
    consumer receives the message. Thawed (SIGCONT), the worker finds its pop receipt stale: it finishes
    the job's blobs (same names, idempotent) but never deletes the message the other consumer now owns."""
    async with own_standin(1) as slow:
        settings = make_settings(
            a1111_url=slow.url,
            visibility_timeout=2,
        )
        queue = settings.queue_name[0]
        await storage.send(queue, json.dumps({**JOB, "id": "taken", "n_iter": 4}))
        worker = WorkerProcess(settings, log_dir=tmp_path)
        try:
            await wait_until(lambda: standin_generating(slow.url), timeout=30, what="generation")
            worker.signal(signal.SIGSTOP)
            try:
                taken = await _take_over(storage, queue)
            finally:
                worker.signal(signal.SIGCONT)
            await worker.wait_for(
                lambda: bool(
                    worker.messages("lease lost") or worker.messages("message no longer ours at delete")
                ),
                what="lease lost",
            )
            await wait_until(lambda: _has_blob(storage, "taken/job.json"), timeout=30, what="blobs")
            worker.signal(signal.SIGTERM)
            assert await worker.wait_exit() == 0
        finally:
            worker.stop()
        # The other consumer's pop receipt still works: the worker deleted nothing.
        await storage.queue(queue).delete_message(taken.id, taken.pop_receipt)
        assert worker.done_jobs() == []


async def _take_over(storage: Storage, queue: str) -> Any:
    """Another consumer receives the message once the frozen worker's lease has run out."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async for message in storage.queue(queue).receive_messages(visibility_timeout=60):
            return message
        await asyncio.sleep(0.1)
    raise AssertionError("the message never became visible")


async def _has_blob(storage: Storage, name: str) -> bool:
    return name in await blob_names(storage)
