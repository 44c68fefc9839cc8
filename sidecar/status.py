"""``status``: queue depth, poison depth and reasons, results stored and per minute; ``--watch`` refreshes."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sidecar.config import Settings
from sidecar.storage import Storage

SCAN_LIMIT = 100_000  # blobs listed at most per refresh; listing is paged by 5,000


@dataclass
class Snapshot:
    depth: dict[str, int] = field(default_factory=dict)
    poison_depth: dict[str, int] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)
    results_depth: int | None = None
    stored_jobs: int = 0
    stored_images: int = 0
    scan_capped: bool = False
    last_minute: int = 0


async def _depth(storage: Storage, queue: str) -> int:
    props = await storage.queue(queue).get_queue_properties()
    return int(props.approximate_message_count or 0)


async def snapshot(storage: Storage) -> Snapshot:
    settings = storage.settings
    snap = Snapshot()
    for queue in settings.queue_name:
        poison = settings.poison_queue_for(queue)
        snap.depth[queue], snap.poison_depth[poison] = await asyncio.gather(
            _depth(storage, queue), _depth(storage, poison)
        )
        for message in await storage.queue(poison).peek_messages(max_messages=32):
            try:
                error = json.loads(message.content)["error"]
                snap.reasons[f"{error['type']}: {str(error['detail'])[:80]}"] += 1
            except (ValueError, KeyError, TypeError):
                snap.reasons["(not written by the sidecar)"] += 1
    if settings.result_queue_name:
        snap.results_depth = await _depth(storage, settings.result_queue_name)
    minute_ago = datetime.now(UTC) - timedelta(minutes=1)
    seen = 0
    async for blob in storage.container.list_blobs():
        seen += 1
        if blob.name.endswith("/job.json"):
            snap.stored_jobs += 1
            if blob.last_modified and blob.last_modified >= minute_ago:
                snap.last_minute += 1
        elif blob.name.endswith(".png"):
            snap.stored_images += 1
        if seen >= SCAN_LIMIT:
            snap.scan_capped = True
            break
    return snap


def render(snap: Snapshot, settings: Settings) -> str:
    plus = "+" if snap.scan_capped else ""
    lines = [f"a1111-sidecar status  {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    for queue, depth in snap.depth.items():
        lines.append(f"  queue {queue:<28} {depth:>10,} waiting")
    for queue, depth in snap.poison_depth.items():
        lines.append(f"  poison {queue:<27} {depth:>10,} failed")
    for reason, count in snap.reasons.most_common(5):
        lines.append(f"      {count:>4} x {reason}")
    if snap.results_depth is not None:
        lines.append(f"  results {settings.result_queue_name:<26} {snap.results_depth:>10,} messages")
    lines.append(
        f"  container {settings.container_name:<24} {snap.stored_jobs:>10,}{plus} jobs, "
        f"{snap.stored_images:,}{plus} images"
    )
    lines.append(f"  finished in the last minute {snap.last_minute:>17,}{plus} jobs/min")
    return "\n".join(lines)


async def show_status(settings: Settings, watch: bool = False, interval: float = 5.0) -> int:
    storage = Storage.connect(settings)
    try:
        while True:
            text = render(await snapshot(storage), settings)
            if watch and sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")
            print(text, flush=True)
            if not watch:
                return 0
            await asyncio.sleep(interval)
    finally:
        await storage.close()
