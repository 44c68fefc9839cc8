"""Shared fixtures: a real Azurite for the session, the A1111 stand-in as a real HTTP server, and
settings that give each test its own queues and container."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from sidecar.config import Settings, load_settings
from sidecar.dev.devenv import Azurite, Child, Standin, azurite_binary, free_port, new_azurite, standin_argv
from sidecar.policy import Policies
from sidecar.storage import Storage
from tests.rig import MakeRig, Rig

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _azurite_or_skip() -> str:
    try:
        return azurite_binary()
    except FileNotFoundError as error:
        if IN_CI:
            raise
        pytest.skip(str(error))


def make_azurite(persistent: bool = False) -> tuple[Azurite, tempfile.TemporaryDirectory[str]]:
    """An Azurite (not started yet) on free ports; ``persistent`` keeps its data across restarts."""
    _azurite_or_skip()
    workdir = tempfile.TemporaryDirectory(prefix="azurite-")
    return new_azurite(workdir.name, persistent), workdir


@pytest.fixture(scope="session")
def azurite_server() -> Iterator[Azurite]:
    server, workdir = make_azurite()
    asyncio.run(server.start())
    yield server
    server.stop()
    workdir.cleanup()


@pytest.fixture(scope="session")
def standin_server() -> Iterator[Standin]:
    """One stand-in for the session (fast: 0.02 s per image); tests reset it before use."""
    port = free_port()
    server = Standin(Child(standin_argv(port, 0.02)), port)
    asyncio.run(server.start())
    yield server
    server.stop()


@pytest.fixture
async def standin(standin_server: Standin) -> Standin:
    async with httpx.AsyncClient(base_url=standin_server.url) as http:
        (await http.post("/standin/reset")).raise_for_status()
    return standin_server


@pytest.fixture
def make_settings(azurite_server: Azurite, standin_server: Standin) -> Any:
    """Settings with this test's own queue and container; retries instant, budgets short."""
    tag = uuid.uuid4().hex[:10]

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "storage_connection_string": azurite_server.connection_string,
            "a1111_url": standin_server.url,
            "queue_name": f"jobs-{tag}",
            "container_name": f"images-{tag}",
            # the test's own queues are made when first used, as `make demo` and the compose seed ask;
            # tests of a missing queue being an error set it to False
            "create_queues": True,
            "retry_base_delay": 0.0,
            "retry_max_delay": 0.0,
            "retry_budget": 2.0,
            "release_delay": 0,
            "poll_interval_min": 0.05,
            "poll_interval_max": 0.2,
            "http_port": 0,
            "worker_id": f"test-{tag}",
            "log_format": "json",
        }
        values.update(overrides)
        return load_settings(values)

    return make


@pytest.fixture
def settings(make_settings: Any) -> Settings:
    return make_settings()  # type: ignore[no-any-return]


@pytest.fixture
async def storage(settings: Settings) -> AsyncIterator[Storage]:
    store = Storage.connect(settings)
    await store.ensure()
    yield store
    await store.close()


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a worker subprocess these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if name == "storage_connection_string":
            value = settings.connection_string
        elif name == "blob_connection_string":
            value = settings.blob_connection
        elif isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, list):
            value = ",".join(value)
        env[f"SIDECAR_{name.upper()}"] = str(value)
    return env


def worker_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", "run", *args]


def run_cli(settings: Settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env=settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
async def own_standin() -> Any:
    """A stand-in of the test's own: ``async with own_standin(0.5, ["--crash-after", "3"]) as a1111``."""
    from sidecar.dev.devenv import standin

    return standin


@pytest.fixture
def make_rig() -> Iterator[MakeRig]:
    """``make_rig(policies(...))``: the pipeline's stages over in-memory fakes (tests/rig.py), each
    closed when the test ends."""
    rigs: list[Rig] = []

    def make(chosen: Policies) -> Rig:
        rig = Rig(chosen)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()
