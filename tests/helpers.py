"""Small async helpers over the real Azurite for assertions."""

from __future__ import annotations

import json
from typing import Any

from sidecar.storage import Storage


async def blob_names(storage: Storage) -> list[str]:
    return sorted([blob.name async for blob in storage.container.list_blobs()])


async def read_blob(storage: Storage, name: str) -> bytes:
    return bytes(await (await storage.container.download_blob(name)).readall())


async def queue_texts(storage: Storage, queue: str) -> list[str]:
    """Every visible message's text (peek: leaves them in place)."""
    return [m.content async for m in _peek(storage, queue)]


async def _peek(storage: Storage, queue: str) -> Any:
    for message in await storage.queue(queue).peek_messages(max_messages=32):
        yield message


async def poison_entries(storage: Storage, queue: str) -> list[dict[str, Any]]:
    return [json.loads(text) for text in await queue_texts(storage, storage.settings.poison_queue_for(queue))]


async def queue_length(storage: Storage, queue: str) -> int:
    props = await storage.queue(queue).get_queue_properties()
    return int(props.approximate_message_count or 0)
