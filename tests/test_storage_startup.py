"""Start-up failures of storage: each ends within the retry budget in exit 1 and one line that says
what is wrong (a refused key, a dead endpoint and the OS's reason, a name that does not resolve, an API
version the endpoint does not serve), never a traceback, in JSON and in text log mode."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.config import Settings
from sidecar.dev.devenv import ACCOUNT_KEY, Azurite, connection_string, free_port
from tests.conftest import ROOT, make_azurite, settings_env, worker_command

WRONG_KEY = "A" * 86 + "=="


def run_worker_once(settings: Settings, timeout: float = 40) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        worker_command(),
        env=settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def error_lines(result: subprocess.CompletedProcess[str], fmt: str) -> list[str]:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    if fmt == "json":
        entries = [json.loads(line) for line in lines]  # every line is JSON: log pipelines keep working
        return [entry["msg"] for entry in entries if entry["level"] == "error"]
    return [line for line in lines if " ERROR " in line]


@pytest.fixture(scope="module")
def strict_azurite() -> Iterator[Azurite]:
    """An Azurite that checks API versions, as Azure and an older emulator do."""
    server, workdir = make_azurite()
    server.child.argv = [arg for arg in server.child.argv if arg != "--skipApiVersionCheck"]
    asyncio.run(server.start())
    yield server
    server.stop()
    workdir.cleanup()


def _case(name: str, azurite: Azurite, strict: Azurite) -> tuple[str, list[str]]:
    if name == "wrong key":
        return azurite.connection_string.replace(ACCOUNT_KEY, WRONG_KEY), [
            "storage account devstoreaccount1 refused create",
            "403 AuthenticationFailed",
            "the account key or SAS is wrong or has expired",
        ]
    if name == "dead endpoint":
        port = free_port()  # nothing listens there
        return connection_string(port, port), [f"127.0.0.1:{port}", "connection refused"]
    if name == "unresolvable account":
        return (
            f"DefaultEndpointsProtocol=https;AccountName=nosuchaccount;AccountKey={ACCOUNT_KEY};"
            "EndpointSuffix=invalid"
        ), ["nosuchaccount.", "name does not resolve"]
    assert name == "api version"
    return strict.connection_string, [
        "400 InvalidHeaderValue",
        "API version 2026-10-06 is not served by this endpoint (it answers with 2026-06-06)",
        "--skipApiVersionCheck",
    ]


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize("name", ["wrong key", "dead endpoint", "unresolvable account", "api version"])
def test_a_storage_that_cannot_be_used_stops_the_start_in_one_line(
    make_settings: Any, azurite_server: Azurite, strict_azurite: Azurite, name: str, fmt: str
) -> None:
    connection, words = _case(name, azurite_server, strict_azurite)
    settings = make_settings(storage_connection_string=connection, log_format=fmt, retry_budget=1.0)
    result = run_worker_once(settings)
    assert result.returncode == 1, result.stderr
    errors = error_lines(result, fmt)
    assert len(errors) == 1, result.stderr
    assert errors[0].count("storage is not usable") == 1
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert WRONG_KEY not in result.stderr and ACCOUNT_KEY not in result.stderr


def test_the_one_line_comes_within_the_retry_budget_even_while_a1111_waits(make_settings: Any) -> None:
    """A1111 that never answers does not hold a storage failure back: storage decides first."""
    port = free_port()
    settings = make_settings(
        storage_connection_string=connection_string(port, port),
        a1111_url=f"http://127.0.0.1:{free_port()}",
        retry_budget=1.0,
        a1111_start_timeout=600,
    )
    result = run_worker_once(settings, timeout=30)
    assert result.returncode == 1
    assert "storage is not usable" in result.stderr and "connection refused" in result.stderr
