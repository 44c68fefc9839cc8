"""Storage faults as Azure has them: Azure-format pop receipts, answers lost after the server acted,
renewals racing settles, refused renewals, and refusals mid-run (a deleted container, an expiring SAS)
with the worker as a real process.

The queue traffic of these tests goes through ``AzureQueueFront`` (tests/azure_front.py): it issues pop
receipts in Azure's format (with ``+``, ``/`` and ``=``) and reads query strings as Azure does."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.storage.queue import AccountSasPermissions, ResourceTypes, generate_account_sas

from sidecar.config import Settings
from sidecar.dev.devenv import ACCOUNT, ACCOUNT_KEY, Azurite
from sidecar.errors import LeaseLost, StorageRefused
from sidecar.lease import Lease
from sidecar.storage import Message, Storage
from tests.azure_front import AzureQueueFront, on
from tests.helpers import WorkerProcess, blob_names, queue_length, queue_texts, visible_messages, wait_until

JOB = {"prompt": "a lighthouse in a storm <lora:add_detail:0.5>", "sampler_name": "k_euler_a", "steps": 2}


@pytest.fixture
async def front(azurite_server: Azurite) -> AsyncIterator[AzureQueueFront]:
    async with AzureQueueFront("127.0.0.1", azurite_server.queue_port, ACCOUNT, ACCOUNT_KEY) as server:
        yield server


@pytest.fixture
async def fronted(
    front: AzureQueueFront, azurite_server: Azurite, make_settings: Any, storage: Storage
) -> AsyncIterator[Storage]:
    """A Storage whose queue calls go through the front (the ``storage`` fixture made the queues)."""
    settings = make_settings(storage_connection_string=front.connection_string(azurite_server.blob_port))
    store = Storage.connect(settings)
    yield store
    await store.close()


async def _one_message(store: Storage, text: str = "{}") -> Message:
    queue = store.settings.queue_name[0]
    await store.send(queue, text)
    (message,) = await store.receive(queue, 1, 30)
    return message


async def test_every_settle_works_with_azure_format_receipts(
    fronted: Storage, front: AzureQueueFront
) -> None:
    """Receive, renew, release and delete with receipts holding "+", "/" and "=": none refused."""
    queue = fronted.settings.queue_name[0]
    for index in range(6):
        await fronted.send(queue, json.dumps({"n": index}))
    messages = await fronted.receive(queue, 6, 30)
    assert len(messages) == 6
    assert all("+" in m.pop_receipt and "/" in m.pop_receipt for m in messages)
    for message in messages:
        await fronted.set_visibility(message, 30)  # a renewal
    await fronted.set_visibility(messages[0], 0)  # a release
    for message in messages[1:]:
        await fronted.delete(message)
    assert front.stats.refused == []
    assert front.stats.count("delete") == 5 and front.stats.count("update") == 7
    (back,) = await fronted.receive(queue, 6, 30)
    await fronted.poison(back, "j", "a reason")
    assert front.stats.refused == []
    assert await queue_length(fronted, queue) == 0


async def test_a_delete_whose_answer_was_lost_counts_as_done(
    fronted: Storage, front: AzureQueueFront
) -> None:
    """The server deleted the message, the answer never came (twice: aiohttp resends a DELETE once by
    itself); the retry finds the message gone: that is our delete, not a lost lease."""
    message = await _one_message(fronted)
    front.drop_responses(on("delete"), count=2)
    await fronted.delete(message)
    assert front.stats.dropped == 2
    assert await queue_length(fronted, fronted.settings.queue_name[0]) == 0


async def test_a_lost_answer_inside_the_lease_is_our_own_delete(
    fronted: Storage, front: AzureQueueFront
) -> None:
    """aiohttp's own resend of a DELETE whose answer was lost meets 404: while the lease has not run out
    nobody else can have taken the message, so it was our delete. Without the lease's word it is not."""
    loop = asyncio.get_running_loop()
    message = await _one_message(fronted)
    front.drop_responses(on("delete"), count=1)
    await fronted.delete(message, ours_until=loop.time() + 20)
    other = await _one_message(fronted)
    front.drop_responses(on("delete"), count=1)
    with pytest.raises(LeaseLost):
        await fronted.delete(other)


async def test_a_release_whose_answer_was_lost_is_a_release(fronted: Storage, front: AzureQueueFront) -> None:
    loop = asyncio.get_running_loop()
    message = await _one_message(fronted, "released")
    front.drop_responses(on("update"), count=1)
    await fronted.set_visibility(message, 0, ours_until=loop.time() + 20)
    assert await visible_messages(fronted, fronted.settings.queue_name[0]) == ["released"]


async def test_a_settle_waits_for_the_renewal_in_flight_and_uses_its_receipt(
    fronted: Storage, front: AzureQueueFront
) -> None:
    """Steps: a renewal is held at the front; the job finishes and deletes meanwhile. The delete must
    wait for the renewal and use the receipt it returned: deleting with the old one while the renewal
    lands would leave the message behind (the job would run again elsewhere)."""
    message = await _one_message(fronted)
    events: list[str] = []

    def arrives(method: str, path: str, query: Any) -> bool:
        if on("update", "delete")(method, path, query):
            events.append("renewal" if method == "PUT" else "delete")
        return method == "PUT"

    gate = front.hold(arrives)
    lease = Lease(fronted, message, visibility=6)  # renewed at 3 s, each try may take 1 s
    await asyncio.wait_for(gate.waiting(1), 10)
    settle = asyncio.create_task(lease.complete())
    done, _ = await asyncio.wait({settle}, timeout=0.5)
    assert not done, "the delete did not wait for the renewal in flight"
    events.append("renewal answered")
    gate.open()
    assert await settle is True
    assert events == ["renewal", "renewal answered", "delete"]
    assert front.stats.refused == []
    assert await queue_length(fronted, fronted.settings.queue_name[0]) == 0


async def test_a_refused_renewal_ends_the_lease_and_tells_the_worker(
    fronted: Storage, front: AzureQueueFront
) -> None:
    message = await _one_message(fronted)
    front.refuse(on("update"), 403, "AuthenticationFailed")
    told: asyncio.Future[StorageRefused] = asyncio.get_running_loop().create_future()
    lease = Lease(fronted, message, visibility=2, on_refused=told.set_result)
    refused = await asyncio.wait_for(told, 10)
    assert "403 AuthenticationFailed" in str(refused) and "renew message" in str(refused)
    assert lease.lost
    assert await lease.complete() is False  # given up: never deleted
    assert front.stats.count("delete") == 0


async def test_a_renewal_that_cannot_land_in_time_ends_the_lease_before_it_runs_out(
    fronted: Storage, front: AzureQueueFront
) -> None:
    """Every renewal hangs: each try gives up after a sixth of the visibility, and the lease is given
    up before the message becomes visible again, instead of retrying for the whole retry budget."""
    message = await _one_message(fronted)
    gate = front.hold(on("update"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    lease = Lease(fronted, message, visibility=3)
    try:
        await wait_until(lambda: _true(lease.lost), timeout=10, what="the lease given up")
        # given up around the 3 s visibility (one 0.5 s try past the last start at most), not after the
        # 60 s read timeout of a single hung try; slack for a loaded machine
        assert loop.time() - started < 3 + 1.5
        assert front.stats.count("update") >= 2  # the renewal was tried again within its window
    finally:
        gate.open()


async def _true(value: bool) -> bool:
    return value


# -- the worker as a real process --------------------------------------------------------------------


async def test_a_run_of_120_jobs_with_azure_receipts_refuses_nothing(
    make_settings: Any,
    front: AzureQueueFront,
    azurite_server: Azurite,
    storage: Storage,
    settings: Settings,
    own_standin: Any,
    tmp_path: Path,
) -> None:
    """Steps: 120 jobs and 3 invalid messages through the front; a 2 s visibility and 32 prefetched
    jobs make renewals happen. Every job is stored, every settle (renewals, deletes, poison) accepted."""
    async with own_standin(0.03) as a1111:
        run_settings = make_settings(
            storage_connection_string=front.connection_string(azurite_server.blob_port),
            a1111_url=a1111.url,
            visibility_timeout=2,
            prefetch=32,
        )
        queue = settings.queue_name[0]
        ids = [f"az-{index:03d}" for index in range(120)]
        for job_id in ids:
            await storage.send(queue, json.dumps({**JOB, "id": job_id}))
        for bad in ("not json", "{}", '{"prompt": "x", "steps": "many"}'):
            await storage.send(queue, bad)
        worker = WorkerProcess(run_settings, "--exit-when-empty", log_dir=tmp_path)
        try:
            assert await worker.wait_exit(120) == 0, worker.tail()
        finally:
            worker.stop()
    assert front.stats.refused == []
    assert front.stats.count("update") >= 1, "no renewal happened: the run did not test them"
    # each message deleted once; under load a delete whose answer came too late is sent again (and
    # then finds the message gone), so the requests may be more
    assert len(front.stats.deleted) == 123 and front.stats.count("delete") >= 123
    names = await blob_names(storage)
    assert [n for n in names if n.endswith("job.json")] == [f"{i}/job.json" for i in ids]
    assert len(await queue_texts(storage, settings.poison_queue_for(queue))) == 3
    assert sorted(worker.done_jobs()) == ids


async def test_container_deleted_mid_run_stops_the_worker_and_keeps_every_job(
    make_settings: Any, storage: Storage, settings: Settings, standin: Any, tmp_path: Path
) -> None:
    """Steps: two jobs are stored; the container is deleted; four more jobs come. Their uploads are
    refused (404 ContainerNotFound): the worker reports none of them succeeded, deletes none, releases
    what it holds and exits 1 within the retry budget with one line naming account, operation, code."""
    result_queue = f"{settings.queue_name[0]}-results"
    settings = make_settings(result_queue_name=result_queue, prefetch=2, retry_budget=2.0)
    queue = settings.queue_name[0]
    worker = WorkerProcess(settings, log_dir=tmp_path)
    try:
        for index in range(2):
            await storage.send(queue, json.dumps({**JOB, "id": f"before-{index}"}))
        await worker.wait_for(lambda: len(worker.done_jobs()) == 2, what="two jobs")
        assert len(await blob_names(storage)) == 4
        await storage.container.delete_container()
        deleted_at = time.monotonic()
        later = [f"after-{index}" for index in range(4)]
        for job_id in later:
            await storage.send(queue, json.dumps({**JOB, "id": job_id}))
        assert await worker.wait_exit(20) == 1
        # a refusal is not retried: the exit comes well within the retry budget (2 s), with slack
        assert time.monotonic() - deleted_at < 2.0 + 5.0
    finally:
        worker.stop()
    assert sorted(worker.done_jobs()) == ["before-0", "before-1"]
    results = [json.loads(text) for text in await queue_texts(storage, result_queue)]
    assert sorted(r["job_id"] for r in results if r["status"] == "succeeded") == ["before-0", "before-1"]
    waiting = [json.loads(text)["id"] for text in await visible_messages(storage, queue)]
    assert sorted(waiting) == later, "a job without blobs left the queue"
    errors = [e["msg"] for e in worker.lines() if e["level"] == "error"]
    assert len(errors) == 1, errors
    last = errors[0]
    assert last.startswith("stopping: storage account devstoreaccount1 refused upload blob after-")
    assert "404 ContainerNotFound" in last and "container was deleted" in last


async def test_a_sas_revoked_mid_run_turns_readyz_503_then_exits_1(
    make_settings: Any,
    front: AzureQueueFront,
    azurite_server: Azurite,
    storage: Storage,
    settings: Settings,
    own_standin: Any,
    tmp_path: Path,
) -> None:
    """Steps: a worker on a SAS, with jobs flowing; once jobs are done, the SAS is revoked (storage
    answers 403 AuthenticationFailed to it; an expiry the worker can read ahead is tested with grant's
    credentials). /readyz turns 503 naming the refusal while the worker gives back what it holds (the
    front holds those releases until the test has seen /readyz, then lets them through), then it exits
    1 with one line naming the authentication failure. Nothing but the stored jobs left the queue."""
    expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    sas = generate_account_sas(
        ACCOUNT,
        ACCOUNT_KEY,
        ResourceTypes(service=True, container=True, object=True),
        AccountSasPermissions(read=True, write=True, add=True, update=True, process=True, delete=True),
        expiry=expiry,
        services="bq",
    )
    queue = settings.queue_name[0]
    async with own_standin(0.5) as a1111:
        run_settings = make_settings(
            storage_connection_string=front.sas_connection_string(sas, azurite_server.blob_port),
            a1111_url=a1111.url,
            http_port=0,
            prefetch=2,
        )
        for index in range(40):
            await storage.send(queue, json.dumps({**JOB, "id": f"sas-{index}"}))
        releases = front.hold(
            lambda method, path, query: method == "PUT" and query.get("visibilitytimeout") == "0"
        )
        worker = WorkerProcess(run_settings, log_dir=tmp_path)
        try:
            await worker.wait_for(lambda: bool(worker.messages("starting")), what="start")
            port = worker.messages("starting")[0]["http_port"]
            await worker.wait_for(lambda: len(worker.done_jobs()) >= 2, timeout=30, what="two jobs")
            front.refuse(
                lambda method, path, query: query.get("visibilitytimeout") != "0", 403, "AuthenticationFailed"
            )
            await asyncio.wait_for(releases.waiting(1), 30)
            async with httpx.AsyncClient() as http:
                ready = await http.get(f"http://127.0.0.1:{port}/readyz")
            assert ready.status_code == 503
            (reason,) = [r for r in ready.json()["reasons"] if r.startswith("stopping:")]
            assert "403 AuthenticationFailed" in reason
            releases.open()
            assert await worker.wait_exit(20) == 1
        finally:
            releases.open()
            worker.stop()
    errors = [e["msg"] for e in worker.lines() if e["level"] == "error"]
    assert len(errors) == 1, errors
    assert errors[0] == reason, "the exit line is the refusal /readyz gave"
    assert "expired" in errors[0]
    done = set(worker.done_jobs())
    assert done, "no job ran before the SAS was revoked: the test did not test a mid-run refusal"
    stored = {name.split("/")[0] for name in await blob_names(storage) if name.endswith("job.json")}
    assert done <= stored
    # Nothing but the stored jobs left the queue (the count includes messages still invisible).
    assert await queue_length(storage, queue) == 40 - len(done)


async def test_a_result_message_that_cannot_be_sent_is_logged_and_the_job_still_done(
    make_settings: Any,
    front: AzureQueueFront,
    azurite_server: Azurite,
    storage: Storage,
    settings: Settings,
    standin: Any,
    tmp_path: Path,
) -> None:
    """Steps: the result queue answers 503 to every send (throttled past the retry budget). The job's
    blobs are stored and its message deleted; the lost result message is a warning with the job id."""
    result_queue = f"{settings.queue_name[0]}-results"
    run_settings = make_settings(
        storage_connection_string=front.connection_string(azurite_server.blob_port),
        result_queue_name=result_queue,
        retry_budget=0.5,
    )
    queue = settings.queue_name[0]
    front.refuse(
        lambda method, path, query: method == "POST" and f"/{result_queue}/" in path, 503, "ServerBusy"
    )
    await storage.send(queue, json.dumps({**JOB, "id": "unreported"}))
    worker = WorkerProcess(run_settings, "--exit-when-empty", log_dir=tmp_path)
    try:
        assert await worker.wait_exit(30) == 0, worker.tail()
    finally:
        worker.stop()
    assert worker.done_jobs() == ["unreported"]
    assert await blob_names(storage) == ["unreported/0.png", "unreported/job.json"]
    (warning,) = worker.messages("result message not sent: storage answered 503 ServerBusy")
    assert warning["job_id"] == "unreported" and warning["status"] == "succeeded"
    assert any(code == "ServerBusy" for _, code, _ in front.stats.refused)
