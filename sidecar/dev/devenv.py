"""Local stand-ins for the cloud: the Azurite emulator and the A1111 stand-in as child processes.

Used by ``demo``, ``bench`` and the tests. Every process gets free ports on 127.0.0.1 and is stopped
by its context manager.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def source_checkout() -> Path | None:
    """The project folder this package runs from (an editable install or a plain checkout), or None
    for an installed package."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "sidecar").is_dir() else None


# Azurite's well-known development account (public, documented; not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connection_string(blob_port: int, queue_port: int, host: str = "127.0.0.1") -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://{host}:{blob_port}/{ACCOUNT};QueueEndpoint=http://{host}:{queue_port}/{ACCOUNT};"
    )


def azurite_binary() -> str:
    """Azurite from ``node_modules`` of the current folder or of the source checkout, else from PATH."""
    for folder in (Path.cwd(), source_checkout()):
        if folder is not None and (local := folder / "node_modules" / ".bin" / "azurite").exists():
            return str(local)
    found = shutil.which("azurite")
    if not found:
        raise FileNotFoundError(
            "Azurite is not installed: run `npm ci` in the project folder (see README), "
            "or put `azurite` on PATH (npm install -g azurite)"
        )
    return found


async def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port} after {timeout}s") from None
            await asyncio.sleep(0.05)


@dataclass
class Child:
    """A child process that can be stopped and started again with the same command."""

    argv: Sequence[str]
    env: dict[str, str] | None = None
    quiet: bool = True
    cwd: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        out = subprocess.DEVNULL if self.quiet else None
        self.process = subprocess.Popen(
            self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=out, start_new_session=True
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with_group = _signal_group(process, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            if with_group:
                _signal_group(process, signal.SIGKILL)
            process.kill()
            process.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> bool:
    try:
        os.killpg(process.pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        process.send_signal(sig)
        return False


@dataclass
class Azurite:
    child: Child
    blob_port: int
    queue_port: int

    @property
    def connection_string(self) -> str:
        return connection_string(self.blob_port, self.queue_port)

    async def start(self) -> None:
        self.child.start()
        for port in (self.blob_port, self.queue_port):
            await wait_for_port(port, 30.0, self.child.process)

    def stop(self) -> None:
        self.child.stop()


def new_azurite(workdir: str, persistent: bool = False, quiet: bool = True) -> Azurite:
    """An Azurite (not started) on free ports, working in ``workdir``; ``persistent`` keeps its data
    there across a stop and start, otherwise it lives in memory."""
    blob_port, queue_port, table_port = free_port(), free_port(), free_port()
    argv = [azurite_binary(), "--silent", "--skipApiVersionCheck", "--disableTelemetry", "--loose"]
    for service, port in (("blob", blob_port), ("queue", queue_port), ("table", table_port)):
        argv += [f"--{service}Host", "127.0.0.1", f"--{service}Port", str(port)]
    argv += ["--location", workdir] if persistent else ["--inMemoryPersistence"]
    return Azurite(Child(argv, quiet=quiet, cwd=workdir), blob_port, queue_port)


@asynccontextmanager
async def azurite(persistent: bool = False, quiet: bool = True) -> AsyncIterator[Azurite]:
    """Azurite blob + queue on free ports, stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="azurite-") as workdir:
        server = new_azurite(workdir, persistent, quiet)
        await server.start()
        try:
            yield server
        finally:
            server.stop()


@dataclass
class Standin:
    child: Child
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 30.0) -> None:
        self.child.start()
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url) as http:
            while True:
                process = self.child.process
                if process is not None and process.poll() is not None:
                    raise RuntimeError(f"the A1111 stand-in exited with {process.returncode}")
                try:
                    if (await http.get("/sdapi/v1/sd-models")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("the A1111 stand-in did not answer")
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.child.stop()


def standin_argv(port: int, seconds_per_image: float, extra: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "a1111.standin",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--seconds-per-image",
        str(seconds_per_image),
        *extra,
    ]


@asynccontextmanager
async def standin(
    seconds_per_image: float = 0.25, extra: Sequence[str] = (), quiet: bool = True
) -> AsyncIterator[Standin]:
    port = free_port()
    server = Standin(Child(standin_argv(port, seconds_per_image, extra), quiet=quiet), port)
    await server.start()
    try:
        yield server
    finally:
        server.stop()
