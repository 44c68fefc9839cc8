"""Model affinity end to end: a mixed queue through the worker on Azurite and a stand-in that charges
for each checkpoint load, in queue order and by affinity; ``enqueue --route-by-checkpoint`` over
shards; ``bench --a1111-url`` counting the switches itself."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.app import run_worker
from sidecar.enqueue import Routing, enqueue
from sidecar.jobs import parse_job
from sidecar.storage import Storage
from tests.conftest import ROOT, _azurite_or_skip, run_cli
from tests.helpers import blob_names, queue_length, read_blob

CHECKPOINTS = ["alpha.safetensors", "beta.safetensors", "gamma.safetensors"]  # alpha: loaded at start
STANDIN_FLAGS = ["--checkpoints", ",".join(CHECKPOINTS), "--model-load-seconds", "0.3"]


def mixed_jobs(tag: str, count: int) -> list[dict[str, Any]]:
    """beta, gamma, the default, again and again: in queue order every job loads a checkpoint."""
    jobs = []
    for n in range(count):
        job: dict[str, Any] = {"id": f"{tag}-{n}", "prompt": f"a lighthouse {n}", "steps": 2}
        job.update(width=64, height=64)
        checkpoint = [CHECKPOINTS[1], CHECKPOINTS[2], None][n % 3]
        if checkpoint:
            job["override_settings"] = {"sd_model_checkpoint": checkpoint}
        jobs.append(job)
    return jobs


def queue_order_switches(jobs: list[dict[str, Any]]) -> int:
    names = [job.get("override_settings", {}).get("sd_model_checkpoint", CHECKPOINTS[0]) for job in jobs]
    return sum(a != b for a, b in zip([CHECKPOINTS[0], *names], names, strict=False))


async def test_a_mixed_queue_by_affinity_loads_fewer_checkpoints_and_no_job_waits_past_the_bound(
    make_settings: Any, own_standin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps: 18 jobs cycling over two checkpoint overrides and none (the default) on a stand-in that
    takes 0.3 s per checkpoint load, all in the worker's prefetch window. In queue order
    (SIDECAR_AFFINITY_MAX_WAIT=0) the stand-in loads a checkpoint for every job; by affinity (bound
    2 s) it loads fewer, every job is stored, and no job's passed_over_s (its job.json timings and
    its "job done" line) is over the bound."""
    bound = 2.0
    async with own_standin(0.05, STANDIN_FLAGS) as a1111:
        switches = {}
        for wait in (0.0, bound):
            settings = make_settings(a1111_url=a1111.url, prefetch=18, affinity_max_wait=wait)
            jobs = mixed_jobs(f"mix{int(wait)}", 18)
            storage = Storage.connect(settings)
            try:
                await storage.ensure()
                await enqueue(
                    storage, settings.queue_name, [(n, json.dumps(j)) for n, j in enumerate(jobs, 1)]
                )
                async with httpx.AsyncClient(base_url=a1111.url) as http:
                    (await http.post("/standin/reset")).raise_for_status()
                caplog.clear()
                caplog.set_level(logging.INFO, logger="sidecar")
                assert await run_worker(settings, exit_when_empty=True) == 0
                async with httpx.AsyncClient(base_url=a1111.url) as http:
                    stats = (await http.get("/standin/stats")).json()
                switches[wait] = stats["model_switches"]
                ids = [job["id"] for job in jobs]
                ours = [name for name in await blob_names(storage) if name.startswith(f"mix{int(wait)}-")]
                assert ours == sorted(f"{i}/{n}" for i in ids for n in ("0.png", "job.json"))
                done = [r for r in caplog.records if r.getMessage() == "job done"]
                assert sorted(r.job_id for r in done) == sorted(ids)  # type: ignore[attr-defined]
                passed = [float(r.passed_over_s) for r in done]  # type: ignore[attr-defined]
                assert all(0 <= p <= bound for p in passed), passed
                record = json.loads(await read_blob(storage, f"{ids[0]}/job.json"))
                assert "passed_over_s" in record["timings"]
                (line,) = [r for r in caplog.records if r.getMessage() == "affinity"]
                assert line.model_switches == switches[wait]  # type: ignore[attr-defined]
                if wait:
                    assert max(passed) > 0  # jobs were reordered
                else:
                    assert passed == [0.0] * len(passed)
            finally:
                await storage.close()
    assert switches[0.0] == queue_order_switches(jobs) == 18
    assert switches[bound] < switches[0.0]


def test_routing_by_checkpoint_is_stable_and_follows_explicit_routes() -> None:
    def job(checkpoint: str | None) -> Any:
        body: dict[str, Any] = {"prompt": "x"}
        if checkpoint:
            body["override_settings"] = {"sd_model_checkpoint": checkpoint}
        return parse_job(json.dumps(body), "m")

    queues = ["q-a", "q-b", "q-c"]
    routing = Routing(queues)
    shards = {name: routing.shard(job(name)) for name in CHECKPOINTS}
    assert shards == {name: Routing(queues).shard(job(name)) for name in CHECKPOINTS}  # a new run agrees
    assert routing.shard(job("beta.safetensors [1234abcd]")) == shards["beta.safetensors"]
    assert routing.shard(job(None)) == routing.shard(job(None))
    routed = Routing(queues, Routing.parse(["gamma.safetensors=q-a", "beta.safetensors [1234abcd]=q-c"]))
    assert routed.shard(job("gamma.safetensors")) == 0 and routed.shard(job("beta.safetensors")) == 2
    with pytest.raises(ValueError, match="q-z"):
        Routing(queues, {"alpha": "q-z"})
    with pytest.raises(ValueError, match="MODEL=QUEUE"):
        Routing.parse(["alpha"])


async def test_enqueue_route_by_checkpoint_puts_each_models_jobs_on_one_shard(
    make_settings: Any, tmp_path: Path
) -> None:
    """Steps: 12 jobs over three checkpoints enqueued with --route-by-checkpoint onto three shards,
    beta routed explicitly: each shard holds exactly the jobs its checkpoints hash (or route) to."""
    settings = make_settings(queue_name=",".join(f"{s}-{make_settings().queue_name[0]}" for s in "abc"))
    queues = settings.queue_name
    jobs = mixed_jobs("route", 12)
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    done = run_cli(
        settings,
        "enqueue",
        "--file",
        str(path),
        "--route-by-checkpoint",
        "--route",
        f"beta.safetensors={queues[2]}",
    )
    assert done.returncode == 0, done.stderr
    routing = Routing(queues, {"beta.safetensors": queues[2]})
    expected = [0, 0, 0]
    for job in jobs:
        expected[routing.shard(parse_job(json.dumps(job), "m"))] += 1
    storage = Storage.connect(settings)
    try:
        assert [await queue_length(storage, q) for q in queues] == expected
        assert expected[2] >= 4  # beta's four jobs
    finally:
        await storage.close()
    bad = run_cli(settings, "enqueue", "--file", str(path), "--route", "beta.safetensors=nowhere")
    assert bad.returncode != 0 and "nowhere" in bad.stderr


def test_bench_against_a_given_a1111_counts_the_switches_itself(tmp_path: Path) -> None:
    """Steps: a stand-in started here stands for a real A1111 (bench starts none and reads no stats);
    a mixed run over its two checkpoints in queue order: the worker's own count of checkpoint changes
    is what the stand-in recorded (the warm-up generation, on the default checkpoint, may add one),
    and busy comes from the worker."""
    _azurite_or_skip()
    import asyncio

    from sidecar.dev.devenv import standin

    async def main() -> tuple[list[dict[str, Any]], int]:
        names = "bench-model-0.safetensors,bench-model-1.safetensors"
        async with standin(0.02, ["--checkpoints", names, "--model-load-seconds", "0.05"]) as a1111:
            command = [sys.executable, "-m", "sidecar", "bench", "--a1111-url", a1111.url, "--models", "2"]
            command += ["--jobs", "8", "--modes", "queue-order", "--prefetch", "4", "--latency-ms", "5"]
            command += ["--report", str(tmp_path / "report")]
            done = await asyncio.to_thread(
                subprocess.run, command, cwd=ROOT, capture_output=True, text=True, timeout=110, check=False
            )
            assert done.returncode == 0, done.stderr[-3000:]
            async with httpx.AsyncClient(base_url=a1111.url) as http:
                stats = (await http.get("/standin/stats")).json()
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()], stats[
            "model_switches"
        ]

    lines, recorded = asyncio.run(main())
    (line,) = lines
    assert line["busy_from"] == "worker" and 0 < line["gpu_busy_fraction"] <= 1
    assert line["verified"] is True
    assert line["model_switches"] <= recorded <= line["model_switches"] + 1
