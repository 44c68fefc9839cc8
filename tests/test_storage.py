"""The per-job storage calls (receive, upload, delete) that go through the SDK's pipeline as hand-built
REST requests, and the retry wrapper around every storage call, on real Azurite."""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any

import pytest
from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

from sidecar.app import run_worker
from sidecar.backoff import call_with_retries
from sidecar.config import Settings
from sidecar.errors import LeaseLost, StorageRefused, StorageUnavailable
from sidecar.storage import JSON, PNG, Storage
from tests.helpers import blob_names, queue_length, read_blob


def sas_connection_string(storage: Storage) -> str:
    """An account SAS connection string for the same Azurite: no key, the token rides on every URL."""
    container = storage.container
    sas = generate_account_sas(
        container.account_name,
        container.credential.account_key,
        ResourceTypes(service=True, container=True, object=True),
        AccountSasPermissions(
            read=True, write=True, delete=True, list=True, add=True, create=True, update=True, process=True
        ),
        expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
        services="bq",
    )
    blob_endpoint = container.url.rsplit("/", 1)[0]
    queue_endpoint = storage.queue("any").url.rsplit("/", 1)[0]
    return f"BlobEndpoint={blob_endpoint};QueueEndpoint={queue_endpoint};SharedAccessSignature={sas}"


async def test_message_text_survives_the_round_trip(storage: Storage, settings: Settings) -> None:
    queue = settings.queue_name[0]
    texts = ['{"prompt": "<a & b> \\"q\\" \'s\'"}', '{"prompt": "ünïcødé 🐱 — 猫"}', "eyJwcm9tcHQiOiAieCJ9"]
    for text in texts:
        await storage.send(queue, text)
    received = await storage.receive(queue, 32, 30)
    assert sorted(m.content for m in received) == sorted(texts)
    assert all(m.dequeue_count == 1 and m.pop_receipt and m.queue == queue for m in received)
    for message in received:
        await storage.delete(message)
    assert await queue_length(storage, queue) == 0


async def test_upload_stores_bytes_and_content_type(storage: Storage) -> None:
    await storage.upload("job-1/0.png", b"\x89PNG fake", PNG)
    await storage.upload("job-1/0.png", b"\x89PNG again", PNG)  # overwrite, as a redelivered job does
    await storage.upload("job-1/job.json", b'{"a": 1}', JSON)
    assert await blob_names(storage) == ["job-1/0.png", "job-1/job.json"]
    assert await read_blob(storage, "job-1/0.png") == b"\x89PNG again"
    props = await storage.container.get_blob_client("job-1/job.json").get_blob_properties()
    assert props.content_settings.content_type == "application/json"


async def test_a_stale_pop_receipt_or_a_gone_message_is_a_lost_lease(
    storage: Storage, settings: Settings
) -> None:
    queue = settings.queue_name[0]
    await storage.send(queue, "{}")
    (message,) = await storage.receive(queue, 1, 30)
    stale = message.pop_receipt
    await storage.set_visibility(message, 30)  # a renewal: new pop receipt
    assert message.pop_receipt != stale
    old = type(message)(message.queue, message.id, stale, message.dequeue_count, message.content)
    with pytest.raises(LeaseLost):
        await storage.delete(old)
    await storage.delete(message)
    with pytest.raises(LeaseLost):
        await storage.delete(message)


async def test_missing_container_or_queue_is_refused_not_retried(make_settings: Any) -> None:
    settings = make_settings()
    storage = Storage.connect(settings)  # nothing created
    try:
        with pytest.raises(StorageRefused, match="404"):
            await storage.upload("x/0.png", b"x", PNG)
        with pytest.raises(StorageRefused, match="404"):
            await storage.receive(settings.queue_name[0], 1, 30)
    finally:
        await storage.close()


async def test_worker_runs_on_a_sas_connection_string(
    make_settings: Any, storage: Storage, settings: Settings, standin: Any
) -> None:
    sas_settings = make_settings(
        storage_connection_string=sas_connection_string(storage),
        queue_name=",".join(settings.queue_name),
        container_name=settings.container_name,
    )
    queue = settings.queue_name[0]
    await storage.send(queue, json.dumps({"id": "sas-job", "prompt": "a cat", "steps": 2}))
    assert await run_worker(sas_settings, exit_when_empty=True) == 0
    assert await blob_names(storage) == ["sas-job/0.png", "sas-job/job.json"]
    assert await queue_length(storage, queue) == 0


class Flaky:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise StorageUnavailable(f"down ({self.calls})")
        return "ok"


async def test_call_with_retries_first_try_then_backoff(make_settings: Any) -> None:
    settings = make_settings(retry_base_delay=0.01, retry_max_delay=0.02, retry_budget=5.0)
    assert await call_with_retries(settings, StorageUnavailable, Flaky(0)) == "ok"
    flaky = Flaky(3)
    assert await call_with_retries(settings, StorageUnavailable, flaky) == "ok"
    assert flaky.calls == 4
    flaky = Flaky(5)
    with pytest.raises(StorageUnavailable, match=r"down \(3\)"):
        await call_with_retries(settings, StorageUnavailable, flaky, attempts=3)
    assert flaky.calls == 3
    with pytest.raises(StorageUnavailable):
        await call_with_retries(settings, StorageUnavailable, Flaky(1), attempts=1)


async def test_call_with_retries_gives_up_within_the_budget(make_settings: Any) -> None:
    settings = make_settings(retry_base_delay=0.05, retry_max_delay=0.1, retry_budget=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    flaky = Flaky(1000)
    with pytest.raises(StorageUnavailable):
        await call_with_retries(settings, StorageUnavailable, flaky)
    assert 2 <= flaky.calls < 20
    assert loop.time() - started < 0.3 + 0.1 + 1.0  # the budget, one last wait, slack for a busy machine
