"""The Azure-like queue front (tests/azure_front.py) on real Azurite: Azure-format pop receipts, query
strings read form-decoded, Shared Key checked as Azure computes it, and the fault knobs.

Each test goes through the front with the SDK and looks at Azurite directly to see what really
happened there.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import quote
from xml.etree import ElementTree

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline import AsyncPipeline
from azure.core.pipeline.transport import AioHttpTransport
from azure.core.rest import AsyncHttpResponse, HttpRequest
from azure.storage.queue import AccountSasPermissions, QueueMessage, ResourceTypes, generate_account_sas
from azure.storage.queue.aio import QueueClient

from sidecar.dev.devenv import ACCOUNT, ACCOUNT_KEY, Azurite
from tests.azure_front import AzureQueueFront, on

AZURE_RECEIPT = re.compile(r"[A-Za-z0-9+/]{27}=")
# what a connection aborted before the answer raises from the SDK
LOST = (ServiceRequestError, ServiceResponseError)
WAIT = 10.0  # seconds an awaited event may take before the test fails instead of hanging


@pytest.fixture
async def front(azurite_server: Azurite) -> AsyncIterator[AzureQueueFront]:
    async with AzureQueueFront("127.0.0.1", azurite_server.queue_port, ACCOUNT, ACCOUNT_KEY) as proxy:
        yield proxy


@pytest.fixture
async def direct(azurite_server: Azurite) -> AsyncIterator[QueueClient]:
    """This test's queue, straight on Azurite (no front): to see what really happened there."""
    name = f"front-{uuid.uuid4().hex[:12]}"
    async with QueueClient.from_connection_string(azurite_server.connection_string, name) as client:
        await client.create_queue()
        yield client


def via_front(front: AzureQueueFront, azurite: Azurite, direct: QueueClient, **options: Any) -> QueueClient:
    return QueueClient.from_connection_string(
        front.connection_string(azurite.blob_port), direct.queue_name, **options
    )


async def stored(direct: QueueClient) -> int:
    """Messages in Azurite's queue, invisible ones included."""
    return int((await direct.get_queue_properties()).approximate_message_count or 0)


async def receive_one(client: QueueClient) -> QueueMessage:
    messages = [m async for m in client.receive_messages(max_messages=1, visibility_timeout=60)]
    assert len(messages) == 1
    return messages[0]


async def raw_delete(client: QueueClient, url: str) -> AsyncHttpResponse:
    """A Delete Message built by hand, its URL sent as it is, signed by the SDK's own pipeline."""
    request = HttpRequest("DELETE", url, headers={"x-ms-version": client.api_version})
    pipeline = cast("AsyncPipeline[HttpRequest, AsyncHttpResponse]", client._pipeline)
    return (await pipeline.run(request)).http_response


def code_of(error: HttpResponseError) -> Any:
    """The storage error code the SDK read (an attribute it adds, unknown to the type stubs)."""
    return getattr(error, "error_code", None)


def answer(error: HttpResponseError) -> AsyncHttpResponse:
    assert error.response is not None
    return cast(AsyncHttpResponse, error.response)


async def delete(client: QueueClient, message: QueueMessage) -> None:
    await client.delete_message(message)


def assert_azure_receipt(receipt: str | None) -> None:
    assert receipt is not None and AZURE_RECEIPT.fullmatch(receipt), receipt
    assert "+" in receipt and "/" in receipt
    assert len(base64.b64decode(receipt)) == 20


async def test_receipts_look_like_azure_and_the_sdk_round_trips_them(
    front: AzureQueueFront, azurite_server: Azurite, direct: QueueClient
) -> None:
    async with via_front(front, azurite_server, direct) as client:
        sent = await client.send_message("hello")
        assert_azure_receipt(sent.pop_receipt)
        message = await receive_one(client)
        assert message.content == "hello"
        assert_azure_receipt(message.pop_receipt)

        updated = await client.update_message(message, visibility_timeout=60, content="renewed")
        assert_azure_receipt(updated.pop_receipt)
        assert updated.pop_receipt != message.pop_receipt

        # The stale receipt still maps to Azurite's, so Azurite's own answer comes through.
        with pytest.raises(HttpResponseError) as stale:
            await client.delete_message(message.id, message.pop_receipt)
        assert code_of(stale.value) == "PopReceiptMismatch"
        assert await stored(direct) == 1

        await client.delete_message(message.id, updated.pop_receipt)
    assert await stored(direct) == 0
    assert front.stats.refused == []
    assert front.stats.receipts_issued == 3  # send, receive, update
    assert front.stats.count("receive") == 1 and front.stats.count("update", "PUT") == 1
    assert front.stats.count("delete") == 2 and front.stats.count("send") == 1


async def test_an_unescaped_receipt_is_refused_and_an_escaped_one_deletes(
    front: AzureQueueFront, azurite_server: Azurite, direct: QueueClient
) -> None:
    async with via_front(front, azurite_server, direct) as client:
        await client.send_message("x")
        message = await receive_one(client)
        receipt = message.pop_receipt
        assert receipt is not None
        base = f"{client.url}/messages/{message.id}"

        raw = await raw_delete(client, f"{base}?popreceipt={receipt}")
        # Shared Key: the SDK signed '+', the front read a space, as Azure would -> 403.
        assert raw.status_code in (400, 403), raw.text()
        code = raw.headers["x-ms-error-code"]
        assert code in ("AuthenticationFailed", "InvalidQueryParameterValue")
        assert ElementTree.fromstring(raw.text()).findtext("Code") == code
        assert [(op, c) for op, c, _ in front.stats.refused] == [("delete", code)]
        assert await stored(direct) == 1  # it never reached Azurite

        escaped = await raw_delete(client, f"{base}?popreceipt={quote(receipt, safe='')}")
        assert escaped.status_code == 204, escaped.text()
    assert await stored(direct) == 0
    assert len(front.stats.refused) == 1


async def test_a_receipt_the_front_did_not_issue_is_an_invalid_query_parameter(
    front: AzureQueueFront, azurite_server: Azurite, direct: QueueClient
) -> None:
    await direct.send_message("x")
    from_azurite = await receive_one(direct)  # Azurite's own receipt, never seen by the front
    async with via_front(front, azurite_server, direct) as client:
        with pytest.raises(HttpResponseError) as refused:
            await client.delete_message(from_azurite.id, from_azurite.pop_receipt)
    assert refused.value.status_code == 400
    assert code_of(refused.value) == "InvalidQueryParameterValue"
    body = ElementTree.fromstring(answer(refused.value).text())
    assert body.findtext("QueryParameterName") == "popreceipt"
    assert body.findtext("QueryParameterValue") == from_azurite.pop_receipt
    assert answer(refused.value).headers["Content-Type"] == "application/xml"
    assert front.stats.refused[0][:2] == ("delete", "InvalidQueryParameterValue")
    assert await stored(direct) == 1


class TamperingTransport(AioHttpTransport):  # type: ignore[misc]  # azure-core's lazy import: Any
    """Changes one character of the signature the SDK computed, just before the request leaves."""

    async def send(self, request: Any, **kwargs: Any) -> Any:
        scheme, _, signature = request.headers["Authorization"].rpartition(":")
        flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
        request.headers["Authorization"] = f"{scheme}:{flipped}"
        return await super().send(request, **kwargs)


@pytest.mark.parametrize("how", ["tampered signature", "wrong key"])
async def test_a_bad_signature_is_authentication_failed(
    front: AzureQueueFront, azurite_server: Azurite, direct: QueueClient, how: str
) -> None:
    await direct.send_message("x")
    if how == "tampered signature":
        client = via_front(front, azurite_server, direct, transport=TamperingTransport())
    else:
        other_key = base64.b64encode(b"not the account key").decode()
        client = QueueClient(
            front.url, direct.queue_name, credential={"account_name": ACCOUNT, "account_key": other_key}
        )
    async with client:
        with pytest.raises(ClientAuthenticationError) as refused:
            await receive_one(client)
    assert refused.value.status_code == 403
    assert code_of(refused.value) == "AuthenticationFailed"
    assert answer(refused.value).headers["x-ms-error-code"] == "AuthenticationFailed"
    assert [(op, code) for op, code, _ in front.stats.refused] == [("receive", "AuthenticationFailed")]
    assert not front.stats.forwarded
    assert [m.content for m in await direct.peek_messages()] == ["x"]  # still visible: never received


async def test_a_sas_connection_string_works_through_the_front(
    front: AzureQueueFront, azurite_server: Azurite, direct: QueueClient
) -> None:
    sas = generate_account_sas(
        ACCOUNT,
        ACCOUNT_KEY,
        ResourceTypes(service=True, container=True, object=True),
        AccountSasPermissions(read=True, write=True, delete=True, add=True, update=True, process=True),
        expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
    )
    conn = front.sas_connection_string(sas, azurite_server.blob_port)
    async with QueueClient.from_connection_string(conn, direct.queue_name) as client:
        await client.send_message("one")
        await client.send_message("two")
        first = await receive_one(client)
        assert_azure_receipt(first.pop_receipt)
        updated = await client.update_message(first, visibility_timeout=60)
        assert_azure_receipt(updated.pop_receipt)
        await client.delete_message(first.id, updated.pop_receipt)

        # SAS does not sign the receipt, so the unescaped one is refused for what Azure reads: a space.
        second = await receive_one(client)
        base = f"{front.url}/{direct.queue_name}/messages/{second.id}"
        raw = await raw_delete(client, f"{base}?popreceipt={second.pop_receipt}&{sas}")
        assert raw.status_code == 400, raw.text()
        assert raw.headers["x-ms-error-code"] == "InvalidQueryParameterValue"
        value = ElementTree.fromstring(raw.text()).findtext("QueryParameterValue")
        assert value == (second.pop_receipt or "").replace("+", " ")
        assert await stored(direct) == 1
        escaped = await raw_delete(
            client, f"{base}?popreceipt={quote(second.pop_receipt or '', safe='')}&{sas}"
        )
        assert escaped.status_code == 204, escaped.text()
    assert await stored(direct) == 0
    assert [(op, code) for op, code, _ in front.stats.refused] == [("delete", "InvalidQueryParameterValue")]


async def test_hold_keeps_matching_requests_until_the_gate_opens(
    front: AzureQueueFront, azurite_server: Azurite, direct: QueueClient
) -> None:
    gate = front.hold(on("delete"))
    async with via_front(front, azurite_server, direct) as client:
        await client.send_message("x")
        message = await receive_one(client)
        deleting = asyncio.create_task(delete(client, message))
        await asyncio.wait_for(gate.waiting(1), WAIT)
        # Other requests pass while the delete is held; the delete has not reached Azurite.
        await client.send_message("y")
        assert not deleting.done()
        assert front.stats.forwarded[("DELETE", "delete")] == 0
        assert await stored(direct) == 2
        gate.open()
        await asyncio.wait_for(deleting, WAIT)
    assert gate.held == 0
    assert [m.content for m in await direct.peek_messages()] == ["y"]
    assert await stored(direct) == 1


async def test_a_dropped_response_took_effect_but_the_client_saw_a_connection_error(
    front: AzureQueueFront, azurite_server: Azurite, direct: QueueClient
) -> None:
    # No SDK retries: it would send the request again and report that answer instead.
    async with via_front(front, azurite_server, direct, retry_total=0) as client:
        # Put Message is a POST, which aiohttp never resends: the client sees the broken connection.
        front.drop_responses(on("send"), count=1)
        # azure-core files aiohttp's ServerDisconnectedError under ServiceRequestError ("not sent"),
        # although the request did reach the server.
        with pytest.raises(LOST):
            await client.send_message("x")
        assert await stored(direct) == 1  # yet Azurite has it
        assert front.stats.dropped == 1

        # A DELETE is idempotent, so aiohttp itself resends it once on a dropped connection
        # (RFC 9112 9.3.1): two drops to see the error, and the message is gone all the same.
        message = await receive_one(client)
        front.drop_responses(on("delete"), count=2)
        with pytest.raises(LOST):
            await client.delete_message(message)
        assert await stored(direct) == 0
        assert front.stats.dropped == 3
        assert front.stats.forwarded[("DELETE", "delete")] == 2
        # Only `count` answers are dropped: the next one arrives (Azurite: the message is gone).
        with pytest.raises(ResourceNotFoundError) as gone:
            await client.delete_message(message)
        assert code_of(gone.value) == "MessageNotFound"
    assert front.stats.dropped == 3


async def test_one_dropped_delete_reads_as_message_not_found(
    front: AzureQueueFront, azurite_server: Azurite, direct: QueueClient
) -> None:
    """What a lost answer to a delete looks like to an aiohttp client: its silent resend finds the
    message already deleted, so a delete that worked reports MessageNotFound."""
    async with via_front(front, azurite_server, direct, retry_total=0) as client:
        await client.send_message("x")
        message = await receive_one(client)
        front.drop_responses(on("delete"), count=1)
        with pytest.raises(ResourceNotFoundError) as gone:
            await client.delete_message(message)
        assert code_of(gone.value) == "MessageNotFound"
    assert await stored(direct) == 0
    assert front.stats.dropped == 1
    assert front.stats.forwarded[("DELETE", "delete")] == 2


async def test_refuse_answers_with_an_azure_error_and_forwards_nothing(
    front: AzureQueueFront, azurite_server: Azurite, direct: QueueClient
) -> None:
    front.refuse(on("delete"), 403, "AuthenticationFailed", count=1)
    async with via_front(front, azurite_server, direct) as client:
        await client.send_message("x")
        message = await receive_one(client)
        with pytest.raises(ClientAuthenticationError) as refused:
            await client.delete_message(message)
        assert refused.value.status_code == 403
        assert code_of(refused.value) == "AuthenticationFailed"
        assert answer(refused.value).headers["x-ms-error-code"] == "AuthenticationFailed"
        assert ElementTree.fromstring(answer(refused.value).text()).findtext("Code") == "AuthenticationFailed"
        assert await stored(direct) == 1  # not forwarded
        assert front.stats.forwarded[("DELETE", "delete")] == 0
        await client.delete_message(message)  # count=1: the next one goes through
    assert await stored(direct) == 0
    assert [(op, code) for op, code, _ in front.stats.refused] == [("delete", "AuthenticationFailed")]
