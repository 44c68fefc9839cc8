"""Fair polling with per-queue backoff (pure, with a fake clock)."""

from __future__ import annotations

from sidecar.polling import Poller


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_empty_queue_backs_off_doubling_to_the_cap() -> None:
    clock = Clock()
    poller = Poller(["a"], 0.1, 1.0, clock)
    waits = []
    for _ in range(7):
        assert poller.due() == ["a"]
        poller.empty("a")
        waits.append(round(poller.wait(), 3))
        clock.now += poller.wait()
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


def test_messages_reset_the_backoff() -> None:
    clock = Clock()
    poller = Poller(["a"], 0.1, 1.0, clock)
    for _ in range(4):
        poller.empty("a")
        clock.now += poller.wait()
    poller.found("a")
    assert poller.wait() == 0 and poller.due() == ["a"] and not poller.all_empty()


def test_rotation_is_fair_and_empty_shards_are_skipped_until_due() -> None:
    clock = Clock()
    poller = Poller(["a", "b", "c"], 0.1, 1.0, clock)
    assert [poller.due()[0] for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    poller.empty("b")
    assert "b" not in poller.due()
    clock.now += 0.1
    assert "b" in poller.due()
    assert not poller.all_empty()
    for queue in ("a", "b", "c"):
        poller.empty(queue)
    assert poller.all_empty() and poller.due() == []
