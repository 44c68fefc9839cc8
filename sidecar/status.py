"""``status``: how a run stands, from storage alone (no access to the nodes needed).

* Every shard: messages in its queue (Azure's approximate count, which includes the messages workers
  hold) and in its poison queue, with the reasons of the oldest poisoned messages: a peek sees at
  most 32 per poison queue, so the reasons are a sample, not a census.
* The result queue's depth, if ``SIDECAR_RESULT_QUEUE_NAME`` is set.
* What does not exist (a queue, a poison queue, the result queue, the container) is shown as
  ``missing``, never counted as empty: the totals are then unknown (``null`` in ``--json``, which lists
  it in ``missing``), and a single refresh exits 1 with one line naming it (a typo in a name, or
  nothing set up yet).
* Results stored: ``job.json`` and image blobs counted by listing the container, and the jobs whose
  ``job.json`` was written in the last minute. Listing returns 5,000 blobs per request and cannot be
  filtered by time, so it is capped (``--scan-limit``, default 100,000 blobs: 20 requests). A 10 M-job
  run stores 20 M blobs: past the cap the counts are lower bounds, marked ``+``.
* ``--watch`` adds rates between refreshes that need no listing: how fast the job queues drain (and
  when they will be empty at that pace), how fast the result queue grows, how fast results are stored
  (while the listing is complete).

One refresh costs 2 property reads and 1 peek per shard, 1 property read for the result queue and
ceil(listed / 5,000) list requests: next to a fleet's traffic (thousands of requests per second) it
is nothing, even every few seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from sidecar.config import Settings
from sidecar.errors import SidecarError
from sidecar.formatting import format_duration, plural
from sidecar.storage import Storage

PEEK = 32  # Azure's cap on messages per peek
PAGE = 5_000  # Azure's cap on blobs per list request
STATUS_RETRY_BUDGET = 10.0  # seconds: a status that hangs for a minute helps no one


@dataclass
class Shard:
    queue: str
    depth: int | None  # None: the queue does not exist
    poison: str
    poison_depth: int | None
    reasons: Counter[str] = field(default_factory=Counter)  # among the peeked poison messages


@dataclass
class Rates:
    """Per minute, between two refreshes."""

    seconds: float
    drained: float | None  # fall of all job queues' depth (negative when they grow); None: one is missing
    results: float | None  # growth of the result queue (net of any consumer)
    stored: float | None  # job.json blobs added, when both listings were complete
    empty_in_s: float | None  # the job queues at this drain rate


@dataclass
class Snapshot:
    taken_at: float
    shards: list[Shard]
    results_queue: str | None = None
    results_depth: int | None = None
    container: str = ""
    container_exists: bool = True
    stored_jobs: int = 0
    stored_images: int = 0
    stored_bytes: int = 0
    listed: int = 0
    scan_limit: int = 0
    scan_capped: bool = False
    finished_last_minute: int = 0
    rates: Rates | None = None

    @property
    def depth(self) -> int | None:
        """All job queues' messages; None when one of them does not exist (0 would say "all done")."""
        depths = [shard.depth for shard in self.shards]
        return None if None in depths else sum(d or 0 for d in depths)

    @property
    def poison_depth(self) -> int | None:
        depths = [shard.poison_depth for shard in self.shards]
        return None if None in depths else sum(d or 0 for d in depths)

    @property
    def missing(self) -> list[str]:
        """What a run needs that does not exist, as ``queue NAME`` / ``container NAME``."""
        names = [f"queue {shard.queue}" for shard in self.shards if shard.depth is None]
        names += [f"queue {shard.poison}" for shard in self.shards if shard.poison_depth is None]
        if self.results_queue and self.results_depth is None:
            names.append(f"queue {self.results_queue}")
        if not self.container_exists:
            names.append(f"container {self.container}")
        return names

    @property
    def reasons(self) -> Counter[str]:
        return sum((shard.reasons for shard in self.shards), Counter())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for shard, shard_data in zip(self.shards, data["shards"], strict=True):
            shard_data["reasons"] = dict(shard.reasons)  # asdict() mangles a Counter's items
        data["taken_at"] = _iso(self.taken_at)
        data["depth"], data["poison_depth"] = self.depth, self.poison_depth
        data["missing"] = self.missing
        return data


async def _depth(storage: Storage, queue: str) -> int | None:
    async def call() -> int | None:
        try:
            props = await storage.queue(queue).get_queue_properties()
        except ResourceNotFoundError:
            return None
        return int(props.approximate_message_count or 0)

    return await storage.retry(call)


async def _reasons(storage: Storage, poison: str) -> Counter[str]:
    async def call() -> list[str]:
        try:
            return [m.content or "" for m in await storage.queue(poison).peek_messages(max_messages=PEEK)]
        except ResourceNotFoundError:
            return []

    reasons: Counter[str] = Counter()
    for text in await storage.retry(call):
        try:
            error = json.loads(text)["error"]
            reasons[f"{error['type']}: {str(error['detail'])[:100]}"] += 1
        except (ValueError, KeyError, TypeError):
            reasons["(not written by the sidecar)"] += 1
    return reasons


async def _shard(storage: Storage, queue: str) -> Shard:
    poison = storage.settings.poison_queue_for(queue)
    depth, poison_depth, reasons = await asyncio.gather(
        _depth(storage, queue), _depth(storage, poison), _reasons(storage, poison)
    )
    return Shard(queue, depth, poison, poison_depth, reasons)


async def _scan(storage: Storage, snap: Snapshot) -> None:
    """Count stored results by listing at most ``scan_limit`` blobs."""
    minute_ago = datetime.now(UTC) - timedelta(minutes=1)

    async def call() -> None:
        snap.stored_jobs = snap.stored_images = snap.stored_bytes = snap.listed = 0
        snap.finished_last_minute, snap.scan_capped = 0, False
        try:
            async for blob in storage.container.list_blobs(results_per_page=min(PAGE, snap.scan_limit)):
                if snap.listed >= snap.scan_limit:
                    snap.scan_capped = True
                    return
                snap.listed += 1
                snap.stored_bytes += blob.size or 0
                if blob.name.endswith("/job.json"):
                    snap.stored_jobs += 1
                    if blob.last_modified and blob.last_modified >= minute_ago:
                        snap.finished_last_minute += 1
                elif blob.name.endswith((".png", ".webp", ".jpeg")):  # SIDECAR_IMAGE_FORMAT
                    snap.stored_images += 1
        except ResourceNotFoundError:
            snap.container_exists = False

    await storage.retry(call)


async def snapshot(storage: Storage, scan_limit: int = 100_000) -> Snapshot:
    settings = storage.settings
    snap = Snapshot(
        taken_at=time.time(),
        shards=[],
        results_queue=settings.result_queue_name,
        container=settings.container_name,
        scan_limit=max(0, scan_limit),
    )
    shards = asyncio.gather(*(_shard(storage, queue) for queue in settings.queue_name))
    results = _depth(storage, settings.result_queue_name) if settings.result_queue_name else _none()
    scan = _scan(storage, snap) if snap.scan_limit else _none()
    snap.shards, snap.results_depth, _ = await asyncio.gather(shards, results, scan)
    return snap


async def _none() -> None:
    return None


def compare(snap: Snapshot, before: Snapshot) -> Rates | None:
    seconds = snap.taken_at - before.taken_at
    if seconds <= 0:
        return None
    per_minute = 60 / seconds
    drained = None
    if snap.depth is not None and before.depth is not None:
        drained = (before.depth - snap.depth) * per_minute
    results = None
    if snap.results_depth is not None and before.results_depth is not None:
        results = (snap.results_depth - before.results_depth) * per_minute
    stored = None
    complete = snap.scan_limit and not snap.scan_capped and before.scan_limit and not before.scan_capped
    if complete:
        stored = (snap.stored_jobs - before.stored_jobs) * per_minute
    empty_in = snap.depth / drained * 60 if snap.depth is not None and drained and drained > 0 else None
    return Rates(round(seconds, 1), drained, results, stored, empty_in)


def render(snap: Snapshot) -> str:
    plus = "+" if snap.scan_capped else ""
    lines = [f"a1111-sidecar status  {_iso(snap.taken_at)}"]
    lines.append(f"  {'queue':<40} {'messages':>12} {'poison':>9}")
    for shard in snap.shards:
        lines.append(f"  {shard.queue:<40} {_count(shard.depth):>12} {_count(shard.poison_depth):>9}")
    if len(snap.shards) > 1:
        total = f"all {len(snap.shards)} shards"
        lines.append(f"  {total:<40} {_count(snap.depth):>12} {_count(snap.poison_depth):>9}")
    reasons = snap.reasons
    if reasons:
        lines.append(f"  poison reasons (the oldest {PEEK} messages of each poison queue, peeked):")
        lines += [f"    {count:>5} x {reason}" for reason, count in reasons.most_common(5)]
        if len(reasons) > 5:
            lines.append(f"    ... and {plural(len(reasons) - 5, 'more reason')}")
    if snap.results_queue:
        word = "message" if snap.results_depth == 1 else "messages"
        lines.append(f"  results queue {snap.results_queue:<26} {_count(snap.results_depth):>12} {word}")
    if not snap.container_exists:
        lines.append(f"  container {snap.container}: does not exist yet")
    elif snap.scan_limit == 0:
        lines.append(f"  container {snap.container}: not listed (--scan-limit 0)")
    else:
        lines.append(
            f"  stored in {snap.container}: {_counted(snap.stored_jobs, plus, 'job')}, "
            f"{_counted(snap.stored_images, plus, 'image')}, {snap.stored_bytes / 1e6:,.1f}{plus} MB"
        )
        lines.append(f"  finished in the last minute: {_counted(snap.finished_last_minute, plus, 'job')}")
        if snap.scan_capped:
            lines.append(
                f"  (listing stopped at {snap.scan_limit:,} blobs: counts are lower bounds; "
                "--watch rates do not depend on it)"
            )
    if snap.rates is not None:
        rates = snap.rates
        drained = "?" if rates.drained is None else f"{rates.drained:,.0f}"
        text = f"  per minute over the last {rates.seconds:g}s: queues drained {drained}"
        if rates.empty_in_s is not None:
            text += f" (empty in ~{format_duration(rates.empty_in_s)})"
        if rates.results is not None:
            text += f", results queue {rates.results:+,.0f}"
        if rates.stored is not None:
            text += f", jobs stored {rates.stored:+,.0f}"
        lines.append(text)
    return "\n".join(lines)


def _count(value: int | None) -> str:
    return "missing" if value is None else f"{value:,}"


def _counted(count: int, plus: str, word: str) -> str:
    """``1 job``, ``2 jobs``, ``5,000+ jobs`` (a lower bound is plural)."""
    return f"{count:,}{plus} {word if count == 1 and not plus else word + 's'}"


def missing_line(snap: Snapshot, account: str) -> str:
    """One line naming what does not exist (a typo in a name, or a run not set up yet)."""
    names = snap.missing
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return (
        f"status: {listed} {'does' if len(names) == 1 else 'do'} not exist in storage account "
        f"{account or '?'}: check SIDECAR_QUEUE_NAME (and the other names), or create them with "
        "enqueue --create-queues"
    )


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def show_status(
    settings: Settings,
    watch: bool = False,
    interval: float = 5.0,
    as_json: bool = False,
    scan_limit: int = 100_000,
) -> int:
    """Print the status once, or refresh it until Ctrl-C. Once: exit 0, or 1 if storage cannot be
    read or a queue (or the container) does not exist, with one line on stderr naming it."""
    settings = settings.model_copy(update={"retry_budget": min(settings.retry_budget, STATUS_RETRY_BUDGET)})
    # Retries are bounded and end in one line if they fail: their warnings would only bury the status.
    logging.getLogger("sidecar.backoff").setLevel(logging.ERROR)
    storage = Storage.connect(settings)
    before: Snapshot | None = None
    try:
        while True:
            try:
                snap = await snapshot(storage, scan_limit)
            except SidecarError as error:
                print(f"status: cannot read storage: {error}", file=sys.stderr, flush=True)
                if not watch:
                    return 1
            else:
                if before is not None:
                    snap.rates = compare(snap, before)
                before = snap
                if as_json:
                    print(json.dumps(snap.as_dict()), flush=True)
                else:
                    clear = "\x1b[H\x1b[2J" if watch and sys.stdout.isatty() else ""
                    print(clear + render(snap) + ("\n" if watch and not clear else ""), flush=True)
                if snap.missing and not watch:
                    print(missing_line(snap, storage.account), file=sys.stderr, flush=True)
                    return 1
            if not watch:
                return 0
            await asyncio.sleep(interval)
    finally:
        await storage.close()
