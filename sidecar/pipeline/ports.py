"""What the stages need of the clients below them, as protocols: ``sidecar.storage.Storage``,
``sidecar.a1111.A1111Client`` and ``sidecar.assets.Catalog`` have these calls, and so do the
in-memory fakes of the unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from sidecar.a1111 import Generation
from sidecar.assets import Problem
from sidecar.lease import LeaseStorage
from sidecar.storage import Message


class Store(LeaseStorage, Protocol):
    """Queues and blobs. ``deadline`` (monotonic clock), once set, bounds every call after it."""

    deadline: float | None

    async def receive(self, queue: str, count: int, visibility: int) -> list[Message]: ...

    async def upload(self, name: str, data: bytes, content: str, *, budget: float | None = None) -> None: ...

    async def send(self, queue: str, text: str) -> None: ...

    async def approximate_count(self, queue: str) -> int: ...

    async def record_failure(self, message: Message, reason: str) -> None: ...

    async def last_failure(self, message: Message) -> str | None: ...

    async def forget_failure(self, message: Message) -> None: ...


class Painter(Protocol):
    """A1111's txt2img and interrupt."""

    async def txt2img(
        self,
        payload: dict[str, Any],
        timeout: float,
        *,
        after: asyncio.Future[Any] | None = None,
    ) -> Generation: ...

    async def interrupt(self) -> None: ...


class Assets(Protocol):
    """What this node's A1111 has, checked against a job's payload."""

    async def check(self, payload: Mapping[str, Any]) -> list[Problem]: ...
