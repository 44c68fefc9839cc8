"""Secrets never reach logs or poison messages; an original too big for a poison message is kept whole."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sidecar.dev.devenv import ACCOUNT_KEY
from sidecar.logs import redact
from sidecar.storage import Storage
from tests.conftest import run_cli
from tests.helpers import poison_entries, queue_texts, read_blob


def test_redaction_covers_keys_signatures_and_tokens() -> None:
    line = (
        "conn DefaultEndpointsProtocol=https;AccountName=a;AccountKey=abc/def+==;EndpointSuffix=x "
        "url https://a.blob.core.windows.net/c?sv=2024&sig=S3cr3t%2B&se=1 Authorization: Bearer eyJhbGci.x.y "
        "SharedAccessSignature=sv=1&sig=zzz"
    )
    cleaned = redact(line)
    for secret in ("abc/def+==", "S3cr3t%2B", "eyJhbGci.x.y", "zzz"):
        assert secret not in cleaned
    assert "AccountName=a" in cleaned and "EndpointSuffix=x" in cleaned


async def test_account_key_never_in_logs_or_poison(settings: Any, storage: Storage, standin: Any) -> None:
    """Steps: a worker process run with a connection string over a job that is poisoned and a good one.
    Neither its log (stderr) nor the poison queue holds the account key."""
    queue = settings.queue_name[0]
    await storage.send(queue, json.dumps({"prompt": "x", "script_name": "steal.py"}))
    await storage.send(queue, json.dumps({"prompt": "a cat", "id": "fine"}))
    done = await asyncio.to_thread(run_cli, settings, "run", "--exit-when-empty")
    assert done.returncode == 0, done.stderr
    assert ACCOUNT_KEY not in done.stderr + done.stdout
    assert ACCOUNT_KEY[:12] not in done.stderr
    assert len(done.stderr.splitlines()) >= 4  # there was logging to look at
    poison = await queue_texts(storage, settings.poison_queue_for(queue))
    assert poison and all(ACCOUNT_KEY not in text for text in poison)


async def test_bad_connection_string_fails_with_one_line_and_no_key(make_settings: Any) -> None:
    settings = make_settings(storage_connection_string=f"AccountKey={ACCOUNT_KEY};nonsense")
    done = await asyncio.to_thread(run_cli, settings, "run")
    assert done.returncode != 0
    assert ACCOUNT_KEY not in done.stderr + done.stdout
    assert "SIDECAR_STORAGE_CONNECTION_STRING" in done.stderr


async def test_original_too_big_for_a_poison_message_goes_to_a_blob(
    settings: Any, storage: Storage, standin: Any
) -> None:
    """Steps: a 65,500-byte message (a prompt over the limit) cannot fit in a poison message with its
    wrapper; the poison message names a blob that holds the original byte for byte."""
    from sidecar.app import run_worker

    queue = settings.queue_name[0]
    original = json.dumps({"prompt": "y" * (65_500 - 14)})
    assert len(original) == 65_500
    sent = await storage.queue(queue).send_message(original)
    assert await run_worker(settings, exit_when_empty=True) == 0
    [entry] = await poison_entries(storage, queue)
    assert entry["original"] is None and entry["message_id"] == sent.id
    assert entry["error"]["detail"].startswith("prompt:")
    assert (await read_blob(storage, entry["original_blob"])).decode() == original
