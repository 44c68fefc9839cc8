"""Settling over the in-memory store: the retry policy (release with a delay, poison at the limit or
at once), A1111 gone, too many failures in a row, --max-jobs, storage away or refusing, results."""

from __future__ import annotations

import json

import pytest

from sidecar.errors import (
    A1111Rejected,
    A1111ServerError,
    A1111Unavailable,
    AssetMissing,
    InvalidJob,
    StorageRefused,
    StorageUnavailable,
)
from sidecar.pipeline.stop import StopReason
from sidecar.policy import RunLimits, TriesPolicy
from tests.rig import JOB, QUEUE, MakeRig, policies


async def test_a_transient_failure_is_released_with_the_delay_and_noted(make_rig: MakeRig) -> None:
    rig = make_rig(policies(tries=TriesPolicy(max_dequeue_count=3, release_delay=7)))
    held = await rig.hold()
    await rig.settler.fail(held, A1111ServerError(500, "CUDA out of memory"))
    assert rig.book.outcomes == {"retried": 1} and rig.outcome("retried") == 1
    assert rig.store.ops("set_visibility")[-1].args["seconds"] == 7
    assert (
        rig.store.failures[held.lease.message.id]
        == "try 1: A1111ServerError: A1111 answered 500: CUDA out of memory"
    )
    assert held.lease not in rig.book.held and rig.book.wake.is_set()
    assert not rig.stop.is_set


async def test_a_transient_failure_on_the_last_try_is_poisoned(make_rig: MakeRig) -> None:
    rig = make_rig(policies(tries=TriesPolicy(max_dequeue_count=3)))
    held = await rig.hold(dequeue_count=2)  # received now for the 3rd time
    rig.store.failures[held.lease.message.id] = "try 2: earlier"
    await rig.settler.fail(held, A1111ServerError(500, "boom"))
    assert rig.book.outcomes == {"poisoned": 1}
    (entry,) = rig.store.poisoned
    assert entry["error"]["type"] == "A1111ServerError" and entry["job_id"] == held.job.id
    assert held.lease.message.id not in rig.store.failures  # the note goes with it


async def test_a_permanent_failure_is_poisoned_at_once(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    held = await rig.hold()
    await rig.settler.fail(held, A1111Rejected(422, "Sampler not found"))
    assert rig.book.outcomes == {"poisoned": 1}
    assert rig.store.poisoned[0]["error"] == {
        "type": "A1111Rejected",
        "detail": "A1111 rejected the job (422): Sampler not found",
    }
    assert rig.settler.failures_in_a_row == 0  # the node is not sick for it


async def test_a1111_gone_stops_the_node_and_gives_the_job_back_counting_a_try(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    held = await rig.hold()
    error = A1111Unavailable("A1111 unreachable: ConnectError")
    await rig.settler.fail(held, error)
    assert (rig.stop.reason, rig.stop.error, rig.stop.aborting) == (StopReason.A1111_GONE, error, False)
    assert rig.book.outcomes == {"released": 1}
    assert rig.store.ops("set_visibility")[-1].args["seconds"] == 0
    assert rig.store.failures[held.lease.message.id].endswith(
        "A1111Unavailable: A1111 unreachable: ConnectError"
    )


async def test_a1111_gone_on_the_last_try_poisons_naming_it(make_rig: MakeRig) -> None:
    rig = make_rig(policies(tries=TriesPolicy(max_dequeue_count=2)))
    held = await rig.hold(dequeue_count=1)
    await rig.settler.fail(held, A1111Unavailable("A1111 exited with code -9"))
    (entry,) = rig.store.poisoned
    assert entry["error"] == {
        "type": "A1111Unavailable",
        "detail": "A1111 went away during this job on try 2 of 2: A1111 exited with code -9",
    }
    assert rig.stop.reason is StopReason.A1111_GONE


async def test_too_many_transient_failures_in_a_row_stop_the_node(make_rig: MakeRig) -> None:
    rig = make_rig(policies(tries=TriesPolicy(max_failures_in_a_row=3)))
    for index in range(2):
        await rig.settler.fail(await rig.hold({**JOB, "id": f"j{index}"}), StorageUnavailable("503"))
    assert not rig.stop.is_set
    rig.settler.generated()  # one good generation: not in a row any more
    for index in range(2, 4):
        await rig.settler.fail(await rig.hold({**JOB, "id": f"j{index}"}), StorageUnavailable("503"))
    assert not rig.stop.is_set
    await rig.settler.fail(await rig.hold({**JOB, "id": "j4"}), StorageUnavailable("503 ServerBusy"))
    assert rig.stop.reason is StopReason.TOO_MANY_FAILURES and rig.stop.exit_code == 1
    assert str(rig.stop.error) == "3 failures in a row, last: 503 ServerBusy"


async def test_max_jobs_stops_after_that_many_finished(make_rig: MakeRig) -> None:
    rig = make_rig(policies(run=RunLimits(max_jobs=2)))
    await rig.settler.complete(await rig.hold({**JOB, "id": "a"}), ["a/0.png"], [1], {})
    await rig.settler.give_back(await rig.hold({**JOB, "id": "b"}))  # released: not finished
    assert not rig.stop.is_set
    await rig.settler.fail(await rig.hold({**JOB, "id": "c"}), InvalidJob("steps", "too many"))
    assert rig.stop.reason is StopReason.MAX_JOBS and rig.stop.exit_code == 0


async def test_storage_away_beyond_the_budget_abandons_the_message(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    held = await rig.hold()
    rig.store.fail("delete", StorageUnavailable("connection reset"))
    assert await rig.settler.outcome("succeeded", held.lease, held.lease.complete()) == "abandoned"
    assert held.lease.ended and held.lease not in rig.book.held
    assert len(rig.store.queues[QUEUE]) == 1  # it comes back when its lease runs out


async def test_storage_refusing_a_settle_stops_at_once_and_keeps_it_held(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    held = await rig.hold()
    error = StorageRefused("acct", "delete message", 403, "AuthenticationFailed")
    rig.store.fail("delete", error)
    with pytest.raises(StorageRefused):
        await rig.settler.complete(held, ["x/0.png"], [], {})
    assert rig.stop.aborting and rig.stop.error is error
    assert held.lease in rig.book.held  # released on the way out
    assert rig.book.outcomes == {}


async def test_a_message_no_longer_ours_is_lost_not_succeeded(make_rig: MakeRig) -> None:
    rig = make_rig(policies(result_queue="results"))
    held = await rig.hold()
    held.lease.message.pop_receipt = "stale"  # another consumer took it
    await rig.settler.complete(held, [f"{held.job.id}/0.png"], [1], {})
    assert rig.book.outcomes == {"lost": 1}
    assert rig.store.sent["results"] == []  # never reported succeeded
    assert rig.metrics.registry.get_sample_value("sidecar_images_total") == 0


async def test_a_job_done_is_reported(make_rig: MakeRig) -> None:
    rig = make_rig(policies(result_queue="results"))
    held = await rig.hold()
    await rig.settler.complete(held, [f"{held.job.id}/0.png"], [42], {"total_s": 1.0})
    assert rig.book.outcomes == {"succeeded": 1} and rig.store.queues[QUEUE] == []
    (text,) = rig.store.sent["results"]
    assert json.loads(text) == {
        "job_id": held.job.id,
        "status": "succeeded",
        "blobs": [f"{held.job.id}/0.png", f"{held.job.id}/job.json"],
        "seeds": [42],
        "timings": {"total_s": 1.0},
    }


async def test_a_result_that_cannot_be_sent_is_only_a_warning(make_rig: MakeRig) -> None:
    rig = make_rig(policies(result_queue="results"))
    rig.store.fail("send", StorageUnavailable("503"))
    held = await rig.hold()
    await rig.settler.complete(held, ["x/0.png"], [], {})
    assert rig.book.outcomes == {"succeeded": 1} and not rig.stop.is_set


async def test_deferred_is_released_with_the_delay_and_not_a_failure(make_rig: MakeRig) -> None:
    rig = make_rig(policies(tries=TriesPolicy(release_delay=9)))
    held = await rig.hold()
    await rig.settler.defer(held.lease, held.job, AssetMissing("LoRA 'x' is not on this node"))
    assert rig.book.outcomes == {"deferred": 1} and rig.settler.failures_in_a_row == 0
    assert rig.store.ops("set_visibility")[-1].args["seconds"] == 9
