"""A small fleet against one Azurite: count the storage requests per job and check docs/scaling.md.

Starts Azurite and one A1111 stand-in per worker (each node has its own GPU), enqueues J generated
jobs over S shards (every ``--poison-every``-th one invalid, to take the poison path), then runs K
workers in this process (``sidecar.app.run_worker``, distinct worker ids, ``--exit-when-empty``) with
a result queue. Every HTTP request the workers make to storage is counted at the aiohttp level (so
retries count too) and sorted by what it is: receive, renew/release (update), delete, put on a job,
poison or result queue, blob put, set-up. ``Storage.receive`` is wrapped as well, to tell receives
that found messages from empty polls.

Then it compares the counts with the formula of docs/scaling.md, term by term:

    receive          1 per job (prefetch room is refilled one job at a time) + empty polls
    renew            floor(H / (V/2)) per job, H = how long the message was held (job.json timings)
    blob put         images + 1 (job.json) per succeeded job
    delete           1 per job (succeeded or poisoned)
    poison put       1 per poisoned job
    result put       1 per job that passed validation

and projects the requests per second of a fleet from the measured requests per job. Prints one JSON
object. A minute or two: K=8, J=320, 0.5 s per image.

    .venv/bin/python scripts/simulate_fleet.py [--workers 8] [--jobs 320] [--shards 2] [--visibility 2]

The images are 256x256 (the request count does not depend on their size; it keeps the run light).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.app import run_worker
from sidecar.config import Settings, load_settings
from sidecar.dev.devenv import Azurite, azurite, standin
from sidecar.prompts import generate_jobs
from sidecar.storage import Message, Storage

# seed run: 9.27 M images in 24 h on 750 nodes
SEED_CYCLE_S = 750 * 86_400 / 9_270_000
FLEETS = (1, 750, 7_500, 10_000)
QUEUE_TARGET = 2_000  # messages/s per queue
ACCOUNT_TARGET = 20_000  # requests/s per account


class RequestCounter:
    """Sorts every storage request by service, queue role and operation."""

    def __init__(self, server: Azurite, roles: dict[str, str], visibility: int) -> None:
        self.queue_port, self.blob_port = server.queue_port, server.blob_port
        self.roles = roles
        self.visibility = visibility
        self.counts: Counter[str] = Counter()
        self.on = False
        self.receives = Counter[str]()

    def record(self, method: str, url: str) -> None:
        if not self.on:
            return
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        path = parts.path.split("/")  # ["", account, name, "messages", id]
        if parts.port == self.queue_port and len(path) >= 4 and path[3] == "messages":
            role = self.roles.get(path[2], "other")
            if method == "POST":
                self.counts[f"queue.put.{role}"] += 1
            elif method == "GET":
                self.counts["queue.peek" if "peekonly" in query else f"queue.receive.{role}"] += 1
            elif method == "PUT":
                seconds = int(query.get("visibilitytimeout", ["0"])[0])
                self.counts["queue.renew" if seconds == self.visibility else "queue.release"] += 1
            elif method == "DELETE":
                self.counts[f"queue.delete.{role}"] += 1
        elif parts.port == self.blob_port and method == "PUT" and "restype" not in query:
            self.counts["blob.put"] += 1
        else:
            self.counts["setup"] += 1  # create queue/container, properties


def count_requests(counter: RequestCounter) -> None:
    """Wrap aiohttp (the Azure SDK's transport) and Storage.receive to count what the workers do."""
    request = aiohttp.ClientSession._request
    receive = Storage.receive

    async def counted(self: aiohttp.ClientSession, method: str, url: Any, *args: Any, **kwargs: Any) -> Any:
        counter.record(method, str(url))
        return await request(self, method, url, *args, **kwargs)

    async def counted_receive(self: Storage, queue: str, count: int, visibility: int) -> list[Message]:
        messages = await receive(self, queue, count, visibility)
        if counter.on:
            counter.receives["found" if messages else "empty"] += 1
            counter.receives["messages"] += len(messages)
        return messages

    aiohttp.ClientSession._request = counted  # type: ignore[method-assign,assignment]
    Storage.receive = counted_receive  # type: ignore[method-assign,assignment]


def jobs(count: int, poison_every: int) -> list[tuple[str, bool]]:
    """(message text, valid?) for ``count`` generated jobs; every poison_every-th has an unknown field."""
    out = []
    for index, spec in enumerate(generate_jobs(count, seed=11), start=1):
        spec.update(width=256, height=256)
        valid = not (poison_every and index % poison_every == 0)
        if not valid:
            spec["colour"] = "red"
        out.append((json.dumps(spec), valid))
    return out


async def books(storage: Storage, settings: Settings) -> dict[str, Any]:
    """What the run left: job.json records, result messages (with each job's total held time), the
    poison queues' and job queues' depths."""
    records = []
    async for blob in storage.container.list_blobs():
        if blob.name.endswith("/job.json"):
            data = await (await storage.container.download_blob(blob.name)).readall()
            records.append(json.loads(data))
    assert settings.result_queue_name
    results = []
    while batch := await storage.receive(settings.result_queue_name, 32, 300):
        results += [json.loads(m.content) for m in batch]

    async def depth(queue: str) -> int:
        return (await storage.queue(queue).get_queue_properties()).approximate_message_count or 0

    poisoned = sum([await depth(settings.poison_queue_for(q)) for q in settings.queue_name])
    left = sum([await depth(q) for q in settings.queue_name])
    return {"records": records, "results": results, "poisoned": poisoned, "left": left}


def formula(records: list[dict[str, Any]], held: list[float], poisoned: int, visibility: int) -> Counter[str]:
    """The requests docs/scaling.md predicts for these jobs (empty polls and set-up aside)."""
    succeeded = len(records)
    images = sum(len(r["images"]) for r in records)
    return Counter(
        {
            "receive (found)": succeeded + poisoned,  # upper bound: 1 per job; a batch of n counts 1
            "renew": sum(math.floor(seconds / (visibility / 2)) for seconds in held),
            "blob put": images + succeeded,
            "delete": succeeded + poisoned,
            "poison put": poisoned,
            "result put": succeeded,
        }
    )


def measured(counter: RequestCounter) -> Counter[str]:
    c = counter.counts
    return Counter(
        {
            "receive (found)": counter.receives["found"],
            "renew": c["queue.renew"],
            "blob put": c["blob.put"],
            "delete": c["queue.delete.jobs"],
            "poison put": c["queue.put.poison"],
            "result put": c["queue.put.results"],
        }
    )


def projection(per_job: float, per_job_queue: float, poll_max: float) -> list[dict[str, Any]]:
    """Requests/s of fleets at the seed's cycle (7.0 s per job per node) with the measured mix."""
    rows = []
    for nodes in FLEETS:
        jobs_per_s = nodes / SEED_CYCLE_S
        # the producer's put is one more request per job on the job queues, during the fill
        queue_ops = jobs_per_s * (per_job_queue + 1)
        queues_needed = max(1, math.ceil(queue_ops / (QUEUE_TARGET / 2)))  # at half the target
        idle = nodes * queues_needed / poll_max
        rows.append(
            {
                "nodes": nodes,
                "jobs_per_s": round(jobs_per_s, 1),
                "requests_per_s": round(jobs_per_s * (per_job + 1)),
                "job_queue_ops_per_s": round(queue_ops),
                "queues_at_half_target": queues_needed,
                "idle_polls_per_s_when_empty": round(idle),
                "accounts_at_half_target": max(
                    1, math.ceil(jobs_per_s * (per_job + 1) / (ACCOUNT_TARGET / 2))
                ),
            }
        )
    return rows


async def simulate(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("sidecar").setLevel(logging.ERROR)  # invalid jobs warn; the counts tell the story
    async with azurite() as server, contextlib.AsyncExitStack() as stack:
        gpus = await asyncio.gather(
            *(stack.enter_async_context(standin(args.seconds_per_image)) for _ in range(args.workers))
        )
        shards = [f"jobs-{letter}" for letter in "abcdefghijklmnop"[: args.shards]]
        base: dict[str, Any] = {
            "storage_connection_string": server.connection_string,
            "queue_name": ",".join(shards),
            "result_queue_name": "results",
            "container_name": "images",
            "create_queues": True,
            "visibility_timeout": args.visibility,
            "prefetch": args.prefetch,
            "http_port": 0,
            "poll_interval_min": 0.1,
            "poll_interval_max": args.poll_max,
            "log_format": "json",
        }
        settings = load_settings(base)
        roles = {q: "jobs" for q in shards} | {settings.poison_queue_for(q): "poison" for q in shards}
        roles["results"] = "results"
        counter = RequestCounter(server, roles, args.visibility)
        count_requests(counter)

        storage = Storage.connect(settings)
        try:
            await storage.ensure()
            texts = jobs(args.jobs, args.poison_every)
            for index, (text, _) in enumerate(texts):
                await storage.send(shards[index % len(shards)], text)

            counter.on = True
            started = time.monotonic()
            codes = await asyncio.gather(
                *(
                    run_worker(
                        load_settings({**base, "a1111_url": gpu.url, "worker_id": f"node-{index}"}),
                        exit_when_empty=True,
                    )
                    for index, gpu in enumerate(gpus)
                )
            )
            wall = time.monotonic() - started
            counter.on = False
            result = await books(storage, settings)
        finally:
            await storage.close()

    records, poisoned = result["records"], result["poisoned"]
    succeeded = len(records)
    # fetched -> deleted, from the result messages (sent right after the delete)
    held = sorted(r["timings"]["total_s"] for r in result["results"] if r["status"] == "succeeded")
    expected = formula(records, held, poisoned, args.visibility)
    got = measured(counter)
    job_requests = sum(got.values())
    all_requests = sum(counter.counts.values())
    per_job = job_requests / (succeeded + poisoned)
    queue_side = got["receive (found)"] + got["renew"] + got["delete"]
    return {
        "workers": args.workers,
        "shards": args.shards,
        "jobs": args.jobs,
        "seconds_per_image": args.seconds_per_image,
        "visibility_timeout": args.visibility,
        "prefetch": args.prefetch,
        "exit_codes": codes,
        "succeeded": succeeded,
        "poisoned": poisoned,
        "left_on_queues": result["left"],
        "result_messages": len(result["results"]),
        "wall_s": round(wall, 1),
        "jobs_per_s": round((succeeded + poisoned) / wall, 2),
        "storage_requests_per_s": round(all_requests / wall, 1),
        "held_s_p50_p95": [held[len(held) // 2], held[int(len(held) * 0.95)]] if held else None,
        "requests_by_kind": dict(sorted(counter.counts.items())),
        "receives": dict(counter.receives),
        "formula": dict(expected),
        "measured": dict(got),
        "measured_over_formula": {
            k: round(got[k] / expected[k], 3) if expected[k] else None for k in expected
        },
        "requests_per_job": round(per_job, 3),
        "empty_polls_per_job": round(counter.receives["empty"] / (succeeded + poisoned), 3),
        # a message received twice: a renewal came too late (V=2 s on a busy loop) and another node took it
        "redelivered": counter.receives["messages"] - (succeeded + poisoned),
        "fleet_projection": projection(
            # production: V=60 s and a 7 s cycle hold a message ~2 cycles, under V/2: no renewals
            per_job - got["renew"] / (succeeded + poisoned),
            (queue_side - got["renew"]) / (succeeded + poisoned),
            10.0,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=8, help="in-process workers, one stand-in each")
    parser.add_argument("--jobs", type=int, default=320)
    parser.add_argument("--shards", type=int, default=2, help="job queues (SIDECAR_QUEUE_NAME=a,b,...)")
    parser.add_argument("--seconds-per-image", type=float, default=0.5)
    parser.add_argument(
        "--visibility", type=int, default=2, help="SIDECAR_VISIBILITY_TIMEOUT (renewal at half)"
    )
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--poison-every", type=int, default=40, help="every Nth job invalid (0: none)")
    parser.add_argument("--poll-max", type=float, default=1.0, help="SIDECAR_POLL_INTERVAL_MAX of the run")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(simulate(args))))


if __name__ == "__main__":
    main()
