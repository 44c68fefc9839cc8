"""Blob operations: idempotent uploads, and the record of what a message's last try met."""

from __future__ import annotations

import contextlib
import json
import logging
from urllib.parse import quote

from sidecar.storage.connection import READ_TIMEOUT
from sidecar.storage.core import JSON, Message, StorageCore
from sidecar.storage.rest import child_url, send

log = logging.getLogger("sidecar.storage")


class BlobOperations(StorageCore):
    async def upload(self, name: str, data: bytes, content: str, *, budget: float | None = None) -> None:
        # Deterministic names + overwrite: a redelivered job replaces its blobs instead of duplicating them.
        # Put Blob stores Content-Type as the blob's; x-ms-blob-content-type too, as the SDK sends it.
        headers = {"x-ms-blob-type": "BlockBlob", "x-ms-blob-content-type": content, "Content-Type": content}
        url = child_url(self.container.url, quote(name))
        await self.retry(
            lambda: send(
                self.container,
                "PUT",
                url,
                201,
                headers=headers,
                content=data,
                timeout=None if self.deadline is None else self._try_timeout(READ_TIMEOUT),
            ),
            what=f"upload blob {name} to container {self.settings.container_name}",
            budget=budget,
        )

    # -- what the last try of a message met: read when the message comes back one time too many ------

    def _failure_blob(self, message: Message) -> str:
        return f"_failures/{message.queue}/{message.id}.json"

    async def record_failure(self, message: Message, reason: str) -> None:
        """Note why this try failed, for the try that finds the message over its dequeue limit (best
        effort: a node whose credential may not write it just gives a vaguer poison reason)."""
        body = json.dumps({"dequeue_count": message.dequeue_count, "reason": reason}).encode()
        try:  # one try: it must not hold up the release that follows when storage is slow or away
            await self.upload(self._failure_blob(message), body, JSON, budget=0.0)
        except Exception as error:
            log.debug("could not record the failure of %s: %s", message.id, error)

    async def last_failure(self, message: Message) -> str | None:
        try:
            blob = self.container.get_blob_client(self._failure_blob(message))
            data = json.loads(await (await blob.download_blob()).readall())
            return f"try {data['dequeue_count']}: {data['reason']}"
        except Exception:
            return None

    async def forget_failure(self, message: Message) -> None:
        with contextlib.suppress(Exception):
            await self.container.delete_blob(self._failure_blob(message))
