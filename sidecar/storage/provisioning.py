"""At start: the queues and the container are created, or checked to exist with what a node's
least-privilege credential may do."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from azure.core.exceptions import ResourceExistsError

from sidecar.errors import LeaseLost, StorageRefused
from sidecar.storage.core import StorageCore
from sidecar.storage.refusals import MAY_NOT_CREATE

log = logging.getLogger("sidecar.storage")

_NO_MESSAGE = "00000000-0000-0000-0000-000000000000"
_NO_RECEIPT = "AAAAAAAAAAAAAAAAAAAAAAAAAAA="
_PROBE_BLOCK = base64.b64encode(b"a1111-sidecar-probe").decode()


class Provisioning(StorageCore):
    async def ensure(self) -> None:
        """Create the queues and the container if they are missing.

        A credential that may not create them (a node's SAS from ``grant``) is fine as long as they
        exist; a missing one it may not create stops the start with a line that says so. Existence is
        checked with what such a credential may do: updating a message that cannot exist (the answer
        tells a missing queue from a missing message) and staging a block that is never committed
        (no blob appears; Azure drops it after a week).
        """

        async def create(
            kind: str, name: str, call: Callable[[], Awaitable[Any]], exists: Callable[[], Awaitable[Any]]
        ) -> None:
            async def once() -> None:
                with contextlib.suppress(ResourceExistsError):
                    await call()

            try:
                await self.retry(once, what=f"create {kind} {name}")
            except StorageRefused as refused:
                if refused.code not in MAY_NOT_CREATE:
                    raise
                try:
                    await self.retry(exists, message_op=True, what=f"check that {kind} {name} exists")
                except LeaseLost:
                    return  # the queue answered "no such message": it exists
                except StorageRefused as missing:
                    if missing.status == 404:
                        raise StorageRefused(
                            self.account,
                            f"create {kind} {name}",
                            refused.status,
                            refused.code,
                            f"the {kind} does not exist and this credential may not create it: "
                            "create it with an admin credential",
                        ) from None
                    # It may not even look: let the first real use tell.
                    log.debug("cannot check that %s %s exists: %s", kind, name, missing)

        def queue_exists(name: str) -> Callable[[], Awaitable[Any]]:
            return lambda: self.queue(name).update_message(
                _NO_MESSAGE, pop_receipt=_NO_RECEIPT, visibility_timeout=0
            )

        async def container_exists() -> None:
            probe = self.container.get_blob_client(f"_probe/{self.settings.worker_id}")
            await probe.stage_block(_PROBE_BLOCK, b"probe")

        await asyncio.gather(
            *(
                create("queue", n, self.queue(n).create_queue, queue_exists(n))
                for n in self.settings.all_queues()
            )
        )
        name = self.settings.container_name
        await create("container", name, self.container.create_container, container_exists)
