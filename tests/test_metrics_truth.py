"""The metrics tell the truth: ``/metrics`` of a running worker passes ``promtool check metrics``,
every label value of every counter is there at 0 before the first job, and the worker's figures (the
generate histogram, the busy seconds, a job's age) agree with the stand-in's own record of the same
run. No timing assertions: each figure is compared with what the stand-in (or the test) measured."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.errors import LeaseLost, StorageRefused
from sidecar.observability import A1111_ERROR_STATUSES, OUTCOMES, STAGES, BusyMeter, Metrics, stage_buckets
from sidecar.storage import Message, Storage
from sidecar.storage.refusals import ERROR_CODES, error_label
from tests.conftest import IN_CI
from tests.helpers import WorkerProcess, response_error, standin_call, wait_until

JOB = {"prompt": "a lighthouse at dusk", "steps": 4, "width": 64, "height": 64}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def start(settings: Any, tmp_path: Path) -> tuple[WorkerProcess, int]:
    """A worker, ready; its endpoints' port is read from its "starting" line."""
    worker = WorkerProcess(settings, log_dir=tmp_path)
    await worker.wait_for(lambda: bool(worker.messages("starting")), what="the starting line")
    port = int(worker.messages("starting")[0]["http_port"])

    async def ready() -> bool:
        try:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"http://127.0.0.1:{port}/readyz", timeout=5)).status_code == 200
        except httpx.HTTPError:
            return False

    await wait_until(ready, timeout=30, what="ready")
    return worker, port


async def scrape(port: int) -> str:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    response.raise_for_status()
    return response.text


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            raise AssertionError("promtool is missing: `make promtool` installs it (Debian's prometheus)")
        pytest.skip("promtool is missing (make promtool; Debian's prometheus package)")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False
    )
    assert checked.returncode == 0, f"promtool check metrics:\n{checked.stdout}{checked.stderr}"


async def send_jobs(storage: Storage, queue: str, count: int, tag: str) -> None:
    for index in range(count):
        await storage.send(queue, json.dumps({**JOB, "id": f"{tag}-{index}"}))


async def test_metrics_pass_promtool_and_start_at_zero(
    make_settings: Any, standin: Any, storage: Storage, tmp_path: Path
) -> None:
    """Before any job: promtool finds nothing to say, every label value of every counter is at 0,
    every stage's histogram is there, build info is 1, and the buckets reach the generation deadline.
    After two jobs promtool still passes."""
    settings = make_settings(generation_timeout=1000)
    worker, port = await start(settings, tmp_path)
    try:
        text = await scrape(port)
        promtool_check(text)
        samples = parse(text)
        # an account key has no expiry: the series is absent, not a 0 that an alert reads as due
        assert "sidecar_credential_expiry_seconds" not in text
        for outcome in OUTCOMES:
            assert value(samples, "sidecar_jobs_total", outcome=outcome) == 0
        for status in A1111_ERROR_STATUSES:
            assert value(samples, "sidecar_a1111_errors_total", status=status) == 0
        for code in ERROR_CODES:
            assert value(samples, "sidecar_storage_errors_total", code=code) == 0
        for result in ("messages", "empty"):
            assert ("sidecar_receives_total", (("result", result),)) in samples
        assert value(samples, "sidecar_receives_total", result="messages") == 0
        for stage in STAGES:
            assert value(samples, "sidecar_stage_seconds_count", stage=stage) == 0
        for at in ("fetch", "done"):
            assert value(samples, "sidecar_job_age_seconds_count", at=at) == 0
        assert value(samples, "sidecar_a1111_busy_seconds_total") == 0  # the warm-up is not a job's
        assert value(samples, "sidecar_images_total") == 0
        assert value(samples, "sidecar_generations_discarded_total") == 0
        build = [labels for (name, labels), v in samples.items() if name == "sidecar_build_info" and v == 1]
        assert len(build) == 1 and dict(build[0])["version"]
        buckets = sorted(
            float(dict(labels)["le"])
            for (name, labels) in samples
            if name == "sidecar_stage_seconds_bucket" and dict(labels)["stage"] == "generate"
        )
        assert buckets[-1] == float("inf") and buckets[-2] >= 1000, buckets[-3:]

        await send_jobs(storage, settings.queue_name[0], 2, "lint")
        await worker.wait_for(lambda: len(worker.done_jobs()) == 2, what="2 jobs")
        text = await scrape(port)
        promtool_check(text)
        samples = parse(text)
        assert value(samples, "sidecar_jobs_total", outcome="succeeded") == 2
        assert value(samples, "sidecar_stage_seconds_count", stage="settle") == 2
        assert value(samples, "sidecar_upload_slot_wait_seconds_count") == 2
        assert value(samples, "sidecar_receives_total", result="messages") >= 1
        # an empty poll is counted, never timed as the receive stage
        assert value(samples, "sidecar_stage_seconds_count", stage="receive") == value(
            samples, "sidecar_receives_total", result="messages"
        )
    finally:
        worker.stop()


async def test_generate_histogram_and_busy_seconds_match_the_standin(
    make_settings: Any, own_standin: Any, storage: Storage, tmp_path: Path
) -> None:
    """Ten one-image jobs at 0.1 s each, queue-ahead on, prefetch 2: the generate histogram's mean is
    the stand-in's 0.1 s (within 15%), not the wait behind the request ahead (which the queued
    histogram holds), and the busy seconds are the stand-in's own generating seconds."""
    async with own_standin(0.1) as a1111:
        settings = make_settings(a1111_url=a1111.url, prefetch=2)
        worker, port = await start(settings, tmp_path)
        try:
            before = (await standin_call(a1111.url, "GET", "/standin/stats"))["busy_seconds"]
            await send_jobs(storage, settings.queue_name[0], 10, "mean")
            await worker.wait_for(lambda: len(worker.done_jobs()) == 10, timeout=60, what="10 jobs")
            samples = parse(await scrape(port))
            standin_busy = (await standin_call(a1111.url, "GET", "/standin/stats"))["busy_seconds"] - before
        finally:
            worker.stop()
    count = value(samples, "sidecar_stage_seconds_count", stage="generate")
    mean = value(samples, "sidecar_stage_seconds_sum", stage="generate") / count
    queued = value(samples, "sidecar_a1111_queued_seconds_sum")
    busy = value(samples, "sidecar_a1111_busy_seconds_total")
    print(
        f"generate mean {mean:.4f} s over {count:.0f}; queued {queued:.3f} s; busy {busy:.3f} s "
        f"vs the stand-in's {standin_busy:.3f} s"
    )
    assert count == 10
    assert abs(mean - 0.1) <= 0.015, mean
    assert value(samples, "sidecar_a1111_queued_seconds_count") == 10
    assert queued > 0.5  # with queue-ahead, most requests waited most of a generation
    assert abs(busy - standin_busy) <= 0.15 * standin_busy, (busy, standin_busy)


async def test_busy_ratio_excludes_backoff_during_500s(
    make_settings: Any, own_standin: Any, storage: Storage, tmp_path: Path
) -> None:
    """Six 500s (the stand-in's fail_next) with a real backoff between tries: the busy ratio (busy
    seconds over the run's wall) is the stand-in's own within 0.05, the 500s are counted by status,
    and every retry line names its job."""
    async with own_standin(0.1) as a1111:
        settings = make_settings(
            a1111_url=a1111.url, prefetch=2, retry_base_delay=0.3, retry_max_delay=0.6, retry_budget=20
        )
        worker, port = await start(settings, tmp_path)
        try:
            await standin_call(a1111.url, "POST", "/standin/faults", {"fail_next": 6})
            first = parse(await scrape(port))
            stats_before = await standin_call(a1111.url, "GET", "/standin/stats")
            began = time.monotonic()
            await send_jobs(storage, settings.queue_name[0], 6, "busy")
            await worker.wait_for(lambda: len(worker.done_jobs()) == 6, timeout=90, what="6 jobs")
            await asyncio.sleep(0.2)  # nothing at A1111 now
            stats_after = await standin_call(a1111.url, "GET", "/standin/stats")
            last = parse(await scrape(port))
            wall = time.monotonic() - began
        finally:
            worker.stop()
    busy = value(last, "sidecar_a1111_busy_seconds_total") - value(first, "sidecar_a1111_busy_seconds_total")
    standin_busy = stats_after["busy_seconds"] - stats_before["busy_seconds"]
    ratio, standin_ratio = busy / wall, standin_busy / wall
    print(f"busy ratio {ratio:.4f} vs the stand-in's {standin_ratio:.4f} over {wall:.2f} s")
    assert abs(ratio - standin_ratio) <= 0.05, (ratio, standin_ratio)
    assert value(last, "sidecar_a1111_errors_total", status="500") == 6
    generate_sum = value(last, "sidecar_stage_seconds_sum", stage="generate")
    assert abs(generate_sum - value(last, "sidecar_a1111_busy_seconds_total")) < 1e-6  # same intervals
    retries = [line for line in worker.lines() if line.get("stage") == "retry"]
    assert retries and all(str(line.get("job_id", "")).startswith("busy-") for line in retries), retries


async def test_job_age_counts_from_the_insertion_time(
    make_settings: Any, standin: Any, storage: Storage, tmp_path: Path
) -> None:
    """A message enqueued 3 s before the worker starts is at least 3 s old when fetched and done."""
    settings = make_settings()
    await send_jobs(storage, settings.queue_name[0], 1, "age")
    enqueued = time.monotonic()
    await asyncio.sleep(3)
    worker, port = await start(settings, tmp_path)
    try:
        await worker.wait_for(lambda: len(worker.done_jobs()) == 1, what="the job")
        samples = parse(await scrape(port))
    finally:
        worker.stop()
    waited = time.monotonic() - enqueued
    fetched = value(samples, "sidecar_job_age_seconds_sum", at="fetch")
    done = value(samples, "sidecar_job_age_seconds_sum", at="done")
    assert value(samples, "sidecar_job_age_seconds_count", at="fetch") == 1
    assert value(samples, "sidecar_job_age_seconds_count", at="done") == 1
    # Azure's insertion time has whole seconds (cut down: the age can only come out longer)
    assert 3 <= fetched <= done <= waited + 1, (fetched, done, waited)


def test_busy_meter_counts_gpu_time_once() -> None:
    """Two requests at A1111 at once (one generating, one queued behind it) count once; the gap of a
    backoff between tries counts nothing; the queued part is the wait behind the one ahead."""
    now = [0.0]
    meter = BusyMeter(window=100, clock=lambda: now[0])
    first = meter.attempt()
    a = first.__enter__()
    now[0] = 1.0
    second = meter.attempt()
    b = second.__enter__()  # sent at 1, waits behind the first
    now[0] = 3.0
    first.__exit__(None, None, None)
    assert meter.total() == 3.0
    now[0] = 5.0
    assert meter.total() == 5.0  # the second is generating since 3
    second.__exit__(None, None, None)
    assert (a.queued, a.seconds, b.queued, b.seconds) == (0.0, 3.0, 2.0, 2.0)
    now[0] = 9.0  # a backoff of 4 s: nothing at A1111
    with meter.attempt() as c:
        now[0] = 10.0
    assert (c.queued, c.seconds) == (0.0, 1.0)
    assert meter.total() == 6.0
    assert meter.fraction() == pytest.approx(6.0 / 10.0)


def test_buckets_reach_the_deadline() -> None:
    assert stage_buckets(600)[-1] == 600 and stage_buckets(300)[-1] == 300
    assert stage_buckets(1000)[-2:] == (900, 1200)
    assert stage_buckets(50)[-1] == 300  # never fewer than the base list


@pytest.mark.parametrize(
    ("error", "label"),
    [
        (response_error(403, "AuthenticationFailed"), "AuthenticationFailed"),
        (response_error(404, "QueueNotFound"), "QueueNotFound"),
        (response_error(400, "InvalidQueryParameterValue"), "other"),  # open-ended: other
        (response_error(429, ""), "throttled"),
        (response_error(503, "ServerBusy"), "throttled"),
        (response_error(500, "OperationTimedOut"), "timeout"),
        (response_error(500, "InternalError"), "other"),
        (aiohttp.ServerTimeoutError("read"), "timeout"),
        (aiohttp.ServerDisconnectedError(), "unreachable"),
        (ValueError("a bug"), "other"),
    ],
)
def test_storage_error_labels_are_a_fixed_set(error: BaseException, label: str) -> None:
    assert error_label(error) == label
    assert label in ERROR_CODES


async def test_storage_errors_are_counted_by_code(storage: Storage) -> None:
    """Real Azurite: a delete with a receipt that is no longer ours, a message a queue does not have,
    and an upload to a container that is gone are counted by Azure's code."""
    metrics = Metrics(storage_codes=ERROR_CODES)
    storage.on_error = metrics.storage_error
    queue = storage.settings.queue_name[0]
    await storage.send(queue, "{}")
    [message] = await storage.receive(queue, 1, 30)
    assert message.inserted_on is not None and abs(time.time() - message.inserted_on) < 60
    await storage.set_visibility(message, 30)  # a new receipt
    stale = Message(message.queue, message.id, "AAAAAAAAAAAAAAAAAAAAAAAAAAA=", 1, "{}")
    with pytest.raises(LeaseLost):
        await storage.delete(stale)
    await storage.container.delete_container()
    with pytest.raises(StorageRefused):
        await storage.upload("gone/0.png", b"x", "image/png")
    get = metrics.registry.get_sample_value
    counted = {code: get("sidecar_storage_errors_total", {"code": code}) or 0.0 for code in ERROR_CODES}
    assert counted["ContainerNotFound"] == 1
    assert counted["PopReceiptMismatch"] + counted["MessageNotFound"] == 1
    assert sum(counted.values()) == 2, counted
