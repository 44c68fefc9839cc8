"""What the worker holds and what became of it: the leases of held messages, the jobs still being
finished, and the count of outcomes. The stages share one ``Book``."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from sidecar.jobs import Job
from sidecar.lease import Lease


@dataclass
class Held:
    """A job this worker holds, with the lease that keeps its message invisible."""

    lease: Lease
    job: Job
    fetched_at: float = field(default_factory=time.time)
    passed_over_s: float = 0.0  # how long jobs fetched after it went first (sidecar.pipeline.affinity)


class Book:
    def __init__(self) -> None:
        self.held: set[Lease] = set()
        self.finishing: set[asyncio.Task[None]] = set()
        self.outcomes: Counter[str] = Counter()
        # Set when room may have opened for fetching: a job taken for generation or settled, a stop.
        self.wake = asyncio.Event()

    @property
    def finished(self) -> int:
        return self.outcomes["succeeded"] + self.outcomes["poisoned"]

    @property
    def in_pipeline(self) -> int:
        return len(self.held)

    @property
    def idle(self) -> bool:
        """Nothing held and nothing being finished."""
        return not self.held and not self.finishing

    def track(self, task: asyncio.Task[None]) -> None:
        """A job being finished (decoded, stored, settled, reported)."""
        self.finishing.add(task)
        task.add_done_callback(self.finishing.discard)
