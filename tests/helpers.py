"""Small async helpers over the real Azurite for assertions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from azure.core.exceptions import HttpResponseError

from sidecar.config import Settings
from sidecar.storage import Storage
from tests.conftest import ROOT, settings_env, worker_command


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


class WorkerProcess:
    """``python -m sidecar run`` as a real subprocess; its JSON log lines are read from a file."""

    def __init__(self, settings: Settings, *args: str, log_dir: Path) -> None:
        self.log_path = log_dir / f"worker-{uuid.uuid4().hex[:8]}.log"
        self._log = self.log_path.open("w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            worker_command(*args),
            env=settings_env(settings),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def lines(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries

    def messages(self, msg: str) -> list[dict[str, Any]]:
        return [entry for entry in self.lines() if entry.get("msg") == msg]

    def done_jobs(self) -> list[str]:
        return [entry["job_id"] for entry in self.messages("job done")]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}) before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")
            await asyncio.sleep(0.05)

    async def wait_exit(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"worker did not exit within {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.05)
        self._log.close()
        return int(self.proc.returncode)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def tail(self, count: int = 30) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-count:])


async def visible_messages(storage: Storage, queue: str) -> list[str]:
    """Receive every message visible now (hiding them for 30 s): proves they were released."""
    found: dict[str, str] = {}
    while True:
        batch = [
            m
            async for m in storage.queue(queue).receive_messages(
                messages_per_page=32, max_messages=32, visibility_timeout=30
            )
        ]
        if not batch:
            break
        for message in batch:
            found[message.id] = message.content
    return list(found.values())


async def standin_call(url: str, method: str, path: str, body: Any = None) -> Any:
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.request(method, path, json=body)
        response.raise_for_status()
        return response.json()


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def standin_generating(url: str, requests: int = 2) -> bool:
    """The stand-in is generating, having received at least ``requests`` calls (the warm-up is the first)."""
    stats = await standin_call(url, "GET", "/standin/stats")
    progress = await standin_call(url, "GET", "/sdapi/v1/progress")
    return stats["requests"] >= requests and bool(progress["state"]["job"])


def response_error(status: int, code: str) -> HttpResponseError:
    """An error as azure-core raises it for an answer with this status and x-ms-error-code."""
    error = HttpResponseError(message=f"{code} happened")
    error.status_code = status
    error.__dict__["error_code"] = code  # azure-core sets it from the answer's headers
    return error
