"""The worker's lifecycle over the fakes: each way a run ends, with the exit code its reason gives,
and what is held given back."""

from __future__ import annotations

import asyncio

from sidecar.errors import A1111AuthRefused, A1111ServerError, CredentialExpired, StorageRefused
from sidecar.observability import Metrics
from sidecar.pipeline.stop import StopReason
from sidecar.policy import PipelinePolicy, Policies, RunLimits
from sidecar.worker import Worker
from tests.fakes import FakeA1111, FakeCatalog, FakeStore
from tests.rig import JOB, QUEUE, policies


def make_worker(chosen: Policies) -> tuple[Worker, FakeStore, FakeA1111]:
    store, a1111 = FakeStore(), FakeA1111()
    return Worker(chosen, store, a1111, Metrics(), catalog=FakeCatalog()), store, a1111


def add_jobs(store: FakeStore, count: int, prefix: str = "j") -> None:
    for index in range(count):
        store.add(QUEUE, {**JOB, "id": f"{prefix}{index}"})


def stored_jobs(store: FakeStore) -> list[str]:
    return sorted(name.split("/")[0] for name in store.blobs if name.endswith("job.json"))


async def test_drained_exits_0_with_every_job_stored() -> None:
    worker, store, _ = make_worker(policies(run=RunLimits(exit_when_empty=True)))
    add_jobs(store, 4)
    assert await worker.run() == 0
    assert worker.stop.reason is StopReason.DRAINED
    assert stored_jobs(store) == ["j0", "j1", "j2", "j3"] and store.queues[QUEUE] == []
    assert worker.outcomes == {"succeeded": 4}
    assert store.ops("approximate_count")  # the drain's last word counts what is left


async def test_the_sequential_loop_drains_too() -> None:
    worker, store, a1111 = make_worker(
        policies(pipeline=PipelinePolicy(prefetch=0), run=RunLimits(exit_when_empty=True))
    )
    add_jobs(store, 3)
    assert await worker.run() == 0
    assert stored_jobs(store) == ["j0", "j1", "j2"]
    assert all(call["after"] is None for call in a1111.calls)


async def test_max_jobs_exits_0_and_leaves_the_rest() -> None:
    worker, store, _ = make_worker(policies(run=RunLimits(max_jobs=2)))
    add_jobs(store, 5)
    assert await worker.run() == 0
    assert worker.stop.reason is StopReason.MAX_JOBS and worker.outcomes["succeeded"] == 2
    assert len(store.visible(QUEUE)) == 3  # nothing more held: the rest is visible at once


async def test_storage_refusing_exits_1_and_gives_back_what_is_held() -> None:
    worker, store, _ = make_worker(policies(pipeline=PipelinePolicy(prefetch=2)))
    add_jobs(store, 4)
    error = StorageRefused("acct", "delete message", 403, "AuthenticationFailed")
    store.fail("delete", error)
    assert await worker.run() == 1
    assert (worker.stop.reason, worker.stop.error) == (StopReason.STORAGE_REFUSED, error)
    assert worker.outcomes["succeeded"] == 0
    assert len(store.visible(QUEUE)) == 4  # every message back, none deleted


async def test_a_signal_finishes_the_generation_gives_back_the_rest_and_exits_0() -> None:
    worker, store, a1111 = make_worker(policies(pipeline=PipelinePolicy(prefetch=2, shutdown_grace=30)))
    add_jobs(store, 4)
    a1111.hold()
    running = asyncio.create_task(worker.run())
    await a1111.entered.wait()
    worker.request_stop()
    assert store.deadline is not None  # every storage call from now on ends within the grace
    a1111.go()
    assert await running == 0
    assert worker.stop.reason is StopReason.SIGNAL
    assert "j0" in stored_jobs(store) and worker.outcomes["released"] >= 1
    assert len(store.visible(QUEUE)) == 4 - len(stored_jobs(store))


async def test_the_grace_period_running_out_interrupts_and_gives_back() -> None:
    worker, store, a1111 = make_worker(policies(pipeline=PipelinePolicy(prefetch=1, shutdown_grace=0.0)))
    add_jobs(store, 2)
    a1111.hold()  # the generation never ends by itself
    running = asyncio.create_task(worker.run())
    await a1111.entered.wait()
    worker.request_stop()
    assert await running == 0
    assert a1111.interrupts >= 1 and store.blobs == {}
    assert len(store.visible(QUEUE)) == 2


async def test_a1111_exiting_drains_and_exits_1() -> None:
    worker, store, a1111 = make_worker(policies())
    add_jobs(store, 3)
    a1111.hold()
    running = asyncio.create_task(worker.run())
    await a1111.entered.wait()
    worker.a1111_exited(-9)
    assert worker.stop.is_set and not worker.stop.aborting
    a1111.go()  # the generation under way still finishes
    assert await running == 1
    assert str(worker.stop.error) == "A1111 exited with code -9"
    assert "j0" in stored_jobs(store)


async def test_the_credential_expiring_stops_at_once_with_1() -> None:
    worker, store, a1111 = make_worker(policies())
    add_jobs(store, 2)
    a1111.hold()
    running = asyncio.create_task(worker.run())
    await a1111.entered.wait()
    worker.credential_expired(CredentialExpired("the SAS expires in 6s"))
    assert await running == 1
    assert worker.stop.reason is StopReason.CREDENTIAL_EXPIRED
    assert store.blobs == {} and len(store.visible(QUEUE)) == 2


async def test_failures_in_a_row_stop_a_sick_node_with_1() -> None:
    worker, store, a1111 = make_worker(policies())
    add_jobs(store, 8)
    a1111.script = [A1111ServerError(500, "CUDA out of memory")] * 30
    assert await worker.run() == 1
    assert worker.stop.reason is StopReason.TOO_MANY_FAILURES
    assert str(worker.stop.error) == "5 failures in a row, last: A1111 answered 500: CUDA out of memory"
    # the 5th stops fetching; the one queued behind it at A1111 may still fail on the way out
    assert worker.outcomes["retried"] in (5, 6) and store.blobs == {}
    assert len(store.queues[QUEUE]) == 8  # released, none lost


async def test_a1111_refusing_the_credentials_mid_run_exits_1_and_loses_no_job() -> None:
    worker, store, a1111 = make_worker(policies(pipeline=PipelinePolicy(prefetch=2)))
    add_jobs(store, 3)
    a1111.script = [A1111AuthRefused("A1111 refused the credentials in SIDECAR_A1111_API_AUTH (401)")]
    assert await worker.run() == 1
    assert worker.stop.reason is StopReason.FATAL
    assert store.poisoned == [] and store.blobs == {}
    assert len(store.visible(QUEUE)) == 3  # all given back at once


async def test_a_generator_that_dies_of_a_bug_stops_the_fetching_too() -> None:
    """Not a FatalError (those abort): an exception nobody planned for kills the generation loop
    itself. The fetch loop must not go on holding jobs for nobody: exit 1, the job given back."""
    worker, store, _ = make_worker(policies(pipeline=PipelinePolicy(prefetch=1)))
    add_jobs(store, 1)

    async def broken(*args: object) -> None:
        raise RuntimeError("a bug in the hand-over to the finisher")

    worker.finisher.start = broken  # type: ignore[method-assign,assignment]
    assert await asyncio.wait_for(worker.run(), 30) == 1
    assert worker.stop.reason is StopReason.UNEXPECTED
    assert store.poisoned == [] and len(store.visible(QUEUE)) == 1
