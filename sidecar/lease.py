"""Leases: keep every held message invisible until the worker is done with it.

Like the Azure Functions queue trigger, a held message's visibility is renewed at half-life with the
newest pop receipt. Renewals, deletes and releases of one message take turns behind a lock, since each
needs the pop receipt the previous one returned. A 404 or pop-receipt mismatch means another consumer
owns the message now: the lease is marked lost and the message is never deleted by this worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from sidecar.errors import LeaseLost, SidecarError, StorageUnavailable
from sidecar.storage import Message, Storage, StorageRejected

log = logging.getLogger(__name__)


class Lease:
    def __init__(self, storage: Storage, message: Message, visibility: int) -> None:
        self.storage = storage
        self.message = message
        self.visibility = visibility
        self.lost = False
        self.ended = False
        self._lock = asyncio.Lock()
        self._task = asyncio.create_task(self._keep(), name=f"lease-{message.id}")

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.visibility / 2)
            async with self._lock:
                if self.ended:
                    return
                try:
                    await self.storage.set_visibility(self.message, self.visibility)
                except LeaseLost:
                    self.lost = True
                    log.warning("lease lost", extra={"message_id": self.message.id, "stage": "lease"})
                    return
                except (StorageUnavailable, StorageRejected) as error:
                    # The next half-life tries again; until the lease runs out the message is still ours.
                    log.warning("lease renewal failed: %s", error, extra={"message_id": self.message.id})

    async def _end(self, what: str, action: Callable[[], Awaitable[None]]) -> bool:
        """Stop renewing, then run ``action`` on the message. False if it was no longer ours."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        async with self._lock:
            if self.ended or self.lost:
                self.ended = True
                return False
            self.ended = True
            try:
                await action()
            except LeaseLost:
                self.lost = True
                log.warning("message no longer ours at %s", what, extra={"message_id": self.message.id})
                return False
            return True

    async def complete(self) -> bool:
        return await self._end("delete", lambda: self.storage.delete(self.message))

    async def release(self, delay: int = 0) -> bool:
        """Make the message visible again after ``delay`` seconds (0: at once, for another node)."""
        return await self._end("release", lambda: self.storage.set_visibility(self.message, delay))

    async def poison(self, job_id: str | None, error: SidecarError) -> bool:
        return await self._end("poison", lambda: self.storage.poison(self.message, job_id, error))

    def abandon(self) -> None:
        """Stop renewing without touching the message (it comes back when its visibility runs out)."""
        self.ended = True
        self._task.cancel()
