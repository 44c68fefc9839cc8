"""``Storage``: the queue, blob and start-up operations of one worker, and the poison queue."""

from __future__ import annotations

import json

from sidecar.config import Settings
from sidecar.errors import SidecarError
from sidecar.storage.blobs import BlobOperations
from sidecar.storage.connection import open_clients
from sidecar.storage.core import TEXT, Message
from sidecar.storage.provisioning import Provisioning
from sidecar.storage.queues import MAX_QUEUE_MESSAGE_BYTES, QueueOperations
from sidecar.storage.settings import StorageSettings


class Storage(QueueOperations, BlobOperations, Provisioning):
    """Queue and blob operations for one worker; build it with ``Storage.connect(settings)``."""

    @classmethod
    def connect(cls, settings: Settings | StorageSettings) -> Storage:
        if isinstance(settings, Settings):
            settings = StorageSettings.from_settings(settings)
        return cls(settings, *open_clients(settings))

    async def poison(
        self,
        message: Message,
        job_id: str | None,
        error: SidecarError | str,
        *,
        ours_until: float | None = None,
    ) -> None:
        """Copy the message with the reason to the poison queue, then delete the original."""
        kind = error.kind if isinstance(error, SidecarError) else "Error"
        body = {
            "job_id": job_id,
            "message_id": message.id,
            "dequeue_count": message.dequeue_count,
            "error": {"type": kind, "detail": str(error)},
            "original": message.content,
        }
        text = json.dumps(body, ensure_ascii=False)
        if len(text.encode("utf-8")) > MAX_QUEUE_MESSAGE_BYTES:
            # The original alone may fill a queue message: keep it whole in a blob and point to it.
            name = f"_poison/{message.queue}/{message.id}.txt"
            await self.upload(name, message.content.encode("utf-8", "surrogatepass"), TEXT)
            body["original"] = None
            body["original_blob"] = name
            text = json.dumps(body, ensure_ascii=False)
        await self.send(self.settings.poison_queue_for(message.queue), text)
        await self.delete(message, ours_until=ours_until)
