"""Fetching over the in-memory store: what is held, what is poisoned or deferred on receipt, room
under --max-jobs, a queue found drained, one message's bug contained."""

from __future__ import annotations

import asyncio
import json

import pytest

from sidecar.errors import CatalogError, StorageRefused, StorageUnavailable
from sidecar.pipeline.book import Held
from sidecar.pipeline.stop import StopReason
from sidecar.policy import PipelinePolicy, RunLimits, TriesPolicy
from tests.fakes import missing_lora, unknown_sampler
from tests.rig import JOB, QUEUE, MakeRig, policies


async def test_valid_jobs_are_held_under_a_lease(make_rig: MakeRig) -> None:
    rig = make_rig(policies(visibility=45))
    rig.store.add(QUEUE, {**JOB, "id": "one"})
    rig.store.add(QUEUE, {**JOB, "id": "two"})
    batch = await rig.fetcher.next_batch(5)
    assert batch is not None and [held.job.id for held in batch] == ["one", "two"]
    assert {held.lease for held in batch} == rig.book.held
    assert rig.store.ops("receive")[0].args == {"queue": QUEUE, "count": 5, "visibility": 45}
    assert all(held.lease.visibility == 45 for held in batch)


async def test_a_receive_asks_for_at_most_azures_cap(make_rig: MakeRig) -> None:
    rig = make_rig(policies(pipeline=PipelinePolicy(max_receive=32)))
    rig.store.add(QUEUE, JOB)
    await rig.fetcher.next_batch(100)
    assert rig.store.ops("receive")[0].args["count"] == 32


async def test_an_invalid_job_is_poisoned_on_receipt_and_reported(make_rig: MakeRig) -> None:
    rig = make_rig(policies(result_queue="results"))
    rig.store.add(QUEUE, {**JOB, "id": "bad", "colour": "red"})
    assert await rig.fetcher.next_batch(1) == []
    (entry,) = rig.store.poisoned
    assert entry["job_id"] == "bad" and entry["error"]["type"] == "InvalidJob"
    assert "colour" in entry["error"]["detail"]
    assert json.loads(rig.store.sent["results"][0])["status"] == "failed"
    assert rig.book.outcomes == {"poisoned": 1} and not rig.book.held


async def test_a_message_over_its_dequeue_limit_is_poisoned_before_anything_else(make_rig: MakeRig) -> None:
    rig = make_rig(policies(tries=TriesPolicy(max_dequeue_count=3)))
    message_id = rig.store.add(QUEUE, {**JOB, "id": "again"}, dequeue_count=3)
    rig.store.failures[message_id] = "try 3: A1111Timeout: txt2img did not finish"
    rig.catalog.error = AssertionError("the catalog must not be asked")
    assert await rig.fetcher.next_batch(1) == []
    (entry,) = rig.store.poisoned
    assert entry["error"] == {
        "type": "TooManyTries",
        "detail": "received 4 times, more than SIDECAR_MAX_DEQUEUE_COUNT=3; "
        "last failure: try 3: A1111Timeout: txt2img did not finish",
    }
    assert message_id not in rig.store.failures


async def test_a_message_at_its_limit_is_still_run(make_rig: MakeRig) -> None:
    rig = make_rig(policies(tries=TriesPolicy(max_dequeue_count=3)))
    rig.store.add(QUEUE, JOB, dequeue_count=2)
    batch = await rig.fetcher.next_batch(1)
    assert batch is not None and len(batch) == 1 and rig.store.poisoned == []


async def test_a_missing_asset_hands_the_job_back_until_the_limit(make_rig: MakeRig) -> None:
    rig = make_rig(policies(tries=TriesPolicy(max_dequeue_count=2, release_delay=4)))
    rig.catalog.problems[JOB["prompt"]] = [missing_lora()]
    message_id = rig.store.add(QUEUE, JOB)
    assert await rig.fetcher.next_batch(1) == []
    assert rig.book.outcomes == {"deferred": 1}
    assert rig.store.ops("set_visibility")[-1].args["seconds"] == 4
    assert rig.store.failures[message_id].startswith("try 1: AssetMissing: LoRA 'add_detail'")
    rig.store.clock.advance(4)
    assert await rig.fetcher.next_batch(1) == []  # the 2nd try is the last: poisoned
    assert rig.book.outcomes == {"deferred": 1, "poisoned": 1}
    assert rig.store.poisoned[0]["error"]["type"] == "AssetMissing"


async def test_an_unknown_sampler_is_poisoned_at_once(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    rig.catalog.problems[JOB["prompt"]] = [unknown_sampler(), missing_lora()]
    rig.store.add(QUEUE, JOB)
    assert await rig.fetcher.next_batch(1) == []
    assert rig.store.poisoned[0]["error"] == {"type": "UnknownAsset", "detail": unknown_sampler().reason}


async def test_an_unreadable_catalog_defers_the_job(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    rig.catalog.error = CatalogError("GET /sdapi/v1/loras answered 500")
    rig.store.add(QUEUE, JOB)
    assert await rig.fetcher.next_batch(1) == []
    assert rig.book.outcomes == {"deferred": 1}


async def test_one_messages_bug_poisons_only_that_message(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    rig.catalog.problems["explode"] = []
    rig.store.add(QUEUE, {**JOB, "id": "boom", "prompt": "explode"})
    rig.store.add(QUEUE, {**JOB, "id": "fine"})

    real_check = rig.catalog.check

    async def check(payload: dict[str, object]) -> list[object]:
        if payload["prompt"] == "explode":
            raise ZeroDivisionError("division by zero")
        return list(await real_check(payload))

    rig.catalog.check = check  # type: ignore[assignment,method-assign]
    batch = await rig.fetcher.next_batch(2)
    assert batch is not None and [held.job.id for held in batch] == ["fine"]
    (entry,) = rig.store.poisoned
    assert entry["job_id"] == "boom"
    assert entry["error"] == {"type": "ZeroDivisionError", "detail": "ZeroDivisionError: division by zero"}
    assert not rig.stop.is_set


async def test_room_never_exceeds_what_max_jobs_still_needs(make_rig: MakeRig) -> None:
    rig = make_rig(policies(run=RunLimits(max_jobs=3)))
    assert rig.fetcher.room(5) == 3
    held = await rig.hold()
    assert rig.fetcher.room(5) == 2
    await rig.settler.complete(held, [], [], {})
    rig.book.outcomes["poisoned"] += 1
    assert rig.fetcher.room(5) == 1
    unlimited = make_rig(policies())
    assert unlimited.fetcher.room(5) == 5


async def test_empty_queues_drain_only_with_exit_when_empty_and_nothing_held(make_rig: MakeRig) -> None:
    rig = make_rig(policies(run=RunLimits(exit_when_empty=True)))
    held = await rig.hold()
    rig.store.queues[QUEUE].clear()
    assert await rig.fetcher.next_batch(1) == []  # something is still held: not drained
    assert not rig.stop.is_set
    rig.book.held.discard(held.lease)
    held.lease.abandon()
    assert await rig.fetcher.next_batch(1) is None
    assert rig.stop.reason is StopReason.DRAINED and rig.stop.exit_code == 0


async def test_empty_queues_without_exit_when_empty_wait_until_stopped(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    rig.fetcher.poller.min_interval = rig.fetcher.poller.max_interval = 3600.0
    fetching = asyncio.create_task(rig.fetcher.next_batch(1))
    await rig.store.called("receive")
    rig.stop.set(StopReason.SIGNAL)
    assert await fetching == []
    assert rig.stop.reason is not StopReason.DRAINED


async def test_wait_invisible_waits_for_messages_under_other_leases(make_rig: MakeRig) -> None:
    rig = make_rig(policies(run=RunLimits(exit_when_empty=True, wait_invisible=3600.0)))
    rig.store.add(QUEUE, JOB)
    rig.store.queues[QUEUE][0].visible_at = rig.store.clock() + 100  # another consumer holds it
    rig.fetcher.poller.max_interval = 0.0
    assert await rig.fetcher.next_batch(1) == []
    assert not rig.stop.is_set and rig.store.ops("approximate_count")
    rig.store.queues[QUEUE].clear()  # the other consumer finished it
    assert await rig.fetcher.next_batch(1) is None and rig.stop.reason is StopReason.DRAINED


async def test_storage_away_means_waiting_not_ending(make_rig: MakeRig) -> None:
    rig = make_rig(policies(run=RunLimits(exit_when_empty=True)))
    rig.store.fail("receive", StorageUnavailable("connection refused"))
    assert await rig.fetcher.next_batch(1) == []
    assert not rig.stop.is_set


async def test_storage_refusing_a_receive_stops_at_once(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    error = StorageRefused("acct", "receive", 404, "QueueNotFound")
    rig.store.fail("receive", error)
    with pytest.raises(StorageRefused):
        await rig.fetcher.next_batch(1)
    assert rig.stop.aborting and rig.stop.error is error


async def test_the_fetch_loop_keeps_prefetch_jobs_ready(make_rig: MakeRig) -> None:
    rig = make_rig(policies(pipeline=PipelinePolicy(prefetch=2)))
    for index in range(5):
        rig.store.add(QUEUE, {**JOB, "id": f"j{index}"})
    ready: asyncio.Queue[Held | None] = asyncio.Queue()
    loop = asyncio.create_task(rig.fetcher.loop(ready))
    first = await ready.get()
    assert first is not None and first.job.id == "j0"
    assert [call.args["count"] for call in rig.store.ops("receive")] == [2]
    refilled = rig.store.called("receive")
    rig.book.wake.set()  # as the generator does when it takes a job
    await refilled  # room for one: half the prefetch, so it refills
    assert [call.args["count"] for call in rig.store.ops("receive")] == [2, 1]
    rig.stop.set(StopReason.SIGNAL)
    await loop
    assert ready.qsize() == 2 and len(rig.book.held) == 3  # the prefetch, plus the one taken
