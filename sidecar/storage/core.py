"""What every storage operation shares: the clients, the retries within a budget, the deadline.

The SDK's own retries are turned off; transient failures become ``StorageUnavailable`` and are
retried here with exponential backoff and jitter, bounded in time (``sidecar.backoff``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from azure.storage.blob.aio import BlobServiceClient, ContainerClient
from azure.storage.queue.aio import QueueClient, QueueServiceClient

from sidecar.backoff import call_with_retries
from sidecar.errors import SidecarError, StorageUnavailable
from sidecar.storage.refusals import classify, error_label
from sidecar.storage.settings import StorageSettings

T = TypeVar("T")

PNG = "image/png"
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
LAST_TRY_TIMEOUT = 0.5  # the one try a call gets after the deadline (a release on the way out)


@dataclass
class Message:
    """A held queue message. ``pop_receipt`` changes with every renewal. ``inserted_on``: when it was
    enqueued (Azure's insertion time, seconds since the epoch; None when unknown)."""

    queue: str
    id: str
    pop_receipt: str
    dequeue_count: int
    content: str
    inserted_on: float | None = None


class StorageCore:
    """The clients of one worker and the retry around each call; the operations build on it."""

    def __init__(
        self, settings: StorageSettings, queues: QueueServiceClient, blobs: BlobServiceClient
    ) -> None:
        self.settings = settings
        self._queues = queues
        self._blobs = blobs
        self._queue_clients: dict[str, QueueClient] = {}
        self.answering = False  # did the last call reach storage? (for /readyz)
        # Told the code (``refusals.error_label``) of every failed try: the worker's metrics.
        self.on_error: Callable[[str], None] | None = None
        self.account = str(queues.account_name or blobs.account_name or "")
        # Once set (monotonic clock; SIGTERM sets it to the end of the grace period), every call ends
        # by then: its retries and each try's timeout are cut to fit, and a call made later gets one
        # short try.
        self.deadline: float | None = None
        self.container: ContainerClient = blobs.get_container_client(settings.container_name)

    def queue(self, name: str) -> QueueClient:
        client = self._queue_clients.get(name)
        if client is None:
            client = self._queue_clients[name] = self._queues.get_queue_client(name)
        return client

    async def retry(
        self,
        operation: Callable[[], Awaitable[T]],
        *,
        message_op: bool = False,
        what: str = "a request",
        budget: float | None = None,
    ) -> T:
        """Run ``operation``, retrying transient failures with backoff and jitter within the budget
        (SIDECAR_RETRY_BUDGET, or ``budget`` seconds). ``what`` names the operation in errors."""

        async def once() -> T:
            try:
                result = await operation()
            except Exception as error:
                mapped = classify(error, message_op=message_op, account=self.account, operation=what)
                self.answering = not isinstance(mapped, StorageUnavailable)
                if self.on_error is not None and not isinstance(error, SidecarError):
                    self.on_error(error_label(error, mapped))
                if mapped is error:
                    raise
                raise mapped from None
            self.answering = True
            return result

        if self.deadline is not None:
            left = max(0.0, self.deadline - time.monotonic())
            budget = min(self.settings.retry_budget if budget is None else budget, left)
        return await call_with_retries(self.settings, StorageUnavailable, once, budget=budget)

    def _try_timeout(self, default: float) -> float:
        """Seconds one try may take: ``default``, cut to what is left before the deadline."""
        if self.deadline is None:
            return default
        return max(LAST_TRY_TIMEOUT, min(default, self.deadline - time.monotonic()))

    def _lease_timeout(self) -> float:
        return self.settings.lease_timeout

    async def close(self) -> None:
        for client in self._queue_clients.values():
            await client.close()
        await self._queues.close()
        await self._blobs.close()
