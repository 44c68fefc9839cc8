"""A1111 as a supervised child (SIDECAR_A1111_COMMAND).

The child's output goes to the sidecar's own stdout/stderr (the container log). Its exit is noticed at
once: the ``on_exit`` callback lets the worker drain, give back held messages and exit non-zero so the
orchestrator restarts the container. After the worker drains on SIGTERM, the child is stopped too.

The child gets the sidecar's environment without the storage credentials: A1111 runs extensions and
model code, and needs none of them. It keeps ``SIDECAR_A1111_API_AUTH``, from which the image's
``start-webui.sh`` sets A1111's ``--api-auth``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


# What A1111 may see of the sidecar's settings: its own credential, nothing about storage.
KEPT_FOR_A1111 = {"SIDECAR_A1111_API_AUTH"}


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the sidecar's settings and Azure credentials (connection strings, SAS,
    service principal secrets), except what A1111 itself needs."""
    return {
        name: value
        for name, value in environ.items()
        if name in KEPT_FOR_A1111 or not name.upper().startswith(("SIDECAR_", "AZURE_"))
    }


class Supervisor:
    def __init__(self, command: str, on_exit: Callable[[int], None], stop_timeout: float = 30.0) -> None:
        self.argv = shlex.split(command)
        self.on_exit = on_exit
        self.stop_timeout = stop_timeout
        self.process: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        # A session of its own: stopping A1111 also stops the launcher's children (python, git, ...).
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, start_new_session=True, env=child_environment(os.environ)
        )
        log.info("started A1111", extra={"stage": "a1111_start", "pid": self.process.pid})
        self._watch = asyncio.create_task(self._wait(), name="a1111-watch")

    async def _wait(self) -> None:
        assert self.process is not None
        code = await self.process.wait()
        if not self._stopping:
            log.error("A1111 exited with %s", code, extra={"stage": "a1111_exit", "code": code})
            self.on_exit(code)

    async def stop(self) -> None:
        """SIGTERM the child's process group, then SIGKILL after the timeout."""
        self._stopping = True
        process = self.process
        if process is None or process.returncode is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=self.stop_timeout)
        except TimeoutError:
            self._signal(signal.SIGKILL)
            await process.wait()
        if self._watch is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        log.info("stopped A1111", extra={"stage": "a1111_stop", "code": process.returncode})

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
