"""At start: the queues and the container are created, or checked to exist with what a node's
least-privilege credential may do."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from azure.core.exceptions import ResourceExistsError

from sidecar.errors import LeaseLost, StorageRefused
from sidecar.storage.core import StorageCore
from sidecar.storage.refusals import MAY_NOT_CREATE

log = logging.getLogger("sidecar.storage")

_NO_MESSAGE = "00000000-0000-0000-0000-000000000000"
_NO_RECEIPT = "AAAAAAAAAAAAAAAAAAAAAAAAAAA="
_PROBE_BLOCK = base64.b64encode(b"a1111-sidecar-probe").decode()


class NotProvisioned(StorageRefused):
    """Queues (or the container) that do not exist, and were not to be created: a typo in a name
    would otherwise send jobs where no worker reads. One line names every one of them."""

    def __init__(self, account: str, missing: Sequence[tuple[str, str]]) -> None:
        super().__init__(account, "the start", 404, "NotFound")
        self.missing = list(missing)
        names = [f"{kind} {name}" for kind, name in self.missing]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        verb, them = ("does", "it") if len(names) == 1 else ("do", "them")
        self.args = (
            f"{listed} {verb} not exist in storage account {account or '?'}: check the names "
            f"(SIDECAR_QUEUE_NAME, SIDECAR_CONTAINER_NAME), or create {them} with --create-queues "
            "(or SIDECAR_CREATE_QUEUES=true)",
        )


class Provisioning(StorageCore):
    async def ensure(
        self, create: bool | None = None, queues: Sequence[str] | None = None, container: bool = True
    ) -> None:
        """Create the queues and the container if they are missing (``create``; None: the setting
        ``SIDECAR_CREATE_QUEUES``), or check that they exist and raise ``NotProvisioned`` naming the
        missing ones. ``queues`` (default: every queue of the settings) and ``container`` say which.

        A credential that may not create them (a node's SAS from ``grant``) is fine as long as they
        exist; a missing one it may not create stops the start with a line that says so. Existence is
        checked with what such a credential may do: updating a message that cannot exist (the answer
        tells a missing queue from a missing message) and staging a block that is never committed
        (no blob appears; Azure drops it after a week).
        """

        async def make(
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

        async def missing(kind: str, name: str, exists: Callable[[], Awaitable[Any]]) -> bool:
            try:
                await self.retry(exists, message_op=True, what=f"check that {kind} {name} exists")
            except LeaseLost:
                return False  # the queue answered "no such message": it exists
            except StorageRefused as refused:
                if refused.status == 404:
                    return True
                if refused.code not in MAY_NOT_CREATE:
                    raise
                log.debug("cannot check that %s %s exists: %s", kind, name, refused)
            return False

        names = list(self.settings.all_queues() if queues is None else queues)
        if not (self.settings.create_queues if create is None else create):
            checks = [("queue", n, queue_exists(n)) for n in names]
            if container:
                checks.append(("container", self.settings.container_name, container_exists))
            found = await asyncio.gather(*(missing(kind, n, exists) for kind, n, exists in checks))
            absent = [(kind, n) for (kind, n, _), gone in zip(checks, found, strict=True) if gone]
            if absent:
                raise NotProvisioned(self.account, absent)
            return
        await asyncio.gather(*(make("queue", n, self.queue(n).create_queue, queue_exists(n)) for n in names))
        if container:
            name = self.settings.container_name
            await make("container", name, self.container.create_container, container_exists)
