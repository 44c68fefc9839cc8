"""Putting jobs on the queue: from a JSONL file (streamed) or generated, validated, sent concurrently.

Every line is checked with the worker's own job model before it is sent, so a bad line is caught at
the producer with its line number instead of landing on the poison queue later. With several queues
(``SIDECAR_QUEUE_NAME=a,b,c``) jobs are spread round-robin.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from sidecar.errors import InvalidJob
from sidecar.jobs import Limits, parse_job
from sidecar.prompts import generate_jobs
from sidecar.storage import Storage


@dataclass
class Report:
    sent: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bad_count(self) -> int:
        return len(self.bad)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


class BadLine(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


def lines_of(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for every non-blank line, read lazily."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line.strip()


def generated(count: int, seed: int) -> Iterator[tuple[int, str]]:
    for number, job in enumerate(generate_jobs(count, seed), start=1):
        yield number, json.dumps(job)


class Progress:
    """A one-line progress display with rate and ETA, only on a terminal."""

    def __init__(self, total: int | None, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.enabled = stream.isatty()
        self.started = time.monotonic()
        self._last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < 0.2):
            return
        self._last = now
        rate = done / max(now - self.started, 1e-9)
        if self.total:
            eta = (self.total - done) / rate if rate > 0 else 0
            width = 30
            filled = int(width * done / self.total)
            bar = "#" * filled + "-" * (width - filled)
            text = f"[{bar}] {done}/{self.total} {rate:,.0f} msg/s ETA {eta:,.0f}s"
        else:
            text = f"{done} sent {rate:,.0f} msg/s"
        self.stream.write("\r" + text + " " * 4)
        if force:
            self.stream.write("\n")
        self.stream.flush()


async def enqueue(
    storage: Storage,
    queues: list[str],
    items: Iterable[tuple[int, str]],
    *,
    encode_base64: bool = False,
    concurrency: int = 32,
    stop_on_bad: bool = False,
    limits: Limits | None = None,
    total: int | None = None,
) -> Report:
    report = Report()
    progress = Progress(total)
    pending: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue(maxsize=concurrency * 4)
    started = time.monotonic()

    failures: list[BaseException] = []

    async def sender() -> None:
        while (item := await pending.get()) is not None:
            if failures:
                continue  # drain without sending: the run is stopping
            number, text = item
            body = base64.b64encode(text.encode("utf-8")).decode("ascii") if encode_base64 else text
            try:
                await storage.send(queues[number % len(queues)], body)
            except Exception as error:
                failures.append(error)
                continue
            report.sent += 1
            progress.update(report.sent)

    senders = [asyncio.create_task(sender()) for _ in range(concurrency)]
    try:
        for number, text in items:
            if failures:
                break
            try:
                parse_job(text, "pending", limits)
            except InvalidJob as error:
                if stop_on_bad:
                    raise BadLine(number, str(error)) from None
                report.bad.append((number, str(error)))
                continue
            await pending.put((number, text))
    finally:
        for _ in senders:
            await pending.put(None)
        await asyncio.gather(*senders)
    if failures:
        raise failures[0]
    report.seconds = time.monotonic() - started
    progress.update(report.sent, force=True)
    return report
