"""``grant``: a node's credentials hold the least the worker needs. Azurite checks SAS permissions, so
every path the worker takes is run with them, every path it must not have is tried and refused, and
taking any one permission away breaks some worker path."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob.aio import BlobServiceClient
from azure.storage.queue.aio import QueueServiceClient

from sidecar.config import Settings
from sidecar.grant import make_grant
from sidecar.storage import Storage
from tests.conftest import run_cli
from tests.helpers import WorkerProcess, blob_names, poison_entries, queue_texts

JOB = {"prompt": "a red bicycle <lora:add_detail:0.6>", "sampler_name": "k_euler_a", "steps": 2}


def node_settings(make_settings: Any, settings: Settings, grant_settings: dict[str, str]) -> Settings:
    node: Settings = make_settings(
        storage_connection_string=grant_settings["SIDECAR_STORAGE_CONNECTION_STRING"],
        blob_connection_string=grant_settings["SIDECAR_BLOB_CONNECTION_STRING"],
        queue_name=settings.queue_name[0],
        container_name=settings.container_name,
        result_queue_name=settings.result_queue_name,
    )
    return node


@pytest.fixture
def admin(make_settings: Any) -> Settings:
    return make_settings(result_queue_name=f"results-{make_settings().queue_name[0][5:]}")  # type: ignore[no-any-return]


async def test_a_full_run_with_a_granted_credential(
    make_settings: Any, admin: Settings, standin: Any, tmp_path: Path
) -> None:
    """Steps: the operator runs ``grant``; a node runs on its two connection strings alone: jobs are
    stored, an invalid one is poisoned, result messages are sent, and the node drains (exit 0)."""
    store = Storage.connect(admin)
    await store.ensure()
    try:
        out = run_cli(admin, "grant", "--days", "2")
        assert out.returncode == 0, out.stderr
        lines = dict(line.split("=", 1) for line in out.stdout.splitlines())
        assert set(lines) >= {"SIDECAR_STORAGE_CONNECTION_STRING", "SIDECAR_BLOB_CONNECTION_STRING"}
        assert all("AccountKey" not in value for value in lines.values())
        node = node_settings(make_settings, admin, lines)
        queue = admin.queue_name[0]
        for index in range(3):
            await store.send(queue, json.dumps({**JOB, "id": f"granted-{index}"}))
        await store.send(queue, "not a job")
        worker = WorkerProcess(node, "--exit-when-empty", log_dir=tmp_path)
        try:
            assert await worker.wait_exit(60) == 0, worker.tail()
        finally:
            worker.stop()
        assert sorted(worker.done_jobs()) == ["granted-0", "granted-1", "granted-2"]
        names = await blob_names(store)
        assert [n for n in names if n.endswith("job.json")] == [f"granted-{i}/job.json" for i in range(3)]
        assert len(await poison_entries(store, queue)) == 1
        assert admin.result_queue_name
        assert len(await queue_texts(store, admin.result_queue_name)) == 4
        described = json.loads(run_cli(admin, "grant", "--json").stdout)
        assert "list, read or delete blobs" in described["may_not"]
        assert described["expires"].endswith("Z")
    finally:
        await store.close()


async def _refused(call: Any) -> int:
    with pytest.raises(HttpResponseError) as refused:
        await call
    return int(refused.value.status_code or 0)


async def test_what_a_node_credential_must_not_do_is_refused(admin: Settings) -> None:
    store = Storage.connect(admin)
    await store.ensure()
    await store.upload("someone/0.png", b"x", "image/png")
    await store.send(admin.queue_name[0], "{}")
    grant = make_grant(admin, 1)
    queues = QueueServiceClient.from_connection_string(grant.queue_connection)
    blobs = BlobServiceClient.from_connection_string(grant.blob_connection)
    container = blobs.get_container_client(admin.container_name)
    queue = queues.get_queue_client(admin.queue_name[0])
    try:
        assert await _refused(container.list_blobs().__anext__()) == 403
        assert await _refused(container.download_blob("someone/0.png")) == 403
        assert await _refused(container.delete_blob("someone/0.png")) == 403
        other = blobs.get_container_client("some-other-container")
        assert await _refused(other.upload_blob("x.png", b"x")) == 403
        assert await _refused(queue.peek_messages()) == 403
        assert await _refused(queue.clear_messages()) == 403
        assert await _refused(queue.get_queue_properties()) == 403
        assert await _refused(queues.create_queue("made-by-a-node")) == 403
        assert await _refused(queue.delete_queue()) == 403
        assert await _refused(blobs.create_container("made-by-a-node")) == 403
        assert await _refused(container.delete_container()) == 403
        # what it may do, it can
        await container.upload_blob("node/0.png", b"x", overwrite=True)
        await container.upload_blob("node/0.png", b"y", overwrite=True)  # a redelivered job
        assert await blob_names(store) == ["node/0.png", "someone/0.png"]
    finally:
        await queues.close()
        await blobs.close()
        await store.close()


async def test_nothing_works_after_the_expiry(admin: Settings) -> None:
    store = Storage.connect(admin)
    await store.ensure()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    grant = make_grant(admin, 1, now=past)
    queues = QueueServiceClient.from_connection_string(grant.queue_connection)
    blobs = BlobServiceClient.from_connection_string(grant.blob_connection)
    try:
        await store.send(admin.queue_name[0], "{}")
        assert await _refused(queues.get_queue_client(admin.queue_name[0]).receive_message()) == 403
        container = blobs.get_container_client(admin.container_name)
        assert await _refused(container.upload_blob("late/0.png", b"x")) == 403
    finally:
        await queues.close()
        await blobs.close()
        await store.close()


@pytest.mark.parametrize(
    ("queue_permissions", "blob_permissions", "broken"),
    [
        ("ua", "w", "receive"),
        ("pa", "w", "renew or release"),
        ("pu", "w", "poison"),
        ("pua", "", "upload"),
    ],
)
async def test_each_permission_is_needed_by_some_worker_path(
    admin: Settings, queue_permissions: str, blob_permissions: str, broken: str
) -> None:
    """Take one permission away: the worker path that needs it is refused."""
    store = Storage.connect(admin)
    await store.ensure()
    queue = admin.queue_name[0]
    await store.send(queue, "{}")
    grant = make_grant(admin, 1, queue_permissions=queue_permissions, blob_permissions=blob_permissions)
    node = Storage.connect(
        admin.model_copy(
            update={
                "storage_connection_string": _secret(grant.queue_connection),
                "blob_connection_string": _secret(grant.blob_connection),
            }
        )
    )
    try:
        if broken == "receive":
            assert await _refused_sidecar(node.receive(queue, 1, 30))
            return
        (message,) = await node.receive(queue, 1, 30)
        if broken == "renew or release":
            assert await _refused_sidecar(node.set_visibility(message, 30))
        elif broken == "poison":
            assert await _refused_sidecar(node.poison(message, "j", "a reason"))
        else:
            assert await _refused_sidecar(node.upload("j/0.png", b"x", "image/png"))
    finally:
        await node.close()
        await store.close()


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


async def _refused_sidecar(call: Any) -> bool:
    from sidecar.errors import StorageRefused

    with pytest.raises(StorageRefused, match="403"):
        await call
    return True


async def test_a_node_finds_a_missing_queue_or_container_with_what_it_may_do(
    make_settings: Any, admin: Settings
) -> None:
    """A node may not create queues or the container: it checks they exist with the calls it may make
    (updating a message that cannot exist, staging a block never committed) and names what is missing."""
    store = Storage.connect(admin)
    await store.ensure()
    await store.close()
    grant = make_grant(admin, 1)
    for missing in ("queue", "container"):
        names: dict[str, Any] = (
            {"queue_name": ["never-made"]} if missing == "queue" else {"container_name": "never-made"}
        )
        node = Storage.connect(
            admin.model_copy(
                update={
                    "storage_connection_string": _secret(grant.queue_connection),
                    "blob_connection_string": _secret(
                        make_grant(admin.model_copy(update=names), 1).blob_connection
                        if missing == "container"
                        else grant.blob_connection
                    ),
                    **names,
                }
            )
        )
        try:
            from sidecar.errors import StorageRefused

            with pytest.raises(StorageRefused) as refused:
                await node.ensure()
            assert f"create {missing} never-made" in str(refused.value)
            assert "does not exist and this credential may not create it" in str(refused.value)
        finally:
            await node.close()
    node = Storage.connect(
        admin.model_copy(
            update={
                "storage_connection_string": _secret(grant.queue_connection),
                "blob_connection_string": _secret(grant.blob_connection),
            }
        )
    )
    try:
        await node.ensure()  # everything exists: no refusal, nothing created
    finally:
        await node.close()


async def test_a_credential_expiring_mid_run_stops_the_node_cleanly(
    make_settings: Any, admin: Settings, own_standin: Any, tmp_path: Path
) -> None:
    """Steps: a node runs on a grant that expires 8 s in, with jobs flowing. It warns at start (less
    than a day left), shows the seconds left on /metrics, and stops just before the expiry with one
    line naming the setting (exit 1). No job is lost: every job not stored is still in the queue."""
    import httpx

    store = Storage.connect(admin)
    await store.ensure()
    queue = admin.queue_name[0]
    try:
        for index in range(40):
            await store.send(queue, json.dumps({**JOB, "id": f"expiring-{index}"}))
        grant = make_grant(admin, 8 / 86400)
        async with own_standin(0.3) as a1111:
            node = node_settings(make_settings, admin, grant.settings).model_copy(
                update={"a1111_url": a1111.url}
            )
            worker = WorkerProcess(node, log_dir=tmp_path)
            try:
                await worker.wait_for(lambda: bool(worker.done_jobs()), what="a job done")
                port = worker.messages("starting")[0]["http_port"]
                async with httpx.AsyncClient() as http:
                    metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                (line,) = [
                    m for m in metrics.splitlines() if m.startswith("sidecar_credential_expiry_seconds ")
                ]
                assert 0 < float(line.split()[1]) < 8
                assert await worker.wait_exit(30) == 1
            finally:
                worker.stop()
        (warning,) = [e for e in worker.lines() if e["msg"].startswith("the SAS in SIDECAR_")]
        assert "run grant again" in warning["msg"]
        errors = [e["msg"] for e in worker.lines() if e["level"] == "error"]
        assert len(errors) == 1 and "expires at" in errors[0] and "stopping before it does" in errors[0]
        done = set(worker.done_jobs())
        stored = {n.split("/")[0] for n in await blob_names(store) if n.endswith("job.json")}
        assert done and done <= stored
        assert await store.approximate_count(queue) == 40 - len(done)
    finally:
        await store.close()


def _sidecar(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_grant_output_and_run_env_file_carry_the_node_credential(
    make_settings: Any, admin: Settings, standin: Any, tmp_path: Path
) -> None:
    """What the compose file does: ``grant --output`` writes the lines (owner-only), and a worker whose
    environment holds no storage setting at all runs on ``run --env-file`` alone."""
    store = Storage.connect(admin)
    await store.ensure()
    try:
        path = tmp_path / "node.env"
        out = run_cli(admin, "grant", "--days", "1", "--output", str(path))
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"wrote {path} (expires ") and "SharedAccessSignature" not in out.stdout
        assert path.stat().st_mode & 0o777 == 0o600
        lines = dict(line.split("=", 1) for line in path.read_text().splitlines())
        assert "AccountKey" not in path.read_text()
        assert lines["SIDECAR_QUEUE_NAME"] == admin.queue_name[0]
        await store.send(admin.queue_name[0], json.dumps({**JOB, "id": "from-env-file"}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "AZURE_"))}
        env |= {"SIDECAR_A1111_URL": admin.a1111_url, "SIDECAR_HTTP_PORT": "0", "SIDECAR_LOG_FORMAT": "json"}
        env |= {"SIDECAR_POLL_INTERVAL_MAX": "0.2", "SIDECAR_RETRY_BUDGET": "2"}
        done = _sidecar(env, "run", "--exit-when-empty", "--env-file", str(path))
        assert done.returncode == 0, done.stderr[-3000:]
        assert '"job_id": "from-env-file"' in done.stderr
        assert "from-env-file/job.json" in await blob_names(store)
        nowhere = tmp_path / "nope.env"
        missing = _sidecar(env, "run", "--env-file", str(nowhere))
        assert missing.returncode == 2
        assert (
            missing.stderr.strip()
            == f"a1111-sidecar: configuration error: --env-file {nowhere}: no such file"
        )
    finally:
        await store.close()
