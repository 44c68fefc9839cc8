"""Fair polling of one or more queues, backing off on empty ones.

Like the Azure Functions queue trigger, a queue found empty is polled less and less often (the
interval doubles from SIDECAR_POLL_INTERVAL_MIN up to SIDECAR_POLL_INTERVAL_MAX); one that had
messages is polled again at once. The starting queue rotates so that no shard starves another.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sidecar.policy import PollingPolicy


class Poller:
    def __init__(
        self,
        queues: list[str],
        min_interval: float,
        max_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queues = list(queues)
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.clock = clock
        self._interval = dict.fromkeys(self.queues, 0.0)
        self._next = dict.fromkeys(self.queues, 0.0)
        self._empty = dict.fromkeys(self.queues, False)
        self._start = 0

    @classmethod
    def from_policy(cls, policy: PollingPolicy, clock: Callable[[], float] = time.monotonic) -> Poller:
        return cls(list(policy.queues), policy.min_interval, policy.max_interval, clock)

    def due(self) -> list[str]:
        """Queues to poll now, starting one further along each time."""
        now = self.clock()
        order = self.queues[self._start :] + self.queues[: self._start]
        self._start = (self._start + 1) % len(self.queues)
        return [queue for queue in order if self._next[queue] <= now]

    def found(self, queue: str) -> None:
        self._interval[queue] = 0.0
        self._next[queue] = self.clock()
        self._empty[queue] = False

    def empty(self, queue: str) -> None:
        interval = min(self.max_interval, max(self.min_interval, self._interval[queue] * 2))
        self._interval[queue] = interval
        self._next[queue] = self.clock() + interval
        self._empty[queue] = True

    def all_empty(self) -> bool:
        """Was every queue empty when last polled?"""
        return all(self._empty.values())

    def wait(self) -> float:
        """Seconds until some queue is due again."""
        return max(0.0, min(self._next.values()) - self.clock())
