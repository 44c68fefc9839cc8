"""A1111's ``--api-auth``: the stand-in refuses as A1111 does, the worker sends SIDECAR_A1111_API_AUTH
and never logs it, a refusal is a stop with one line (never a poisoned job), and A1111 started by the
sidecar gets the credential but none of the storage ones."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.a1111 import A1111Client, http_client
from sidecar.config import Settings, load_settings
from sidecar.errors import A1111AuthRefused, ConfigError, FatalError
from sidecar.storage import Storage
from sidecar.supervisor import Supervisor, child_environment
from tests.conftest import ROOT, settings_env
from tests.helpers import WorkerProcess, blob_names, poison_entries, visible_messages

USER, PASSWORD = "sidecar", "s3cret-Pa55word"
JOB = {"prompt": "a lighthouse at dusk", "steps": 2}


class AuthStandin:
    """``python -m a1111.standin --api-auth ...`` as a real server of this test's own."""

    def __init__(self, api_auth: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        argv = ["--host", "127.0.0.1", "--port", str(self.port), "--seconds-per-image", "0.02"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "a1111.standin", *argv, "--api-auth", api_auth], cwd=ROOT
        )

    async def ready(self) -> None:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(base_url=self.url) as http:
            while True:
                assert self.process.poll() is None, "the stand-in exited"
                try:
                    if (await http.get("/sdapi/v1/sd-models")).status_code == 401:
                        return
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the stand-in did not answer"
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
async def guarded() -> AsyncIterator[AuthStandin]:
    server = AuthStandin(f"{USER}:{PASSWORD},other:pw2")
    try:
        await server.ready()
        yield server
    finally:
        server.stop()


async def test_the_standin_refuses_as_a1111_does(guarded: AuthStandin) -> None:
    """A1111's auth dependency on every /sdapi/v1 route, its error shape, no WWW-Authenticate (its
    api_middleware drops the headers), the check before body validation, other paths open."""
    refusal = {"error": "HTTPException", "body": "", "errors": ""}
    async with httpx.AsyncClient(base_url=guarded.url) as http:
        missing = await http.get("/sdapi/v1/samplers")
        assert (missing.status_code, missing.json()) == (401, {**refusal, "detail": "Not authenticated"})
        assert "www-authenticate" not in missing.headers
        wrong = await http.get("/sdapi/v1/samplers", auth=(USER, "nope"))
        assert (wrong.status_code, wrong.json()) == (
            401,
            {**refusal, "detail": "Incorrect username or password"},
        )
        bearer = await http.get("/sdapi/v1/options", headers={"Authorization": "Bearer abc"})
        assert bearer.json()["detail"] == "Not authenticated"
        garbled = await http.get("/sdapi/v1/options", headers={"Authorization": "Basic !!!"})
        assert garbled.json()["detail"] == "Invalid authentication credentials"
        # no credentials and a body that fails validation: 401 first
        bad_body = await http.post("/sdapi/v1/txt2img", json={"steps": "many"})
        assert bad_body.status_code == 401
        for user, password in [(USER, PASSWORD), ("other", "pw2")]:
            assert (await http.get("/sdapi/v1/samplers", auth=(user, password))).status_code == 200
        made = await http.post(
            "/sdapi/v1/txt2img", json={**JOB, "width": 64, "height": 64}, auth=(USER, PASSWORD)
        )
        assert made.status_code == 200 and len(made.json()["images"]) == 1
        assert (await http.get("/sdapi/v1/no-such-route")).status_code == 404
        assert (await http.post("/standin/reset")).status_code == 200


async def test_the_client_raises_a_fatal_error_on_401_never_a_job_error(guarded: AuthStandin) -> None:
    async with http_client(guarded.url, (USER, "wrong")) as http:
        with pytest.raises(A1111AuthRefused, match="refused the credentials in SIDECAR_A1111_API_AUTH"):
            await A1111Client(http).txt2img(JOB, timeout=30)
    async with http_client(guarded.url) as http:
        with pytest.raises(FatalError, match="set SIDECAR_A1111_API_AUTH"):
            await A1111Client(http).txt2img(JOB, timeout=30)
    async with http_client(guarded.url, (USER, PASSWORD)) as http:
        generation = await A1111Client(http).txt2img(JOB, timeout=30)
        assert len(generation.images) == 1


def test_the_setting_takes_one_user_password_pair_and_never_echoes_it() -> None:
    base = {"storage_connection_string": "UseDevelopmentStorage=true"}
    for bad in ["no-colon-q7", "user-q7:", ":pw-q7", "q7:b8:c9", "q7:b8,c9:d0"]:
        with pytest.raises(ConfigError) as refused:
            load_settings({**base, "a1111_api_auth": bad})
        line = str(refused.value)
        assert line.startswith("SIDECAR_A1111_API_AUTH: must be user:password")
        assert "q7" not in line and "(got" not in line and "\n" not in line
    settings = load_settings({**base, "a1111_api_auth": f"{USER}:{PASSWORD}"})
    assert settings.a1111_credentials == (USER, PASSWORD)
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings.model_dump())


async def test_a_worker_with_the_credential_runs_jobs_and_never_logs_it(
    make_settings: Any, guarded: AuthStandin, tmp_path: Path
) -> None:
    settings = make_settings(a1111_url=guarded.url, a1111_api_auth=f"{USER}:{PASSWORD}")
    store = Storage.connect(settings)
    await store.ensure()
    try:
        for index in range(3):
            await store.send(settings.queue_name[0], json.dumps({**JOB, "id": f"auth-{index}"}))
        worker = WorkerProcess(settings, "--exit-when-empty", log_dir=tmp_path)
        try:
            assert await worker.wait_exit(60) == 0, worker.tail()
        finally:
            worker.stop()
        assert sorted(worker.done_jobs()) == ["auth-0", "auth-1", "auth-2"]
        assert len([n for n in await blob_names(store) if n.endswith(".png")]) == 3
        assert PASSWORD not in worker.log_path.read_text()
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("credential", "expected"),
    [
        (f"{USER}:wrong-one", "A1111 refused the credentials in SIDECAR_A1111_API_AUTH"),
        (
            None,
            "A1111 asks for credentials (401: HTTPException: Not authenticated): set SIDECAR_A1111_API_AUTH",
        ),
    ],
)
async def test_refused_at_start_is_one_line_at_once(
    make_settings: Any, guarded: AuthStandin, credential: str | None, expected: str
) -> None:
    """Not retried until the start timeout: a wrong credential cannot get better."""
    settings = make_settings(a1111_url=guarded.url, a1111_api_auth=credential, a1111_start_timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(_env(settings), SIDECAR_LOG_FORMAT="text")
    # The start timeout is 120 s: a worker that kept trying would be killed by this 60 s limit.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "run", env=env, cwd=ROOT, stderr=subprocess.PIPE
    )
    _, raw = await asyncio.wait_for(process.communicate(), 60)
    stderr = raw.decode()
    assert process.returncode == 3, stderr
    errors = [line for line in stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and expected in errors[0], stderr
    assert "Traceback" not in stderr and "wrong-one" not in stderr


def _env(settings: Settings) -> dict[str, str]:
    return {k: v for k, v in settings_env(settings).items() if k.startswith("SIDECAR_")}


async def test_a_refusal_mid_run_stops_the_worker_and_loses_no_job(
    make_settings: Any, guarded: AuthStandin, tmp_path: Path
) -> None:
    """A1111 restarted with another password: the next generation is refused. That is the node's
    fault, not the job's: exit 1 with one line, the job back in the queue, nothing poisoned."""
    settings = make_settings(a1111_url=guarded.url, a1111_api_auth=f"{USER}:{PASSWORD}")
    store = Storage.connect(settings)
    await store.ensure()
    queue = settings.queue_name[0]
    try:
        await store.send(queue, json.dumps({**JOB, "id": "before"}))
        worker = WorkerProcess(settings, log_dir=tmp_path)
        try:
            await worker.wait_for(lambda: worker.done_jobs() == ["before"], what="the first job")
            async with httpx.AsyncClient(base_url=guarded.url) as http:
                (await http.post("/standin/api-auth", json=f"{USER}:rotated")).raise_for_status()
            await store.send(queue, json.dumps({**JOB, "id": "after"}))
            assert await worker.wait_exit(60) == 1, worker.tail()
        finally:
            worker.stop()
        errors = [entry for entry in worker.lines() if entry.get("level") == "error"]
        assert len(errors) == 1, errors
        assert "A1111 refused the credentials in SIDECAR_A1111_API_AUTH" in errors[0]["msg"], errors
        assert worker.done_jobs() == ["before"]
        assert await poison_entries(store, queue) == []
        deadline = time.monotonic() + 30
        while not (left := await visible_messages(store, queue)):
            assert time.monotonic() < deadline, "the job did not come back"
            await asyncio.sleep(0.1)
        assert [json.loads(text)["id"] for text in left] == ["after"]
    finally:
        await store.close()


def test_a1111_started_by_the_sidecar_gets_its_credential_but_no_storage_secret() -> None:
    environ = {
        "PATH": "/usr/bin",
        "SIDECAR_STORAGE_CONNECTION_STRING": "QueueEndpoint=x;SharedAccessSignature=sig",
        "SIDECAR_BLOB_CONNECTION_STRING": "BlobEndpoint=x;SharedAccessSignature=sig",
        "AZURE_STORAGE_CONNECTION_STRING": "AccountKey=abc",
        "AZURE_CLIENT_SECRET": "shh",
        "SIDECAR_A1111_API_AUTH": f"{USER}:{PASSWORD}",
        "HF_HOME": "/opt/cache",
    }
    assert child_environment(environ) == {
        "PATH": "/usr/bin",
        "SIDECAR_A1111_API_AUTH": f"{USER}:{PASSWORD}",
        "HF_HOME": "/opt/cache",
    }


async def test_the_supervised_child_really_runs_with_that_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = tmp_path / "env.json"
    monkeypatch.setenv("SIDECAR_STORAGE_CONNECTION_STRING", "AccountKey=abc")
    monkeypatch.setenv("SIDECAR_A1111_API_AUTH", f"{USER}:{PASSWORD}")
    code = f"import json, os; open({str(seen)!r}, 'w').write(json.dumps(dict(os.environ)))"
    exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    supervisor = Supervisor(shlex.join([sys.executable, "-c", code]), exited.set_result)
    await supervisor.start()
    assert await asyncio.wait_for(exited, 30) == 0
    child = json.loads(seen.read_text())
    assert "SIDECAR_STORAGE_CONNECTION_STRING" not in child
    assert child["SIDECAR_A1111_API_AUTH"] == f"{USER}:{PASSWORD}"


@pytest.mark.parametrize("credential", [None, f"{USER}:{PASSWORD}"])
def test_start_webui_passes_the_credential_as_api_auth(tmp_path: Path, credential: str | None) -> None:
    """The gpu image's start script: --api-auth from SIDECAR_A1111_API_AUTH, one argument."""
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake_python.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "A1111_DIR": str(tmp_path), "A1111_PYTHON": str(fake_python)}
    if credential:
        env["SIDECAR_A1111_API_AUTH"] = credential
    out = subprocess.run(
        ["sh", str(ROOT / "a1111" / "start-webui.sh"), "--extra"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    args = out.stdout.splitlines()
    assert args[0] == "launch.py" and args[-1] == "--extra"
    assert "--listen" not in args  # the API stays on the container's loopback
    if credential:
        at = args.index("--api-auth")
        assert args[at + 1] == credential
    else:
        assert "--api-auth" not in args
