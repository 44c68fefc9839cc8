"""Putting jobs on the queue: from a JSONL file (streamed) or generated, validated, sent concurrently.

Every line is checked with the worker's own job model (``parse_job``, with the configured limits)
before it is sent, so a bad line is caught at the producer with its line number instead of landing on
the poison queue later. With several queues (``SIDECAR_QUEUE_NAME=a,b,c``) jobs are spread round-robin,
or routed by their checkpoint (``Routing``: one queue per model family, so that a worker's shard
preference keeps A1111's loaded model).

Memory stays flat whatever the input's size: the file is read one line at a time (a line is never
read past the 64 KiB message limit), at most ``concurrency`` messages are in flight, and bad lines are
reported as they are found, not collected. ``concurrency`` sender tasks pull straight from the one
input iterator: taking and validating a line has no ``await`` in it, so lines are taken strictly in
order and a stop (bad line, failed send, Ctrl-C) leaves everything before a known line sent, which is
what ``resume_line`` (``--start-line``) says.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from sidecar.errors import InvalidJob, StorageUnavailable
from sidecar.jobs import MAX_MESSAGE_BYTES, Job, Limits, parse_job
from sidecar.progress import Progress
from sidecar.prompts import generate_jobs
from sidecar.storage import NEVER_EXPIRES, Storage, classify

KEEP_BAD = 100  # bad lines kept in the report for callers; all of them go to ``on_bad``
MAX_LINE_BYTES = MAX_MESSAGE_BYTES + 2  # a message, plus CRLF
Item = tuple[int, "str | InvalidJob"]  # (line number, the line's text or why it cannot be read)


@dataclass
class Report:
    sent: int = 0
    bad_count: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # the first KEEP_BAD bad lines
    per_queue: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    resume_line: int | None = None  # set when the run stopped early: every line before it was handled

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


class Routing:
    """``--route-by-checkpoint``: the queue of a job is chosen by its checkpoint
    (``override_settings.sd_model_checkpoint``, without a ``[hash]`` suffix; none: the default one).
    A checkpoint named in ``routes`` (``--route MODEL=QUEUE``) goes to its queue; any other to the
    queue its name's CRC-32 picks among the queues: the same checkpoint always lands on the same
    shard, on every machine and run, as long as the list of queues stays the same."""

    def __init__(self, queues: list[str], routes: dict[str, str] | None = None) -> None:
        self.queues = list(queues)
        self.routes = dict(routes or {})
        unknown = sorted({queue for queue in self.routes.values() if queue not in self.queues})
        if unknown:
            raise ValueError(f"--route names queues not in SIDECAR_QUEUE_NAME: {', '.join(unknown)}")

    @staticmethod
    def parse(entries: list[str]) -> dict[str, str]:
        """``MODEL=QUEUE`` entries as a mapping; ValueError names a malformed one."""
        routes = {}
        for entry in entries:
            model, _, queue = entry.partition("=")
            if not model.strip() or not queue.strip():
                raise ValueError(f"--route takes MODEL=QUEUE, not {entry!r}")
            routes[checkpoint_name(model.strip())] = queue.strip()
        return routes

    def shard(self, job: Job) -> int:
        overrides = job.spec.override_settings
        name = checkpoint_name((overrides.sd_model_checkpoint or "") if overrides is not None else "")
        queue = self.routes.get(name)
        if queue is not None:
            return self.queues.index(queue)
        return zlib.crc32(name.encode("utf-8")) % len(self.queues)


def checkpoint_name(name: str) -> str:
    """A checkpoint as A1111's titles and names spell it, without the ``[hash]`` of a title."""
    return re.sub(r"\s*\[[0-9a-fA-F]{8,64}\]$", "", name)


class EnqueueStopped(Exception):
    """The run ended before its input did; ``report`` says what was sent and where to resume."""

    def __init__(self, reason: str, report: Report) -> None:
        super().__init__(reason)
        self.reason = reason
        self.report = report


class BadLine(EnqueueStopped):
    """``stop_on_bad``: the first invalid line. Every line before it was sent, nothing after it."""

    def __init__(self, line: int, reason: str, report: Report) -> None:
        super().__init__(f"line {line}: {reason}", report)
        self.line = line


class Interrupted(EnqueueStopped):
    pass


class JsonlFile:
    """(line number, text) of every non-blank line of a JSONL file (or ``-``, stdin), read lazily.

    Lines are read as bytes with a length cap, so one huge line cannot fill memory; a line too long for
    a queue message or not UTF-8 comes out as an ``InvalidJob`` with its number. ``position`` and
    ``size`` (bytes) drive the progress bar's percentage and ETA.
    """

    def __init__(self, path: str | Path, start_line: int = 1) -> None:
        self.path = str(path)
        self.start_line = start_line
        self.position = 0
        self.size: int | None = None
        if self.path != "-":
            self.size = Path(self.path).stat().st_size

    def fraction(self) -> float | None:
        return min(1.0, self.position / self.size) if self.size else None

    def __iter__(self) -> Iterator[Item]:
        if self.path == "-":
            yield from self._lines(sys.stdin.buffer)
        else:
            with open(self.path, "rb") as handle:
                yield from self._lines(handle)

    def _lines(self, handle: BinaryIO) -> Iterator[Item]:
        number = 0
        while raw := handle.readline(MAX_LINE_BYTES):
            number += 1
            self.position += len(raw)
            if not raw.endswith(b"\n") and len(raw) == MAX_LINE_BYTES:
                self._skip_rest(handle)
                if number >= self.start_line:
                    yield (
                        number,
                        InvalidJob("line", f"is longer than the {MAX_MESSAGE_BYTES}-byte message limit"),
                    )
                continue
            if number < self.start_line:
                continue
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark, as some editors write
            raw = raw.strip()
            if not raw:
                continue
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield number, InvalidJob("line", f"is not UTF-8 (byte {error.start + 1})")

    def _skip_rest(self, handle: BinaryIO) -> None:
        while chunk := handle.readline(MAX_LINE_BYTES):
            self.position += len(chunk)
            if chunk.endswith(b"\n"):
                return


def lines_of(path: str | Path, start_line: int = 1) -> JsonlFile:
    return JsonlFile(path, start_line)


def generated(count: int, seed: int, start_line: int = 1) -> Iterator[tuple[int, str]]:
    """Benchmark-style jobs as (number, JSON text), numbered from 1 like the lines of a file."""
    for number, job in enumerate(generate_jobs(count, seed), start=1):
        if number >= start_line:
            yield number, json.dumps(job)


async def enqueue(
    storage: Storage,
    queues: list[str],
    items: Iterable[Item],
    *,
    encode_base64: bool = False,
    concurrency: int = 32,
    stop_on_bad: bool = False,
    limits: Limits | None = None,
    total: int | None = None,
    on_bad: Callable[[int, str], None] | None = None,
    stop: asyncio.Event | None = None,
    progress_stream: TextIO = sys.stderr,
    time_to_live: int = NEVER_EXPIRES,
    routing: Routing | None = None,
) -> Report:
    """Validate and send every item; raises ``EnqueueStopped`` (with the report) if it ends early.

    ``total`` (items expected) or a ``JsonlFile`` (bytes) gives the progress bar its percentage.
    ``on_bad(line, reason)`` hears of each skipped line as it is found; ``stop`` ends the run early
    (Ctrl-C): sends in flight finish, nothing more is taken. ``routing`` picks each job's queue by its
    checkpoint instead of round-robin. Messages never expire unless
    ``time_to_live`` (seconds) says otherwise: Azure's default of 7 days would drop a long backlog.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    report = Report()
    source = iter(items)
    progress = Progress(
        total, items.fraction if isinstance(items, JsonlFile) else lambda: None, progress_stream
    )
    clients = [storage.queue(name) for name in queues]
    in_flight: set[int] = set()  # line numbers being sent (or whose send failed)
    halt: list[EnqueueStopped | BaseException] = []
    next_line = 1  # the first line not taken yet
    sequence = 0  # valid jobs so far: round-robin over shards by this, so bad lines do not skew it

    def take() -> tuple[int, str, int] | None:
        """The next valid job as (line, message text, shard), or None at the end or on a stop."""
        nonlocal next_line, sequence
        while not halt and not (stop is not None and stop.is_set()):
            try:
                number, text = next(source)
            except StopIteration:
                return None
            next_line = number + 1
            try:
                if isinstance(text, InvalidJob):
                    raise text
                job = parse_job(text, "pending", limits)
                body = base64.b64encode(text.encode("utf-8")).decode("ascii") if encode_base64 else text
                # a character is at most 4 UTF-8 bytes: most messages need no encoding to know
                if len(body) * 4 > MAX_MESSAGE_BYTES and len(body.encode("utf-8")) > MAX_MESSAGE_BYTES:
                    raise InvalidJob(
                        "message", f"is over {MAX_MESSAGE_BYTES} bytes as sent (base64 adds 1/3)"
                    )
            except InvalidJob as error:
                if stop_on_bad:
                    next_line = number
                    halt.append(BadLine(number, str(error), report))
                    return None
                report.bad_count += 1
                if len(report.bad) < KEEP_BAD:
                    report.bad.append((number, str(error)))
                if on_bad is not None:
                    on_bad(number, str(error))
                continue
            shard = routing.shard(job) if routing is not None else sequence % len(clients)
            sequence += 1
            return number, body, shard
        return None

    async def send(shard: int, body: str) -> None:
        # The direct call is the fast path: tenacity's per-call set-up costs about 20 us, 2% of a send.
        # Only a failure goes through Storage.retry (backoff with jitter, bounded), and only if it is
        # transient; anything else (auth, a missing queue) stops the run.
        client = clients[shard]
        try:
            await client.send_message(body, time_to_live=time_to_live)
        except Exception as error:
            mapped = classify(error, account=storage.account, operation=f"send to queue {queues[shard]}")
            if not isinstance(mapped, StorageUnavailable):
                raise mapped from error
            await storage.retry(
                lambda: client.send_message(body, time_to_live=time_to_live),
                what=f"send to queue {queues[shard]}",
            )

    async def sender() -> None:
        while (job := take()) is not None:
            number, body, shard = job
            in_flight.add(number)
            try:
                await send(shard, body)
            except Exception as error:
                halt.append(error)
                return
            in_flight.discard(number)
            report.sent += 1
            report.per_queue[queues[shard]] += 1
            progress.update(report.sent)

    started = time.monotonic()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    report.seconds = time.monotonic() - started
    progress.close(report.sent)
    interrupted = stop is not None and stop.is_set()
    if not halt and not interrupted:
        return report
    report.resume_line = min([*in_flight, next_line])
    if halt and isinstance(halt[0], EnqueueStopped):
        raise halt[0]
    if halt:
        error = halt[0]
        raise EnqueueStopped(f"sending failed: {type(error).__name__}: {error}", report) from error
    raise Interrupted("interrupted", report)
