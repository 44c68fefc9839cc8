"""Finishing over the in-memory store: images and job.json stored before the delete, failures while
storing, never a delete once stopping for good, the upload slots."""

from __future__ import annotations

import asyncio
import json

import pytest

from sidecar import __version__
from sidecar.errors import StorageRefused, StorageUnavailable
from sidecar.pipeline.stop import StopReason
from sidecar.policy import PipelinePolicy
from sidecar.storage import JSON, PNG
from tests.fakes import PNG_BYTES, generation
from tests.rig import JOB, QUEUE, MakeRig, policies


async def test_images_and_job_json_are_stored_then_the_message_deleted(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    held = await rig.hold({**JOB, "id": "done", "batch_size": 2})
    await rig.finisher.finish(held, generation(images=2, seed=11))
    assert rig.store.blobs["done/0.png"] == (PNG_BYTES, PNG)
    assert rig.store.blobs["done/1.png"] == (PNG_BYTES, PNG)
    data, content = rig.store.blobs["done/job.json"]
    record = json.loads(data)
    assert content == JSON
    assert record["job_id"] == "done" and record["images"] == ["done/0.png", "done/1.png"]
    assert record["job"] == {**JOB, "id": "done", "batch_size": 2}
    assert record["info"] == {"all_seeds": [11, 12]} and record["request"] == {"prompt": "p"}
    assert record["worker"] == {"id": "fake-worker", "version": __version__}
    assert set(record["timings"]) == {"queued_s", "generate_s", "upload_s", "passed_over_s"}
    ops = [call.op for call in rig.store.calls if call.op in {"upload", "delete"}]
    assert ops == ["upload", "upload", "upload", "delete"]  # deleted only after every blob
    assert rig.store.queues[QUEUE] == [] and rig.book.outcomes == {"succeeded": 1}
    assert rig.metrics.registry.get_sample_value("sidecar_images_total") == 2


async def test_an_image_that_is_not_base64_is_a_failure(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    held = await rig.hold()
    broken = generation()
    broken.images = ["not base64!"]
    await rig.finisher.finish(held, broken)
    assert rig.store.blobs == {} and rig.book.outcomes == {"retried": 1}


async def test_storage_away_while_uploading_releases_the_job(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    rig.store.fail("upload", StorageUnavailable("503 ServerBusy"))
    held = await rig.hold()
    await rig.finisher.finish(held, generation())
    assert rig.book.outcomes == {"retried": 1} and rig.store.ops("delete") == []


async def test_storage_refusing_an_upload_stops_at_once_and_deletes_nothing(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    error = StorageRefused("acct", "upload blob", 404, "ContainerNotFound")
    rig.store.fail("upload", error)
    held = await rig.hold()
    with pytest.raises(StorageRefused):
        await rig.finisher.finish(held, generation())
    assert rig.stop.aborting and rig.stop.error is error
    assert rig.store.ops("delete") == [] and held.lease in rig.book.held


async def test_stopping_for_good_stores_but_never_deletes(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    held = await rig.hold({**JOB, "id": "late"})
    rig.store.hold("upload")
    finishing = asyncio.create_task(rig.finisher.finish(held, generation()))
    await rig.store.called("upload")
    rig.stop.abort(StorageRefused("acct", "receive", 403, "AuthenticationFailed"))
    rig.store.release("upload")
    await finishing
    assert "late/job.json" in rig.store.blobs
    assert rig.store.ops("delete") == [] and rig.book.outcomes == {}


async def test_a_graceful_stop_still_deletes(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    held = await rig.hold()
    rig.stop.set(StopReason.SIGNAL)
    await rig.finisher.finish(held, generation())
    assert rig.book.outcomes == {"succeeded": 1}


async def test_uploads_beyond_the_slots_wait(make_rig: MakeRig) -> None:
    rig = make_rig(policies(pipeline=PipelinePolicy(upload_concurrency=1)))
    first, second = await rig.hold({**JOB, "id": "a"}), await rig.hold({**JOB, "id": "b"})
    rig.store.hold("upload")
    await rig.finisher.start(first, generation())
    starting = asyncio.create_task(rig.finisher.start(second, generation()))
    await rig.store.called("upload")
    assert not starting.done() and len(rig.book.finishing) == 1  # the generator would wait here
    rig.store.release("upload")
    await starting
    await rig.finisher.wait()
    assert rig.book.outcomes == {"succeeded": 2} and not rig.book.finishing


async def test_a_refusal_in_a_slot_is_left_to_the_stop(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    rig.store.fail("upload", StorageRefused("acct", "upload blob", 403, "AuthorizationFailure"))
    await rig.finisher.start(await rig.hold(), generation())
    await rig.finisher.wait()  # the task ends without raising; the stop knows
    assert rig.stop.reason is StopReason.STORAGE_REFUSED
