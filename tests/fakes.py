"""In-memory fakes of what the pipeline's stages use: storage (queues and blobs), A1111's txt2img,
the asset catalog, and a clock. No network, no emulator, no real time: tests drive them with events.

``FakeStore`` keeps Azure's rules that the worker depends on: a received message is invisible for
the visibility given, each receive and each visibility update hands out a new pop receipt, and a
delete or update with an old receipt (or of a message that is gone) raises ``LeaseLost``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.a1111 import Generation
from sidecar.assets import Problem
from sidecar.errors import LeaseLost, SidecarError
from sidecar.storage import Message

PNG_BYTES = b"\x89PNG\r\n\x1a\nfake image"


class FakeClock:
    """A monotonic clock that moves only when told; ``sleep`` waits until the clock has moved past."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._asleep = asyncio.Event()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, future))
        self._asleep.set()
        try:
            await future
        finally:
            self._sleepers = [(at, f) for at, f in self._sleepers if f is not future]

    async def sleeping(self) -> float:
        """Wait until something sleeps on this clock; the time it wakes up at (the earliest)."""
        while not self._sleepers:
            self._asleep.clear()
            await self._asleep.wait()
        return min(at for at, _ in self._sleepers)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for at, future in self._sleepers:
            if at <= self.now and not future.done():
                future.set_result(None)


@dataclass
class Stored:
    """A message as the fake queue keeps it."""

    id: str
    content: str
    dequeue_count: int = 0
    pop_receipt: str = ""
    visible_at: float = 0.0


@dataclass
class Call:
    op: str
    args: dict[str, Any] = field(default_factory=dict)


class FakeStore:
    """The storage interface the stages and leases use, in memory.

    ``fail(op, error, times)`` makes the next calls of ``op`` raise; ``hold(op)`` makes calls of
    ``op`` wait until ``release(op)``; ``calls`` records every call in order; ``called(op)`` waits
    for the next call of ``op``.
    """

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.deadline: float | None = None
        self.queues: dict[str, list[Stored]] = defaultdict(list)
        self.blobs: dict[str, tuple[bytes, str]] = {}
        self.sent: dict[str, list[str]] = defaultdict(list)
        self.poisoned: list[dict[str, Any]] = []
        self.failures: dict[str, str] = {}  # message id -> the reason its last failed try recorded
        self.calls: list[Call] = []
        self._faults: dict[str, list[BaseException]] = defaultdict(list)
        self._gates: dict[str, asyncio.Event] = {}
        self._call_events: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._ids = itertools.count(1)
        self._receipts = itertools.count(1)

    # -- test controls ---------------------------------------------------------------------------

    def add(self, queue: str, content: str | Mapping[str, Any], dequeue_count: int = 0) -> str:
        text = content if isinstance(content, str) else json.dumps(content)
        message_id = f"m{next(self._ids)}"
        self.queues[queue].append(Stored(message_id, text, dequeue_count))
        return message_id

    def fail(self, op: str, error: BaseException, times: int = 1) -> None:
        self._faults[op].extend([error] * times)

    def hold(self, op: str) -> None:
        self._gates[op] = asyncio.Event()

    def release(self, op: str) -> None:
        self._gates.pop(op).set()

    async def called(self, op: str) -> Call:
        """The next call of ``op`` (already made ones do not count)."""
        event = self._call_events[op]
        event.clear()
        await event.wait()
        return [call for call in self.calls if call.op == op][-1]

    def ops(self, op: str) -> list[Call]:
        return [call for call in self.calls if call.op == op]

    def visible(self, queue: str) -> list[Stored]:
        return [m for m in self.queues[queue] if m.visible_at <= self.clock()]

    async def _enter(self, op: str, **args: Any) -> None:
        self.calls.append(Call(op, args))
        self._call_events[op].set()
        gate = self._gates.get(op)
        if gate is not None:
            await gate.wait()
        if self._faults[op]:
            raise self._faults[op].pop(0)

    def _find(self, message: Message) -> Stored:
        for stored in self.queues[message.queue]:
            if stored.id == message.id:
                if stored.pop_receipt != message.pop_receipt:
                    raise LeaseLost(f"pop receipt of {message.id} is not the latest")
                return stored
        raise LeaseLost(f"message {message.id} not found")

    # -- the interface ---------------------------------------------------------------------------

    async def receive(self, queue: str, count: int, visibility: int) -> list[Message]:
        await self._enter("receive", queue=queue, count=count, visibility=visibility)
        got = []
        for stored in self.visible(queue)[:count]:
            stored.dequeue_count += 1
            stored.pop_receipt = f"r{next(self._receipts)}"
            stored.visible_at = self.clock() + visibility
            got.append(Message(queue, stored.id, stored.pop_receipt, stored.dequeue_count, stored.content))
        return got

    async def set_visibility(
        self,
        message: Message,
        seconds: int,
        *,
        budget: float | None = None,
        ours_until: float | None = None,
        timeout: float | None = None,
    ) -> None:
        await self._enter("set_visibility", id=message.id, seconds=seconds, budget=budget, timeout=timeout)
        stored = self._find(message)
        stored.pop_receipt = f"r{next(self._receipts)}"
        stored.visible_at = self.clock() + seconds
        message.pop_receipt = stored.pop_receipt

    async def delete(self, message: Message, *, ours_until: float | None = None) -> None:
        await self._enter("delete", id=message.id)
        self.queues[message.queue].remove(self._find(message))

    async def poison(
        self,
        message: Message,
        job_id: str | None,
        error: SidecarError | str,
        *,
        ours_until: float | None = None,
    ) -> None:
        await self._enter("poison", id=message.id)
        stored = self._find(message)
        kind = error.kind if isinstance(error, SidecarError) else "Error"
        self.poisoned.append(
            {
                "job_id": job_id,
                "message_id": message.id,
                "dequeue_count": message.dequeue_count,
                "error": {"type": kind, "detail": str(error)},
                "original": message.content,
            }
        )
        self.queues[message.queue].remove(stored)

    async def upload(self, name: str, data: bytes, content: str, *, budget: float | None = None) -> None:
        await self._enter("upload", name=name)
        self.blobs[name] = (data, content)

    async def send(self, queue: str, text: str) -> None:
        await self._enter("send", queue=queue)
        self.sent[queue].append(text)

    async def approximate_count(self, queue: str) -> int:
        await self._enter("approximate_count", queue=queue)
        return len(self.queues[queue])

    async def record_failure(self, message: Message, reason: str) -> None:
        await self._enter("record_failure", id=message.id, reason=reason)
        self.failures[message.id] = f"try {message.dequeue_count}: {reason}"

    async def last_failure(self, message: Message) -> str | None:
        await self._enter("last_failure", id=message.id)
        return self.failures.get(message.id)

    async def forget_failure(self, message: Message) -> None:
        await self._enter("forget_failure", id=message.id)
        self.failures.pop(message.id, None)


def image_text(data: bytes = PNG_BYTES) -> str:
    return base64.b64encode(data).decode()


def generation(images: int = 1, seed: int = 7, started: float = 0.0) -> Generation:
    return Generation(
        images=[image_text() for _ in range(images)],
        info={"all_seeds": list(range(seed, seed + images))},
        started=started,
        finished=started + 0.5,
        request={"prompt": "p"},
    )


class FakeA1111:
    """txt2img and interrupt. Each call takes the next scripted result (a Generation or an exception
    to raise); with none left it makes one image per requested image. ``hold()`` makes calls wait
    until ``go()``."""

    def __init__(self) -> None:
        self.script: list[Generation | BaseException] = []
        self.calls: list[dict[str, Any]] = []  # payload, timeout, and whether it waited behind another
        self.interrupts = 0
        self._gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    def hold(self) -> None:
        self._gate = asyncio.Event()

    def go(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    async def txt2img(
        self, payload: dict[str, Any], timeout: float, *, after: asyncio.Future[Any] | None = None
    ) -> Generation:
        self.calls.append({"payload": payload, "timeout": timeout, "after": after})
        self.entered.set()
        if after is not None:
            await asyncio.wait({after})
        gate = self._gate
        if gate is not None:
            await gate.wait()
        if self.script:
            result = self.script.pop(0)
            if isinstance(result, BaseException):
                raise result
            return result
        count = int(payload.get("batch_size", 1)) * int(payload.get("n_iter", 1))
        return generation(count)

    async def interrupt(self) -> None:
        self.interrupts += 1


class FakeCatalog:
    """What the node's A1111 has: ``problems`` maps a prompt to what its check finds; ``error``
    makes every check raise it."""

    def __init__(self) -> None:
        self.problems: dict[str, list[Problem]] = {}
        self.error: Exception | None = None

    async def check(self, payload: Mapping[str, Any]) -> list[Problem]:
        if self.error is not None:
            raise self.error
        return self.problems.get(str(payload.get("prompt")), [])


def missing_lora(name: str = "add_detail") -> Problem:
    return Problem("lora", name, "prompt", True, f"LoRA {name!r} (prompt) is not on this node")


def unknown_sampler(name: str = "Nope") -> Problem:
    return Problem("sampler", name, "sampler_name", False, f"sampler {name!r} (sampler_name) is not known")


__all__ = [
    "FakeA1111",
    "FakeCatalog",
    "FakeClock",
    "FakeStore",
    "generation",
    "image_text",
    "missing_lora",
    "unknown_sampler",
]
