"""How fast ``enqueue`` sends, against a bare concurrent ``send_message`` loop, in one run.

Starts a fresh Azurite (``sidecar.dev.devenv.azurite``), then puts the same N generated jobs on a fresh
queue two ways, with the same concurrency and the same SDK client:

* ``bare``: ``QueueClient.send_message`` from ``concurrency`` tasks over texts prepared beforehand
  (no generation, no validation, no retry wrapper: the ceiling);
* ``sidecar``: ``sidecar.enqueue.enqueue`` over ``generated(N, seed)``: generating, validating every
  job with the worker's job model and sending with retries, as ``python -m sidecar enqueue`` does.

Each round sends N messages per mode in chunks (``--chunk``), the modes taking turns chunk by chunk
in A-B-B-A order: other processes on the machine load it unevenly over seconds, and short alternating
chunks make both modes see the same load. A warm-up of each mode comes first (connections, Azurite's
JIT). Each round checks that each queue holds exactly N messages afterwards.

Prints one JSON object: messages/s and the process's CPU ms per message of each mode, per round and
overall, ``ratio`` = sidecar / bare (overall messages/s; the aim is >= 0.8) and the load average
before and after.

    .venv/bin/python scripts/enqueue_rate.py [--jobs 5000] [--concurrency 32] [--rounds 3] [--chunk 500]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.config import load_settings
from sidecar.dev.devenv import azurite
from sidecar.enqueue import Item, enqueue, generated
from sidecar.storage import Storage

MODES = ("bare", "sidecar")


async def bare(storage: Storage, queue: str, texts: Iterator[str], concurrency: int) -> int:
    client = storage.queue(queue)
    sent = 0

    async def sender() -> None:
        nonlocal sent
        for text in texts:
            await client.send_message(text)
            sent += 1

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return sent


async def sidecar(storage: Storage, queue: str, items: Iterator[Item], concurrency: int) -> int:
    report = await enqueue(storage, [queue], items, concurrency=concurrency)
    if report.bad_count:
        raise SystemExit(f"enqueue found {report.bad_count} bad generated job(s)")
    return report.sent


async def depth(storage: Storage, queue: str) -> int:
    props = await storage.queue(queue).get_queue_properties()
    return int(props.approximate_message_count or 0)


async def one_round(storage: Storage, args: argparse.Namespace, name: str) -> dict[str, dict[str, float]]:
    """N messages per mode on fresh queues, chunk by chunk, A-B-B-A; wall and CPU seconds per mode."""
    queues = {mode: f"{name}-{mode}" for mode in MODES}
    for queue in queues.values():
        await storage.queue(queue).create_queue()
    texts = iter([text for _, text in generated(args.jobs, args.seed)])
    items = generated(args.jobs, args.seed)  # generated lazily, inside the timed sends
    spent = {mode: {"wall_s": 0.0, "cpu_s": 0.0, "sent": 0.0} for mode in MODES}
    for index in range(-(-args.jobs // args.chunk)):
        for mode in MODES if index % 2 == 0 else MODES[::-1]:
            cpu, wall = time.process_time(), time.perf_counter()
            if mode == "bare":
                sent = await bare(
                    storage, queues[mode], itertools.islice(texts, args.chunk), args.concurrency
                )
            else:
                sent = await sidecar(
                    storage, queues[mode], itertools.islice(items, args.chunk), args.concurrency
                )
            spent[mode]["wall_s"] += time.perf_counter() - wall
            spent[mode]["cpu_s"] += time.process_time() - cpu
            spent[mode]["sent"] += sent
    for mode, queue in queues.items():
        found = await depth(storage, queue)
        if found != args.jobs or spent[mode]["sent"] != args.jobs:
            raise SystemExit(f"{mode}: queue {queue} holds {found} messages, expected {args.jobs}")
        await storage.queue(queue).delete_queue()  # keeps Azurite's in-memory store the same size
    return spent


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    async with azurite() as server:
        settings = load_settings({"storage_connection_string": server.connection_string})
        storage = Storage.connect(settings)
        rounds: list[dict[str, Any]] = []
        try:
            warm = argparse.Namespace(**{**vars(args), "jobs": min(500, args.jobs)})
            await one_round(storage, warm, "warmup")
            for index in range(args.rounds):
                spent = await one_round(storage, args, f"round{index}")
                for mode in MODES:
                    rounds.append(
                        {
                            "round": index,
                            "mode": mode,
                            "wall_s": round(spent[mode]["wall_s"], 3),
                            "msgs_per_s": round(args.jobs / spent[mode]["wall_s"], 1),
                            "cpu_ms_per_msg": round(1000 * spent[mode]["cpu_s"] / args.jobs, 3),
                        }
                    )
                    print(json.dumps(rounds[-1]), file=sys.stderr)
        finally:
            await storage.close()

    def overall(mode: str) -> tuple[float, float]:
        mine = [r for r in rounds if r["mode"] == mode]
        wall = sum(r["wall_s"] for r in mine)
        return len(mine) * args.jobs / wall, sum(r["cpu_ms_per_msg"] for r in mine) / len(mine)

    bare_rate, bare_cpu = overall("bare")
    sidecar_rate, sidecar_cpu = overall("sidecar")
    rate = {(r["round"], r["mode"]): r["msgs_per_s"] for r in rounds}
    return {
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "chunk": args.chunk,
        "cpus": os.cpu_count(),
        "bare_msgs_per_s": round(bare_rate, 1),
        "sidecar_msgs_per_s": round(sidecar_rate, 1),
        "bare_cpu_ms_per_msg": round(bare_cpu, 3),
        "sidecar_cpu_ms_per_msg": round(sidecar_cpu, 3),
        "ratio": round(sidecar_rate / bare_rate, 3),
        "round_ratios": [round(rate[i, "sidecar"] / rate[i, "bare"], 3) for i in range(args.rounds)],
        "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "per_round": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=5000, help="messages per mode and round")
    parser.add_argument("--concurrency", type=int, default=32, help="sends in flight, both modes")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds")
    parser.add_argument("--chunk", type=int, default=500, help="messages per turn of a mode")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated jobs")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args))))


if __name__ == "__main__":
    main()
