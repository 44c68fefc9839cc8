"""Leases: keep every held message invisible until the worker is done with it.

Like the Azure Functions queue trigger, a held message's visibility is renewed at half-life with the
newest pop receipt. Renewals, deletes and releases of one message take turns behind a lock, since each
needs the pop receipt the previous one returned: settling waits for a renewal already in flight and
uses the receipt it brought back. A 404 or pop-receipt mismatch means another consumer owns the
message now: the lease is marked lost and the message is never deleted by this worker.

A renewal is retried only while it can still land before the visibility runs out (each try is
bounded by the ``LeasePolicy``'s ``request_timeout``; the settings check at start that two tries fit
in the window).
A renewal storage refuses for good ends the lease too (the job is given up, never deleted) and tells
the worker, which stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from sidecar.errors import LeaseLost, SidecarError, StorageRefused, StorageUnavailable
from sidecar.policy import LeasePolicy
from sidecar.storage import Message

log = logging.getLogger(__name__)


class LeaseStorage(Protocol):
    """The storage calls a lease makes (``sidecar.storage.Storage`` has them)."""

    async def set_visibility(
        self,
        message: Message,
        seconds: int,
        *,
        budget: float | None = None,
        ours_until: float | None = None,
        timeout: float | None = None,
    ) -> None: ...

    async def delete(self, message: Message, *, ours_until: float | None = None) -> None: ...

    async def poison(
        self,
        message: Message,
        job_id: str | None,
        error: SidecarError | str,
        *,
        ours_until: float | None = None,
    ) -> None: ...


class Lease:
    def __init__(
        self,
        storage: LeaseStorage,
        message: Message,
        visibility: int | LeasePolicy,
        on_refused: Callable[[StorageRefused], None] = lambda error: None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.storage = storage
        self.message = message
        self.policy = visibility if isinstance(visibility, LeasePolicy) else LeasePolicy(visibility)
        self.visibility = self.policy.visibility
        self.lost = False
        self.ended = False
        self._on_refused = on_refused
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        # When the message becomes visible again unless renewed (monotonic clock).
        self.expires_at = clock() + self.visibility
        self._task = asyncio.create_task(self._keep(), name=f"lease-{message.id}")

    async def _keep(self) -> None:
        clock = self._clock
        while True:
            await self._sleep(max(0.0, self.expires_at - self.policy.renew_after - clock()))
            async with self._lock:
                if self.ended or self.lost:
                    return
                # Retry only while a try can still land before the message becomes visible.
                timeout = self.policy.request_timeout
                budget = self.expires_at - clock() - timeout
                renewed_at = clock()
                try:
                    await self.storage.set_visibility(
                        self.message, self.visibility, budget=max(budget, 0.0), timeout=timeout
                    )
                except LeaseLost:
                    self._lose("lease lost")
                    return
                except StorageRefused as error:
                    self._lose(f"lease renewal refused: {error}")
                    self._on_refused(error)
                    return
                except StorageUnavailable as error:
                    self._lose(f"lease ran out, renewal failed: {error}")
                    return
                self.expires_at = renewed_at + self.visibility

    def _lose(self, why: str) -> None:
        self.lost = True
        log.warning(why, extra={"message_id": self.message.id, "stage": "lease"})

    async def _end(self, what: str, action: Callable[[], Awaitable[None]]) -> bool:
        """Stop renewing, then run ``action`` on the message. False if it was no longer ours.

        The lock is taken first: a renewal in flight finishes (its new pop receipt is the one the
        action needs) before the renewer is stopped.
        """
        async with self._lock:
            self._task.cancel()
            if self.ended or self.lost:
                self.ended = True
                return False
            try:
                await action()
            except LeaseLost:
                self.lost = self.ended = True
                log.warning("message no longer ours at %s", what, extra={"message_id": self.message.id})
                return False
            except StorageRefused:
                raise  # still held: the worker's last act is to try releasing it
            except BaseException:
                self.ended = True
                raise
            self.ended = True
            return True

    async def complete(self) -> bool:
        return await self._end(
            "delete", lambda: self.storage.delete(self.message, ours_until=self.expires_at)
        )

    async def release(self, delay: int = 0) -> bool:
        """Make the message visible again after ``delay`` seconds (0: at once, for another node)."""
        return await self._end(
            "release",
            lambda: self.storage.set_visibility(self.message, delay, ours_until=self.expires_at),
        )

    async def poison(self, job_id: str | None, error: SidecarError) -> bool:
        return await self._end(
            "poison", lambda: self.storage.poison(self.message, job_id, error, ours_until=self.expires_at)
        )

    def abandon(self) -> None:
        """Stop renewing without touching the message (it comes back when its visibility runs out)."""
        self.ended = True
        self._task.cancel()
