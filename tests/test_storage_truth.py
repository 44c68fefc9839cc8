"""Storage as Azure really behaves: request bytes as Azure parses them, refusals classed as final,
messages that never expire, proxies chosen per host, and the settings that keep leases safe."""

from __future__ import annotations

import datetime
import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import CredentialUnavailableError
from azure.storage.queue import AccountSasPermissions, ResourceTypes, generate_account_sas
from azure.storage.queue._generated.operations._operations import (
    build_queue_delete_message_request,
    build_queue_receive_messages_request,
)

from sidecar.config import Settings, load_settings
from sidecar.dev.devenv import free_port
from sidecar.errors import ConfigError, LeaseLost, StorageRefused, StorageUnavailable
from sidecar.storage import Storage, _child_url, classify
from tests.conftest import run_cli
from tests.helpers import queue_texts, response_error

# Pop receipts as Azure issues them: base64 of binary data, with "+", "/" and "=".
AZURE_RECEIPTS = ["AgAAAAMAAAAAAAAAYUMWAIg+1gE=", "AgAAAAMAAAAAAAAA/+9f//8+1gE=", "a+b/c=="]


@pytest.mark.parametrize("receipt", AZURE_RECEIPTS)
def test_the_hand_built_delete_is_the_sdks_request_byte_for_byte(receipt: str) -> None:
    """The query string of our Delete Message is the very string the SDK's own request builder
    makes, and reads back (as Azure form-decodes it) to the receipt we hold."""
    base = "https://acct.queue.core.windows.net/jobs"
    ours = _child_url(base, "messages/some-id", {"popreceipt": receipt})
    sdk = build_queue_delete_message_request("some-id", pop_receipt=receipt, version="2026-10-06")
    assert ours == base + sdk.url
    assert dict(parse_qsl(urlsplit(ours).query)) == {"popreceipt": receipt}


def test_the_hand_built_receive_is_the_sdks_and_keeps_a_sas_token_last() -> None:
    base = "https://acct.queue.core.windows.net/jobs"
    query = {"numofmessages": "4", "visibilitytimeout": "60"}
    sdk = build_queue_receive_messages_request(number_of_messages=4, visibility_timeout=60, version="x")
    assert _child_url(base, "messages", query) == base + sdk.url
    sas = "sv=2025-01-05&sig=a%2Bb%3D"
    ours = _child_url(f"{base}?{sas}", "messages", query)
    assert ours == f"{base}{sdk.url}&{sas}"
    assert dict(parse_qsl(urlsplit(ours).query))["sig"] == "a+b="


@pytest.mark.parametrize(
    ("status", "code", "words"),
    [
        (403, "AuthenticationFailed", "key or SAS is wrong or has expired"),
        (403, "AuthorizationPermissionMismatch", "does not grant this permission"),
        (403, "AuthorizationFailure", "an expired or too narrow SAS"),
        (404, "ContainerNotFound", "container was deleted"),
        (404, "QueueNotFound", "queue was deleted"),
        (400, "InvalidQueryParameterValue", ""),
    ],
)
def test_refusals_retrying_cannot_fix_are_final_and_name_account_operation_and_code(
    status: int, code: str, words: str
) -> None:
    mapped = classify(
        response_error(status, code), message_op=True, account="acct", operation="delete message m"
    )
    assert isinstance(mapped, StorageRefused)
    assert str(mapped).startswith(f"storage account acct refused delete message m: {status} {code}")
    assert words in str(mapped)


def test_lease_and_transient_answers_keep_their_classes() -> None:
    assert isinstance(classify(response_error(404, "MessageNotFound"), message_op=True), LeaseLost)
    assert isinstance(classify(response_error(400, "PopReceiptMismatch"), message_op=True), LeaseLost)
    assert isinstance(classify(response_error(503, "ServerBusy")), StorageUnavailable)
    assert isinstance(classify(response_error(429, "")), StorageUnavailable)
    # A queue deleted under a held message is not "another consumer has it": it is final.
    assert isinstance(classify(response_error(404, "QueueNotFound"), message_op=True), StorageRefused)


@pytest.mark.parametrize(
    "error",
    [
        ClientAuthenticationError("AADSTS700016: application not found in the directory"),
        CredentialUnavailableError("DefaultAzureCredential failed to retrieve a token"),
    ],
)
def test_azure_ad_sign_in_failures_are_final_not_retried(error: Exception) -> None:
    mapped = classify(error, account="acct", operation="receive from queue jobs")
    assert isinstance(mapped, StorageRefused)
    assert "ClientAuthenticationError" in str(mapped) and "Azure AD sign-in failed" in str(mapped)


def test_an_http_account_url_with_azure_ad_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"SIDECAR_STORAGE_ACCOUNT_URL: .*https://"):
        load_settings(
            {"storage_account_url": "http://acct.queue.core.windows.net", "storage_connection_string": None}
        )


def test_a_queue_whose_poison_queue_name_is_too_long_is_a_config_error(settings: Settings) -> None:
    long = "q" * 60  # a valid queue name; "-poison" makes it 67 characters
    with pytest.raises(ConfigError, match=r"SIDECAR_QUEUE_NAME: its poison queue 'q{60}-poison'"):
        load_settings({**_plain(settings), "queue_name": long})
    assert load_settings({**_plain(settings), "queue_name": "q" * 56}).poison_queue_for("q" * 56)


def test_lease_timing_that_leaves_no_room_for_a_renewal_retry_is_a_config_error(settings: Settings) -> None:
    base = _plain(settings)
    with pytest.raises(ConfigError, match=r"SIDECAR_VISIBILITY_TIMEOUT: 10s .* at least 24"):
        load_settings({**base, "visibility_timeout": 10, "retry_base_delay": 2.0, "retry_max_delay": 30})
    assert load_settings({**base, "visibility_timeout": 24, "retry_base_delay": 2.0, "retry_max_delay": 30})
    # the defaults pass
    assert load_settings({**base, "visibility_timeout": 60, "retry_base_delay": 0.5, "retry_max_delay": 30})


def _plain(settings: Settings) -> dict[str, Any]:
    values = settings.model_dump()
    values["storage_connection_string"] = settings.connection_string
    return values


async def _expiries(storage: Storage, queue: str) -> list[int]:
    peeked = await storage.queue(queue).peek_messages(max_messages=32)
    return [m.expires_on.year if m.expires_on else 0 for m in peeked]


async def test_messages_the_worker_sends_never_expire(storage: Storage, settings: Settings) -> None:
    queue = settings.queue_name[0]
    await storage.send(queue, "{}")
    (message,) = await storage.receive(queue, 1, 30)
    await storage.poison(message, "j", "a reason")
    assert await _expiries(storage, settings.poison_queue_for(queue)) == [9999]


async def test_enqueue_sends_messages_that_never_expire_unless_asked(
    storage: Storage, settings: Settings, tmp_path: Any
) -> None:
    queue = settings.queue_name[0]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a cat"}) + "\n")
    assert run_cli(settings, "enqueue", "--file", str(jobs)).returncode == 0
    assert await _expiries(storage, queue) == [9999]
    await storage.queue(queue).clear_messages()
    assert run_cli(settings, "enqueue", "--file", str(jobs), "--ttl", "3600").returncode == 0
    (expiry,) = [m.expires_on for m in await storage.queue(queue).peek_messages()]
    assert expiry is not None
    assert expiry - datetime.datetime.now(datetime.UTC) < datetime.timedelta(hours=1, minutes=1)
    bad = run_cli(settings, "enqueue", "--file", str(jobs), "--ttl", "0")
    assert bad.returncode != 0 and "--ttl" in bad.stderr


@pytest.mark.parametrize("bypassed", [True, False])
async def test_no_proxy_is_honoured_per_storage_host(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, bypassed: bool
) -> None:
    """A proxy that does not exist: storage on 127.0.0.1 is reached only because NO_PROXY says so."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost" if bypassed else "example.invalid")
    for name in ("http_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    store = Storage.connect(settings)
    try:
        if bypassed:
            await store.ensure()
            await store.send(settings.queue_name[0], "{}")
            assert await queue_texts(store, settings.queue_name[0]) == ["{}"]
        else:
            with pytest.raises(StorageUnavailable, match=r"connection refused|connect call failed"):
                await store.ensure()
    finally:
        await store.close()


async def test_a_missing_queue_the_credential_may_not_create_stops_the_start_in_one_line(
    storage: Storage, settings: Settings, make_settings: Any
) -> None:
    """A node's SAS (no create permission): fine while the queues exist, one clear line when not."""
    container = storage.container
    sas = generate_account_sas(
        container.account_name,
        container.credential.account_key,
        ResourceTypes(service=True, container=True, object=True),
        AccountSasPermissions(read=True, add=True, update=True, process=True, delete=True, list=True),
        expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
        services="bq",
    )
    blob_endpoint = container.url.rsplit("/", 1)[0]
    queue_endpoint = storage.queue("any").url.rsplit("/", 1)[0]
    conn = f"BlobEndpoint={blob_endpoint};QueueEndpoint={queue_endpoint};SharedAccessSignature={sas}"
    node = Storage.connect(
        make_settings(
            storage_connection_string=conn,
            queue_name=settings.queue_name[0],
            container_name=settings.container_name,
        )
    )
    try:
        await node.ensure()  # everything exists (the admin's storage fixture made it): no refusal
    finally:
        await node.close()
    node = Storage.connect(
        make_settings(storage_connection_string=conn, queue_name="never-made", container_name="never-made")
    )
    try:
        with pytest.raises(StorageRefused) as refused:
            await node.ensure()
    finally:
        await node.close()
    text = str(refused.value)
    # the queues are made together: whichever was refused first stops the start
    assert refused.value.operation in ("create queue never-made", "create queue never-made-poison")
    assert f"refused {refused.value.operation}: 403 AuthorizationPermissionMismatch" in text
    assert "does not exist and this credential may not create it" in text
    assert "AuthorizationPermissionMismatch" in text
