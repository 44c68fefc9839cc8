"""Queue operations: receive, renew, release, delete and send, each with the retries of ``core``.

A 404 MessageNotFound or a pop-receipt mismatch on a message means another consumer owns it
(``LeaseLost``), unless our own earlier try may have done the work already.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree

from azure.core.exceptions import HttpResponseError

from sidecar.errors import LeaseLost
from sidecar.storage.connection import READ_TIMEOUT
from sidecar.storage.core import Message, StorageCore
from sidecar.storage.refusals import error_code, may_have_landed
from sidecar.storage.rest import child_url, send

log = logging.getLogger("sidecar.storage")

MAX_QUEUE_MESSAGE_BYTES = 64 * 1024
NEVER_EXPIRES = -1  # time_to_live of every message the project sends: Azure's default is 7 days


def insertion_time(text: str | None) -> float | None:
    """A message's ``InsertionTime`` (RFC 1123: ``Fri, 09 Oct 2009 21:04:30 GMT``) as epoch seconds."""
    if not text:
        return None
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None


class QueueOperations(StorageCore):
    async def receive(self, queue: str, count: int, visibility: int) -> list[Message]:
        client = self.queue(queue)
        query = {"numofmessages": str(count), "visibilitytimeout": str(visibility)}

        async def call() -> list[Message]:
            response = await send(client, "GET", child_url(client.url, "messages", query), 200)
            return [
                Message(
                    queue,
                    item.findtext("MessageId") or "",
                    item.findtext("PopReceipt") or "",
                    int(item.findtext("DequeueCount") or 0),
                    item.findtext("MessageText") or "",
                    insertion_time(item.findtext("InsertionTime")),
                )
                for item in ElementTree.fromstring(response.content).iter("QueueMessage")
            ]

        return await self.retry(call, what=f"receive from queue {queue}")

    async def set_visibility(
        self,
        message: Message,
        seconds: int,
        *,
        budget: float | None = None,
        ours_until: float | None = None,
        timeout: float | None = None,
    ) -> None:
        """Renew (seconds > 0) or release (0) a held message; keeps the newest pop receipt. Each try
        ends within ``timeout`` seconds (default: what the visibility timeout allows a lease request).

        A release that finds the receipt changed has done its work when our own try may have changed
        it: after a try with no answer, or while the lease (``ours_until``) had not run out (aiohttp
        resends a PUT whose answer was lost). A renewal in that case has lost the new receipt: the
        lease is lost.
        """
        timeout = self._try_timeout(self._lease_timeout() if timeout is None else timeout)
        maybe_done = False

        async def call() -> None:
            nonlocal maybe_done
            try:
                updated = await self.queue(message.queue).update_message(
                    message.id,
                    pop_receipt=message.pop_receipt,
                    visibility_timeout=seconds,
                    connection_timeout=timeout,
                    read_timeout=timeout,
                )
            except Exception as error:
                maybe_done = maybe_done or may_have_landed(error)
                raise
            message.pop_receipt = updated.pop_receipt or message.pop_receipt

        what = f"{'renew' if seconds else 'release'} message {message.id} on queue {message.queue}"
        try:
            await self.retry(call, message_op=True, what=what, budget=budget)
        except LeaseLost:
            still_ours = ours_until is not None and time.monotonic() < ours_until
            if seconds != 0 or not (maybe_done or still_ours):
                raise
            log.info("release of %s had landed already", message.id, extra={"message_id": message.id})

    async def delete(self, message: Message, *, ours_until: float | None = None) -> None:
        """Delete a held message.

        MessageNotFound is a lost lease, unless our own try may have deleted it: a retry after a try
        that got no answer, or any answer while the lease (``ours_until``, monotonic clock) had not
        run out, when no other consumer could have received the message. aiohttp itself resends a
        DELETE whose connection closed before the answer, so the first answer seen may be that 404.
        """
        client = self.queue(message.queue)
        url = child_url(
            client.url, f"messages/{quote(message.id, safe='')}", {"popreceipt": message.pop_receipt}
        )
        maybe_done = False

        async def call() -> None:
            nonlocal maybe_done
            try:
                timeout = self._try_timeout(self._lease_timeout())
                await send(client, "DELETE", url, 204, timeout=timeout)
            except HttpResponseError as error:
                still_ours = ours_until is not None and time.monotonic() < ours_until
                if (maybe_done or still_ours) and error_code(error) == "MessageNotFound":
                    log.info("delete of %s had landed already", message.id, extra={"message_id": message.id})
                    return
                maybe_done = maybe_done or may_have_landed(error)
                raise
            except Exception as error:
                maybe_done = maybe_done or may_have_landed(error)
                raise

        await self.retry(call, message_op=True, what=f"delete message {message.id} on queue {message.queue}")

    async def send(self, queue: str, text: str) -> None:
        def call() -> Awaitable[Any]:
            timeout = self._try_timeout(READ_TIMEOUT)
            return self.queue(queue).send_message(
                text, time_to_live=NEVER_EXPIRES, connection_timeout=timeout, read_timeout=timeout
            )

        await self.retry(call, what=f"send to queue {queue}")

    async def approximate_count(self, queue: str) -> int:
        """Messages in ``queue``, visible or not (Azure's approximate count)."""
        props = await self.retry(self.queue(queue).get_queue_properties, what=f"read queue {queue}")
        return int(props.approximate_message_count or 0)
