"""A1111's busy time, counted once however many of our requests overlap: from when A1111 turns to a
request until its answer (queueing behind the request ahead and retry backoff left out)."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass
class Attempt:
    """One txt2img attempt as the meter saw it, once it has ended: seconds queued at A1111's lock
    behind the request ahead, then seconds A1111 spent on it."""

    sent: float
    queued: float = 0.0
    seconds: float = 0.0


class BusyMeter:
    """The time A1111 spends on this worker's txt2img attempts (GPU time), and its fraction of the
    wall over a sliding window.

    A1111 serves txt2img one at a time behind its queue lock, in the order they came: it turns to an
    attempt when it is sent or when the attempt sent before it is answered, whichever is later, and
    is done with it when it answers. So each attempt is busy from ``max(sent, last answer)`` until its
    own answer and queued before that; the intervals never overlap (two requests at A1111 at once, one
    generating and one waiting, count once), and backoff between attempts is no attempt at all.
    """

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self.started = clock()
        self._intervals: deque[tuple[float, float]] = deque()
        self._in_flight: dict[int, float] = {}  # id(attempt) -> sent
        self._last_answer = -math.inf
        self._closed = 0.0  # busy seconds of the attempts answered so far
        self._reported = 0.0  # the highest total reported (a counter never goes down)

    @contextmanager
    def attempt(self) -> Iterator[Attempt]:
        """Around one txt2img request; the ``Attempt`` is filled in when it ends (however it ends)."""
        attempt = Attempt(self.clock())
        self._in_flight[id(attempt)] = attempt.sent
        try:
            yield attempt
        finally:
            del self._in_flight[id(attempt)]
            answered = self.clock()
            turned = min(answered, max(attempt.sent, self._last_answer))
            self._last_answer = max(self._last_answer, answered)
            attempt.queued, attempt.seconds = turned - attempt.sent, answered - turned
            self._closed += attempt.seconds
            self._intervals.append((turned, answered))
            while self._intervals[0][1] < answered - self.window:
                self._intervals.popleft()

    def _open(self, now: float) -> tuple[float, float] | None:
        """The interval A1111 has been on one of our attempts so far, if one is at A1111 now."""
        if not self._in_flight:
            return None
        return min(now, max(min(self._in_flight.values()), self._last_answer)), now

    def total(self, now: float | None = None) -> float:
        """Busy seconds since the start, the attempt A1111 is on now included."""
        now = self.clock() if now is None else now
        current = self._open(now)
        total = self._closed + (current[1] - current[0] if current else 0.0)
        self._reported = max(self._reported, total)
        return self._reported

    def fraction(self, now: float | None = None) -> float:
        """Busy seconds over the last ``window`` seconds (or since the start), as a fraction."""
        now = self.clock() if now is None else now
        since = max(self.started, now - self.window)
        while self._intervals and self._intervals[0][1] < since:
            self._intervals.popleft()
        current = self._open(now)
        intervals: Iterable[tuple[float, float]] = [*self._intervals, current] if current else self._intervals
        busy = sum(min(end, now) - max(start, since) for start, end in intervals if end > since)
        span = now - since
        return min(1.0, max(0.0, busy / span)) if span > 0 else 0.0


class BusySeconds(Collector):
    """``sidecar_a1111_busy_seconds_total``, read from the meter at each scrape (a generation of ten
    minutes counts as it goes, not in one step at its end)."""

    def __init__(self, meter: BusyMeter) -> None:
        self.meter = meter

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "sidecar_a1111_busy_seconds",
            "Seconds A1111 spent on this worker's txt2img attempts (from turning to one until its "
            "answer; queueing behind the request ahead and retry backoff excluded)",
        )
        family.add_metric([], self.meter.total())
        yield family
