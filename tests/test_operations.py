"""Running it: health, readiness and metrics endpoints, JSON logs, the summary line, A1111 as a
supervised child, and Azure AD sign-in."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.config import load_settings
from sidecar.dev.devenv import free_port
from sidecar.storage import Storage
from tests.conftest import ROOT
from tests.helpers import WorkerProcess, blob_names, standin_generating, visible_messages, wait_until

JOB = {"prompt": "a fox in a flower meadow <lora:more_details:0.7>", "sampler_name": "k_euler_a", "steps": 15}


async def get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(f"http://127.0.0.1:{port}{path}", timeout=5)


async def answers(port: int, path: str, status: int) -> bool:
    try:
        return (await get(port, path)).status_code == status
    except httpx.HTTPError:
        return False


async def test_endpoints_through_a_run(
    make_settings: Any, own_standin: Any, storage: Storage, settings: Any, tmp_path: Path
) -> None:
    """Steps: A1111 loads its model for 3 s: /healthz is 200 and /readyz 503 meanwhile; after the warm-up
    /readyz is 200 and jobs run (a JSON log line with the job id each, metrics counted); on SIGTERM, while
    a long job generates, /readyz turns 503 (draining) and the worker exits 0."""
    async with own_standin(0.3, ["--startup-delay", "3"]) as loading:
        port = free_port()
        settings = make_settings(
            a1111_url=loading.url,
            http_port=port,
            summary_interval=0.5,
        )
        queue = settings.queue_name[0]
        worker = WorkerProcess(settings, log_dir=tmp_path)
        try:
            await wait_until(lambda: answers(port, "/healthz", 200), what="healthz")
            not_ready = await get(port, "/readyz")
            assert not_ready.status_code == 503
            assert "A1111 has not passed its warm-up" in not_ready.json()["reasons"]
            await wait_until(lambda: answers(port, "/readyz", 200), timeout=30, what="ready")
            for index in range(3):
                await storage.send(queue, json.dumps({**JOB, "id": f"ops-{index}"}))
            await worker.wait_for(lambda: len(worker.done_jobs()) == 3, what="3 jobs")
            metrics = (await get(port, "/metrics")).text
            assert 'sidecar_jobs_total{outcome="succeeded"} 3.0' in metrics
            assert "sidecar_a1111_busy_fraction" in metrics
            assert 'sidecar_stage_seconds_count{stage="generate"} 3.0' in metrics
            assert "sidecar_in_flight" in metrics and "sidecar_images_total 3.0" in metrics
            assert "process_cpu_seconds_total" in metrics and "process_resident_memory_bytes" in metrics
            await worker.wait_for(
                lambda: any(m.get("images_per_min") for m in worker.messages("summary")),
                what="a summary line with images",
            )

            await storage.send(queue, json.dumps({**JOB, "id": "long", "n_iter": 8}))  # 2.4 s
            await wait_until(
                lambda: standin_generating(loading.url, requests=5), what="the long job generating"
            )
            worker.signal(signal.SIGTERM)
            await wait_until(lambda: answers(port, "/readyz", 503), timeout=10, what="draining")
            assert await worker.wait_exit() == 0
        finally:
            worker.stop()
    done = worker.messages("job done")
    assert [entry["job_id"] for entry in done] == ["ops-0", "ops-1", "ops-2", "long"]
    assert all(entry["stage"] == "done" and entry["generate_s"] > 0 and "ts" in entry for entry in done)
    summary = next(m for m in worker.messages("summary") if m.get("images_per_min"))
    assert {"a1111_busy_fraction", "failures", "jobs_done"} <= set(summary)
    assert summary["cpu_ms_per_image"] > 0


def _child_pid(worker: WorkerProcess) -> int | None:
    started = worker.messages("started A1111")
    return int(started[0]["pid"]) if started else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _supervised(make_settings: Any, settings: Any, seconds: float) -> Any:
    port = free_port()
    command = (
        f"{sys.executable} -m a1111.standin --host 127.0.0.1 --port {port} --seconds-per-image {seconds}"
    )
    return make_settings(
        a1111_command=command,
        a1111_url=f"http://127.0.0.1:{port}",
        prefetch=2,
        visibility_timeout=60,
    )


async def test_supervised_a1111_killed_stops_the_sidecar(
    make_settings: Any, storage: Storage, settings: Any, tmp_path: Path
) -> None:
    """Steps: the sidecar starts the stand-in as its child; after two jobs the child is SIGKILLed. The
    sidecar notices at once, gives back the held messages and exits non-zero within seconds."""
    settings = _supervised(make_settings, settings, 0.3)
    queue = settings.queue_name[0]
    for index in range(10):
        await storage.send(queue, json.dumps({**JOB, "id": f"sup-{index}"}))
    worker = WorkerProcess(settings, log_dir=tmp_path)
    try:
        await worker.wait_for(lambda: len(worker.done_jobs()) >= 2, timeout=60, what="2 jobs")
        pid = _child_pid(worker)
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        killed = time.monotonic()
        assert await worker.wait_exit(timeout=20) == 1
        assert time.monotonic() - killed < 10
    finally:
        worker.stop()
    done = worker.done_jobs()
    assert len(await visible_messages(storage, queue)) == 10 - len(done)
    # besides the jobs' blobs, only the failure note of the job A1111 died under (read on its next try)
    names = await blob_names(storage)
    assert len([name for name in names if not name.startswith("_failures/")]) == 2 * len(done)
    assert any(m["msg"].startswith("A1111 exited with") for m in worker.lines())


async def test_sigterm_stops_sidecar_and_supervised_a1111(
    make_settings: Any, storage: Storage, settings: Any, tmp_path: Path
) -> None:
    """Steps: supervised stand-in, a few jobs; SIGTERM to the sidecar: it drains, then stops its child;
    both are gone and the sidecar exits 0."""
    settings = _supervised(make_settings, settings, 0.1)
    for index in range(3):
        await storage.send(settings.queue_name[0], json.dumps({**JOB, "id": f"term-{index}"}))
    worker = WorkerProcess(settings, log_dir=tmp_path)
    try:
        await worker.wait_for(lambda: len(worker.done_jobs()) == 3, timeout=60, what="3 jobs")
        pid = _child_pid(worker)
        assert pid is not None and _alive(pid)
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit(timeout=30) == 0
    finally:
        worker.stop()
    assert not _alive(pid)
    assert worker.messages("stopped A1111")


def test_account_url_signs_in_with_azure_ad(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIDECAR_STORAGE_ACCOUNT_URL builds blob and queue clients on DefaultAzureCredential."""
    for name in list(os.environ):
        if name.startswith("SIDECAR_") or name == "AZURE_STORAGE_CONNECTION_STRING":
            monkeypatch.delenv(name)
    settings = load_settings({"storage_account_url": "https://acct.blob.core.windows.net"})
    storage = Storage.connect(settings)
    assert storage._queues.url.startswith("https://acct.queue.core.windows.net")
    assert storage._blobs.url.startswith("https://acct.blob.core.windows.net")
    assert type(storage._queues.credential).__name__ == "DefaultAzureCredential"


ALLOCATOR_PROBE = """
import ctypes
from sidecar.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
assert keep_freed_memory()
buffer = bytes(8 << 20)
mmapped = libc.mallinfo2().hblkhd
del buffer
print(mmapped, libc.mallinfo2().fordblks)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_big_buffers_come_from_the_heap_and_stay_for_the_next_job() -> None:
    """An 8 MB buffer (a large txt2img answer) is served from the heap, not a fresh mmap, and its memory
    stays free in the heap after it is released, for the next job to reuse without page faults."""
    probe = subprocess.run(
        [sys.executable, "-c", ALLOCATOR_PROBE], capture_output=True, text=True, check=True, cwd=ROOT
    )
    mmapped, free_in_heap = map(int, probe.stdout.split())
    assert mmapped < 8 << 20
    assert free_in_heap >= 8 << 20
