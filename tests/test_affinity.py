"""Model and LoRA affinity over the fakes: the order ``Window`` hands held jobs out in, the bound on how
long a job is passed over (a fake clock), the poller's preference for the shard of the loaded model,
and the worker's pipeline generating a mixed queue in that order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.pipeline.affinity import Affinity, Window, affinity_of
from sidecar.pipeline.book import Held
from sidecar.policy import PipelinePolicy
from sidecar.polling import Poller
from tests.fakes import FakeClock
from tests.rig import JOB, Rig, policies


def job(checkpoint: str | None = None, lora: str | None = None, n: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {**JOB, "id": f"job-{n}"}
    if lora:
        body["prompt"] = f"{JOB['prompt']} <lora:{lora}>"
    if checkpoint:
        body["override_settings"] = {"sd_model_checkpoint": checkpoint}
    return body


async def held_jobs(rig: Rig, specs: list[tuple[str | None, str | None]]) -> list[Held]:
    return [await rig.hold(job(ckpt, lora, n)) for n, (ckpt, lora) in enumerate(specs)]


def checkpoints(taken: list[Held]) -> list[str | None]:
    return [affinity_of(h.job).checkpoint for h in taken]


def switches(names: list[str | None]) -> int:
    """Checkpoint changes between consecutive generations, from A1111's default (None)."""
    return sum(a != b for a, b in zip([None, *names], names, strict=False))


def test_the_affinity_of_a_job_is_its_checkpoint_without_hash_and_its_lora_tags() -> None:
    async def main() -> None:
        rig = Rig(policies())
        plain = await rig.hold(job())
        mixed = await rig.hold(job("sdxl.safetensors [31e35c80fc]", "add_detail:0.6", 1))
        assert affinity_of(plain.job) == Affinity(None, ())
        assert affinity_of(mixed.job) == Affinity("sdxl.safetensors", ("add_detail:0.6",))
        rig.close()

    asyncio.run(main())


def test_jobs_keeping_the_loaded_checkpoint_go_first_and_switches_drop() -> None:
    """A queue alternating two checkpoints: in fetch order (bound 0) every job switches; with
    affinity, each checkpoint's jobs run together."""

    async def main() -> None:
        rig = Rig(policies())
        specs: list[tuple[str | None, str | None]] = [("a", None), ("b", None)] * 4
        orders = {}
        for bound in (0.0, 30.0):
            window = Window(bound, FakeClock())
            for held in await held_jobs(rig, specs):
                window.put_nowait(held)
            taken = [window.get_nowait() for _ in specs]
            assert all(h is not None for h in taken)
            orders[bound] = checkpoints([h for h in taken if h is not None])
            assert window.switches == switches(orders[bound])
        assert orders[0.0] == ["a", "b"] * 4
        assert orders[30.0] == ["a"] * 4 + ["b"] * 4
        assert switches(orders[30.0]) == 2 < switches(orders[0.0]) == 8
        rig.close()

    asyncio.run(main())


def test_within_a_checkpoint_the_same_lora_set_goes_first() -> None:
    async def main() -> None:
        rig = Rig(policies())
        specs: list[tuple[str | None, str | None]] = [
            (None, "add_detail:0.6"),
            (None, "film_grain:0.5"),
            (None, "add_detail:0.6"),
            ("b", None),
            (None, "film_grain:0.5"),
        ]
        window = Window(30.0, FakeClock())
        for held in await held_jobs(rig, specs):
            window.put_nowait(held)
        taken = [window.get_nowait() for _ in specs]
        ids = [h.job.id for h in taken if h is not None]
        assert ids == ["job-0", "job-2", "job-1", "job-4", "job-3"]
        rig.close()

    asyncio.run(main())


def test_no_job_is_passed_over_beyond_the_bound() -> None:
    """A "b" job among a stream of "a" jobs that never runs dry: it is taken before it has been passed
    over for the bound (generations of 1 s, a switch 3 s, on a fake clock), then "a" goes on."""

    async def main() -> None:
        rig = Rig(policies())
        clock = FakeClock()
        bound = 10.0
        window = Window(bound, clock)
        window.put_nowait(await rig.hold(job("a", None, 0)))
        waiting = await rig.hold(job("b", None, 1))
        window.put_nowait(waiting)
        taken: list[Held] = []
        for n in range(2, 40):
            window.put_nowait(await rig.hold(job("a", None, n)))
            held = window.get_nowait()
            assert held is not None
            taken.append(held)
            # what the generator sees: one generation per take, a checkpoint load after a switch
            clock.advance(
                4.0 if len(taken) > 1 and checkpoints(taken[-2:])[0] != checkpoints(taken[-2:])[1] else 1.0
            )
        names = checkpoints(taken)
        assert "b" in names
        assert 0 < waiting.passed_over_s <= bound
        assert max(h.passed_over_s for h in taken) <= bound
        assert window.passed_over_max <= bound
        assert names.count("b") == 1 and switches(names) == 3  # a -> b -> a
        rig.close()

    asyncio.run(main())


def test_a_bound_of_zero_hands_jobs_out_in_fetch_order_and_none_comes_last() -> None:
    async def main() -> None:
        rig = Rig(policies())
        window = Window(0.0, FakeClock())
        specs: list[tuple[str | None, str | None]] = [("a", None), (None, None), ("a", None)]
        for held in await held_jobs(rig, specs):
            window.put_nowait(held)
        window.put_nowait(None)
        assert [h.job.id if h else None for h in [window.get_nowait() for _ in range(4)]] == [
            "job-0",
            "job-1",
            "job-2",
            None,
        ]
        affine = Window(30.0, FakeClock())
        for held in await held_jobs(rig, specs):
            affine.put_nowait(held)
        affine.put_nowait(None)
        out = [affine.get_nowait() for _ in range(4)]
        assert out[-1] is None and all(h is not None for h in out[:3])
        rig.close()

    asyncio.run(main())


def test_the_poller_prefers_the_shard_of_the_loaded_checkpoint_within_the_bound() -> None:
    clock = FakeClock()
    poller = Poller(["jobs-a", "jobs-b", "jobs-c"], 0.1, 10.0, clock, prefer_for=30.0)
    fair = [poller.due()[0] for _ in range(3)]
    assert fair == ["jobs-a", "jobs-b", "jobs-c"]  # nothing learnt yet: the rotation
    poller.carried("jobs-b", ["b.safetensors"])
    poller.prefer("b.safetensors")
    assert poller.preferred is None  # jobs-c not seen yet: it may carry b too
    poller.carried("jobs-a", ["a.safetensors"])
    poller.carried("jobs-c", ["c.safetensors"])
    poller.prefer("b.safetensors")
    assert [poller.due()[0] for _ in range(3)] == ["jobs-b"] * 3
    poller.empty("jobs-b")  # ran dry: backed off, the others are polled
    assert "jobs-b" not in poller.due()
    clock.advance(1.0)
    poller.found("jobs-b")
    clock.advance(30.0)  # preferred for the whole bound: back to the rotation
    assert sorted(poller.due()[0] for _ in range(3)) == ["jobs-a", "jobs-b", "jobs-c"]
    poller.carried("jobs-c", ["c.safetensors"])
    poller.prefer("c.safetensors")  # a new preference starts its own bound
    assert poller.due()[0] == "jobs-c"


def test_shards_filled_round_robin_get_no_preference() -> None:
    poller = Poller(["jobs-a", "jobs-b"], 0.1, 10.0, FakeClock(), prefer_for=30.0)
    poller.carried("jobs-a", [None, "x"])
    poller.carried("jobs-b", [None])
    poller.prefer(None)
    assert poller.preferred is None
    assert [poller.due()[0] for _ in range(4)] == ["jobs-a", "jobs-b"] * 2


def test_a_single_queue_learns_no_shards() -> None:
    poller = Poller(["jobs"], 0.1, 10.0, FakeClock(), prefer_for=30.0)
    poller.carried("jobs", ["a"])
    poller.prefer("a")
    assert poller.preferred is None


@pytest.mark.parametrize("bound", [0.0, 30.0])
def test_the_pipeline_generates_a_prefetched_mixed_queue_by_affinity(bound: float) -> None:
    """The fetcher fills the window, the generator takes from it: what A1111 is sent, in order."""

    async def main() -> list[str | None]:
        rig = Rig(policies(pipeline=PipelinePolicy(prefetch=8, affinity_max_wait=bound)))
        for n, ckpt in enumerate(["a", "b"] * 4):
            rig.store.add("jobs", job(ckpt, None, n))
        window = Window(bound)
        batch = await rig.fetcher.next_batch(8)
        assert batch is not None and len(batch) == 8
        for held in batch:
            window.put_nowait(held)
        window.put_nowait(None)
        sent: list[Held] = []

        async def dispatch(held: Held, generation: object) -> None:
            sent.append(held)

        await rig.generator.loop(window, dispatch)
        names = [
            call["payload"].get("override_settings", {}).get("sd_model_checkpoint")
            for call in rig.a1111.calls
        ]
        assert names == checkpoints(sent)
        rig.close()
        return names

    names = asyncio.run(main())
    assert switches(names) == (8 if bound == 0 else 2)


def test_a_job_passed_over_keeps_its_lease_renewed_while_it_waits() -> None:
    """Steps: three held jobs (a, b, a) under 60 s leases on a fake clock; both "a" jobs are taken, the
    "b" job waits in the window (bound 120 s) through 95 s of "a" generations: its message is renewed
    at every half-life (30, 60, 90 s), its lease still holds, and it is taken next, passed over 95 s."""
    from sidecar.jobs import parse_job
    from sidecar.lease import Lease
    from tests.fakes import FakeStore

    async def main() -> None:
        clock = FakeClock()
        store = FakeStore(clock)
        window = Window(120.0, clock)
        leases = []
        for n, ckpt in enumerate(["a", "b", "a"]):
            store.add("jobs", job(ckpt, None, n))
            (message,) = await store.receive("jobs", 1, 60)
            lease = Lease(store, message, 60, clock=clock, sleep=clock.sleep)
            leases.append(lease)
            window.put_nowait(Held(lease, parse_job(message.content, message.id)))
        taken = [window.get_nowait(), window.get_nowait()]  # the "a" jobs: "b" is passed over
        assert [h.job.id for h in taken if h is not None] == ["job-0", "job-2"]
        waiting = leases[1]
        for _ in range(19):  # 95 s of generations of 5 s, each followed by another "a" job
            clock.advance(5.0)
            for _ in range(5):
                await asyncio.sleep(0)
        renewed = [c for c in store.ops("set_visibility") if c.args.get("id") == waiting.message.id]
        assert len(renewed) == 3
        assert not waiting.ended
        last = window.get_nowait()
        assert last is not None and last.job.id == "job-1" and last.passed_over_s == 95.0
        for lease in leases:
            lease.abandon()

    asyncio.run(main())


def test_leaving_a_checkpoint_takes_its_jobs_passed_over_for_another_lora_set_first() -> None:
    """Steps: "a" jobs with LoRA x keep coming; an "a" job with LoRA y and a "b" job wait (bound 10 s,
    1 s a generation, 4 s after a switch). When "b" falls due, the "a"/y job is taken first (leaving
    it behind would start its clock anew on the other side of two switches), then "b"; no job is
    passed over past the bound."""

    async def main() -> None:
        rig = Rig(policies())
        clock = FakeClock()
        bound = 10.0
        window = Window(bound, clock)
        for n, (ckpt, lora) in enumerate([("a", "x:1"), ("a", "y:1"), ("b", None)]):
            window.put_nowait(await rig.hold(job(ckpt, lora, n)))
        taken: list[Held] = []
        for n in range(3, 30):
            window.put_nowait(await rig.hold(job("a", "x:1", n)))
            held = window.get_nowait()
            assert held is not None
            switched = (
                bool(taken) and affinity_of(taken[-1].job).checkpoint != affinity_of(held.job).checkpoint
            )
            taken.append(held)
            clock.advance(4.0 if switched else 1.0)
        ids = [h.job.id for h in taken]
        assert ids.index("job-1") == ids.index("job-2") - 1  # a/y, then b
        assert max(h.passed_over_s for h in taken) <= bound
        rig.close()

    asyncio.run(main())
