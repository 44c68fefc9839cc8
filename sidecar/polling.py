"""Fair polling of one or more queues, backing off on empty ones.

Like the Azure Functions queue trigger, a queue found empty is polled less and less often (the
interval doubles from SIDECAR_POLL_INTERVAL_MIN up to SIDECAR_POLL_INTERVAL_MAX); one that had
messages is polled again at once. The starting queue rotates so that no shard starves another.

Shards per model (one queue per checkpoint family, ``enqueue --route-by-checkpoint``): the poller
learns which shard carries which checkpoint (``carried``) and, told the checkpoint A1111 has loaded
(``prefer``), polls that shard first, for at most ``prefer_for`` seconds in a row
(SIDECAR_AFFINITY_MAX_WAIT) before going back to the fair rotation; once the shard is found empty it
backs off like any other and the others are polled as before.
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
        prefer_for: float = 0.0,
    ) -> None:
        self.queues = list(queues)
        self.prefer_for = prefer_for
        self.preferred: str | None = None
        self._preferred_since = 0.0
        self._carries: dict[str, set[str | None]] = {}  # shard -> the checkpoints its jobs named
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.clock = clock
        self._interval = dict.fromkeys(self.queues, 0.0)
        self._next = dict.fromkeys(self.queues, 0.0)
        self._empty = dict.fromkeys(self.queues, False)
        self._start = 0

    @classmethod
    def from_policy(
        cls, policy: PollingPolicy, clock: Callable[[], float] = time.monotonic, *, prefer_for: float = 0.0
    ) -> Poller:
        return cls(list(policy.queues), policy.min_interval, policy.max_interval, clock, prefer_for)

    def due(self) -> list[str]:
        """Queues to poll now, starting one further along each time; the preferred shard first while
        its preference lasts."""
        now = self.clock()
        order = self.queues[self._start :] + self.queues[: self._start]
        self._start = (self._start + 1) % len(self.queues)
        due = [queue for queue in order if self._next[queue] <= now]
        preferred = self.preferred
        if preferred in due and now - self._preferred_since < self.prefer_for:
            due.remove(preferred)
            due.insert(0, preferred)
        return due

    def carried(self, queue: str, checkpoints: list[str | None]) -> None:
        """Jobs for these checkpoints came from ``queue``."""
        if len(self.queues) > 1:
            self._carries.setdefault(queue, set()).update(checkpoints)

    def prefer(self, checkpoint: str | None) -> None:
        """A1111 has ``checkpoint`` loaded: prefer the one shard its jobs come from (a new preference
        starts its ``prefer_for`` seconds). None while a shard is unknown (neither received from nor
        found empty) or when several carry it: shards filled round-robin are polled fairly."""
        known = all(q in self._carries or self._empty[q] for q in self.queues)
        homes = [q for q, carried in self._carries.items() if checkpoint in carried]
        queue = homes[0] if known and len(homes) == 1 else None
        if queue != self.preferred:
            self.preferred, self._preferred_since = queue, self.clock()

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
