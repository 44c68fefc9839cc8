"""Generation over a fake A1111: 5xx tried again, cut-short generations made again, short answers,
A1111 gone, queue-ahead order, the interrupt when cut off."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.a1111 import Generation
from sidecar.errors import A1111AuthRefused, A1111CutShort, A1111Rejected, A1111ServerError, A1111Unavailable
from sidecar.pipeline.book import Held
from sidecar.pipeline.stop import StopReason
from sidecar.policy import GenerationPolicy, TriesPolicy
from tests.fakes import generation
from tests.rig import JOB, MakeRig, policies


async def test_a_generation_is_returned_with_the_jobs_payload_and_deadline(make_rig: MakeRig) -> None:
    rig = make_rig(policies(generation=GenerationPolicy(timeout=12.0)))
    held = await rig.hold({**JOB, "sampler_name": "k_euler_a"})
    rig.settler.failures_in_a_row = 2
    result = await rig.generator.generate(held)
    assert result is not None and len(result.images) == 1
    (call,) = rig.a1111.calls
    assert call["timeout"] == 12.0 and call["payload"]["sampler_name"] == "Euler a"
    assert rig.settler.failures_in_a_row == 0  # a good generation: the node is not sick
    assert rig.book.outcomes == {}  # nothing settled yet


async def test_a_5xx_is_tried_again_up_to_the_attempts(make_rig: MakeRig) -> None:
    rig = make_rig(policies(generation=GenerationPolicy(attempts=3)))
    oom = A1111ServerError(500, "CUDA out of memory")
    rig.a1111.script = [oom, oom, generation()]
    held = await rig.hold()
    assert await rig.generator.generate(held) is not None
    assert len(rig.a1111.calls) == 3

    rig.a1111.script = [oom, oom, oom, generation()]
    held = await rig.hold({**JOB, "id": "again"})
    assert await rig.generator.generate(held) is None
    assert len(rig.a1111.calls) == 6
    assert rig.book.outcomes == {"retried": 1} and rig.settler.failures_in_a_row == 1


async def test_a_cut_short_generation_is_made_again_without_a_failure(make_rig: MakeRig) -> None:
    rig = make_rig(policies(generation=GenerationPolicy(max_remakes=2)))
    cut = A1111CutShort("A1111 was interrupted while this generation may have been running")
    rig.a1111.script = [cut, cut, generation()]
    held = await rig.hold()
    assert await rig.generator.generate(held) is not None
    assert rig.metrics.registry.get_sample_value("sidecar_generations_discarded_total") == 2
    assert rig.book.outcomes == {}

    rig.a1111.script = [cut, cut, cut]
    held = await rig.hold({**JOB, "id": "cut"})
    assert await rig.generator.generate(held) is None  # past the remakes: a transient failure
    assert rig.book.outcomes == {"retried": 1}


async def test_fewer_images_than_asked_is_a_failure(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    rig.a1111.script = [generation(images=1)]
    held = await rig.hold({**JOB, "batch_size": 2})
    assert await rig.generator.generate(held) is None
    assert rig.book.outcomes == {"retried": 1}
    assert "A1111 returned 1 of 2 images" in rig.store.failures[held.lease.message.id]


async def test_a_4xx_poisons(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    rig.a1111.script = [A1111Rejected(422, "bad")]
    assert await rig.generator.generate(await rig.hold()) is None
    assert rig.book.outcomes == {"poisoned": 1} and len(rig.a1111.calls) == 1


async def test_a1111_gone_stops_the_node(make_rig: MakeRig) -> None:
    rig = make_rig(policies(tries=TriesPolicy(max_dequeue_count=5)))
    rig.a1111.script = [A1111Unavailable("A1111 unreachable: ConnectError")]
    assert await rig.generator.generate(await rig.hold()) is None
    assert rig.stop.reason is StopReason.A1111_GONE and rig.book.outcomes == {"released": 1}


async def test_an_unplanned_exception_poisons_the_job(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    rig.a1111.script = [KeyError("sampler_name")]
    assert await rig.generator.generate(await rig.hold()) is None
    assert rig.store.poisoned[0]["error"]["type"] == "KeyError" and not rig.stop.is_set


async def test_cut_off_by_the_deadline_interrupts_a1111(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    rig.a1111.hold()
    task = asyncio.create_task(rig.generator.generate(await rig.hold()))
    await rig.a1111.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rig.a1111.interrupts == 1


async def test_the_loop_queues_the_next_request_behind_the_running_one(make_rig: MakeRig) -> None:
    rig = make_rig(policies(generation=GenerationPolicy(queue_ahead=True)))
    ready: asyncio.Queue[Held | None] = asyncio.Queue()
    for index in range(3):
        ready.put_nowait(await rig.hold({**JOB, "id": f"j{index}"}))
    ready.put_nowait(None)
    done: list[str] = []

    async def dispatch(held: Held, made: Generation) -> None:
        done.append(held.job.id)

    await rig.generator.loop(ready, dispatch)
    assert done == ["j0", "j1", "j2"]  # in order
    afters = [call["after"] for call in rig.a1111.calls]
    assert afters[0] is None and all(after is not None for after in afters[1:])


async def test_without_queue_ahead_one_request_at_a_time(make_rig: MakeRig) -> None:
    rig = make_rig(policies(generation=GenerationPolicy(queue_ahead=False)))
    ready: asyncio.Queue[Held | None] = asyncio.Queue()
    for index in range(2):
        ready.put_nowait(await rig.hold({**JOB, "id": f"j{index}"}))
    ready.put_nowait(None)

    async def dispatch(held: Held, made: Generation) -> None:
        pass

    await rig.generator.loop(ready, dispatch)
    assert [call["after"] for call in rig.a1111.calls] == [None, None]


async def test_the_loop_gives_back_what_it_takes_after_a_stop(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    ready: asyncio.Queue[Held | None] = asyncio.Queue()
    ready.put_nowait(await rig.hold())
    ready.put_nowait(None)
    rig.stop.set(StopReason.SIGNAL)

    async def dispatch(held: Held, made: Generation) -> None:
        raise AssertionError("nothing is generated after a stop")

    await rig.generator.loop(ready, dispatch)
    assert rig.a1111.calls == [] and rig.book.outcomes == {"released": 1}


async def test_a_remake_no_longer_waits_behind_the_request_it_was_queued_behind(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    ahead: asyncio.Task[Generation | None] = asyncio.create_task(rig.generator.generate(await rig.hold()))
    await ahead
    rig.a1111.calls.clear()
    rig.a1111.script = [A1111CutShort("interrupted while queued"), generation()]
    assert await rig.generator.generate(await rig.hold({**JOB, "id": "behind"}), ahead) is not None
    assert [call["after"] for call in rig.a1111.calls] == [ahead, None]


async def test_a_fatal_error_from_a1111_stops_at_once_and_fails_no_job(make_rig: MakeRig) -> None:
    rig = make_rig(policies())
    error = A1111AuthRefused("A1111 refused the credentials in SIDECAR_A1111_API_AUTH (401)")
    rig.a1111.script = [error]
    held = await rig.hold()
    with pytest.raises(A1111AuthRefused):
        await rig.generator.generate(held)
    assert (rig.stop.reason, rig.stop.error, rig.stop.aborting) == (StopReason.FATAL, error, True)
    assert rig.book.outcomes == {} and held.lease in rig.book.held  # released on the way out
