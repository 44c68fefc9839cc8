"""The lease over the in-memory store and a fake clock: renewal at half-life, a lost lease, release,
a refused renewal, a settle waiting for a renewal in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sidecar.errors import LeaseLost, StorageRefused, StorageUnavailable
from sidecar.lease import Lease
from sidecar.policy import LeasePolicy
from sidecar.storage import Message
from tests.fakes import FakeClock, FakeStore
from tests.rig import QUEUE

VISIBILITY = 60


async def yield_to_tasks() -> None:
    """Let every task that can run, run (no time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> FakeStore:
    return FakeStore(clock)


@pytest.fixture
async def message(store: FakeStore) -> Message:
    store.add(QUEUE, {"prompt": "p"})
    (received,) = await store.receive(QUEUE, 1, VISIBILITY)
    return received


@pytest.fixture
async def lease(store: FakeStore, message: Message, clock: FakeClock) -> AsyncIterator[Lease]:
    held = Lease(store, message, VISIBILITY, clock=clock, sleep=clock.sleep)
    yield held
    held.abandon()


async def test_renewed_at_half_life_not_before(lease: Lease, store: FakeStore, clock: FakeClock) -> None:
    started = clock()
    wakes_at = await clock.sleeping()
    assert wakes_at == started + VISIBILITY / 2
    clock.advance(VISIBILITY / 2 - 1)
    await yield_to_tasks()
    assert store.ops("set_visibility") == []  # not yet
    renewed = store.called("set_visibility")
    clock.advance(1)
    call = await renewed
    timeout = LeasePolicy(VISIBILITY).request_timeout
    assert call.args["seconds"] == VISIBILITY
    assert call.args["timeout"] == timeout
    # retried only while a try can still land before the message becomes visible
    assert call.args["budget"] == pytest.approx(VISIBILITY / 2 - timeout)
    assert await clock.sleeping() == pytest.approx(clock() + VISIBILITY / 2)
    assert lease.expires_at == pytest.approx(clock() + VISIBILITY)
    assert not lease.lost


async def test_a_renewal_keeps_the_newest_pop_receipt(
    lease: Lease, store: FakeStore, clock: FakeClock, message: Message
) -> None:
    before = message.pop_receipt
    await clock.sleeping()
    renewed = store.called("set_visibility")
    clock.advance(VISIBILITY / 2)
    await renewed
    await clock.sleeping()  # the renewal is over
    assert message.pop_receipt != before
    assert await lease.complete() is True
    assert store.queues[QUEUE] == []


async def test_a_lease_another_consumer_took_is_lost_and_never_deleted(
    lease: Lease, store: FakeStore, clock: FakeClock
) -> None:
    store.fail("set_visibility", LeaseLost("pop receipt mismatch"))
    await clock.sleeping()
    renewed = store.called("set_visibility")
    clock.advance(VISIBILITY / 2)
    await renewed
    await lease._task
    assert lease.lost
    assert await lease.complete() is False
    assert store.ops("delete") == [] and len(store.queues[QUEUE]) == 1


async def test_a_renewal_that_cannot_land_ends_the_lease(
    lease: Lease, store: FakeStore, clock: FakeClock
) -> None:
    store.fail("set_visibility", StorageUnavailable("timed out"))
    await clock.sleeping()
    clock.advance(VISIBILITY / 2)
    await lease._task
    assert lease.lost and await lease.release(0) is False


async def test_a_refused_renewal_tells_the_worker(
    store: FakeStore, message: Message, clock: FakeClock
) -> None:
    told: list[StorageRefused] = []
    lease = Lease(store, message, VISIBILITY, told.append, clock=clock, sleep=clock.sleep)
    error = StorageRefused("acct", "update message", 403, "AuthenticationFailed")
    store.fail("set_visibility", error)
    await clock.sleeping()
    clock.advance(VISIBILITY / 2)
    await lease._task
    assert lease.lost and told == [error]


async def test_release_makes_the_message_visible_after_the_delay(
    lease: Lease, store: FakeStore, clock: FakeClock
) -> None:
    assert await lease.release(10) is True
    assert lease.ended
    assert [call.args["seconds"] for call in store.ops("set_visibility")] == [10]
    assert store.visible(QUEUE) == []
    clock.advance(10)
    assert len(store.visible(QUEUE)) == 1
    clock.advance(VISIBILITY)
    await yield_to_tasks()
    assert len(store.ops("set_visibility")) == 1  # no renewal after the release
    assert await lease.release(0) is False  # settled once only


async def test_a_settle_waits_for_the_renewal_in_flight_and_uses_its_receipt(
    lease: Lease, store: FakeStore, clock: FakeClock, message: Message
) -> None:
    await clock.sleeping()
    store.hold("set_visibility")
    renewing = store.called("set_visibility")
    clock.advance(VISIBILITY / 2)
    await renewing
    deleting = asyncio.create_task(lease.complete())
    await yield_to_tasks()
    assert store.ops("delete") == []  # waits for the renewal
    store.release("set_visibility")
    assert await deleting is True  # the receipt the renewal brought back is the one that deletes
    assert store.queues[QUEUE] == []


async def test_abandon_stops_renewing_and_leaves_the_message(
    lease: Lease, store: FakeStore, clock: FakeClock
) -> None:
    await clock.sleeping()
    lease.abandon()
    clock.advance(VISIBILITY)
    await yield_to_tasks()
    assert lease.ended and store.ops("set_visibility") == []
    assert len(store.visible(QUEUE)) == 1  # back when its visibility ran out
