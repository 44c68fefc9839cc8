"""Metrics (Prometheus) and the A1111 busy fraction.

Each worker owns its registry, so several workers can live in one process (tests, the benchmark).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

log = logging.getLogger(__name__)
OUTCOMES = ("succeeded", "poisoned", "retried", "deferred", "released", "abandoned", "lost")

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class BusyMeter:
    """Fraction of wall time A1111 had at least one of our txt2img requests, over a sliding window.

    Used as a context manager around each generation; overlapping requests (one generating, one
    queued behind it) count once. Intervals older than the window are dropped.
    """

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self.started = time.monotonic()
        self._intervals: deque[tuple[float, float]] = deque()
        self._open: float | None = None
        self._depth = 0

    def __enter__(self) -> BusyMeter:
        if self._depth == 0:
            self._open = time.monotonic()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._open is not None:
            self._intervals.append((self._open, time.monotonic()))
            self._open = None

    def fraction(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        since = max(self.started, now - self.window)
        while self._intervals and self._intervals[0][1] < since:
            self._intervals.popleft()
        busy = sum(min(end, now) - max(start, since) for start, end in self._intervals if end > since)
        if self._open is not None:
            busy += now - max(self._open, since)
        span = now - since
        return min(1.0, busy / span) if span > 0 else 0.0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.busy = BusyMeter()
        self.jobs = Counter("sidecar_jobs", "Jobs by outcome", ["outcome"], registry=self.registry)
        self.stage_seconds = Histogram(
            "sidecar_stage_seconds",
            "Latency of each stage",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "sidecar_in_flight", "Jobs in each stage now", ["stage"], registry=self.registry
        )
        busy = Gauge(
            "sidecar_a1111_busy_fraction",
            "Fraction of the last minute A1111 spent on this worker's generations",
            registry=self.registry,
        )
        busy.set_function(self.busy.fraction)
        self.ready = Gauge(
            "sidecar_ready", "1 when A1111 is warm and storage answers", registry=self.registry
        )
        self.images = Counter("sidecar_images", "Images stored", registry=self.registry)
        self.discarded = Counter(
            "sidecar_generations_discarded",
            "Generations thrown away unstored because an interrupt may have cut them short",
            registry=self.registry,
        )
        self.credential_expiry = Gauge(
            "sidecar_credential_expiry_seconds",
            "Seconds until the storage SAS expires (absent with an account key or Azure AD)",
            registry=self.registry,
        )
        # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
        ProcessCollector(registry=self.registry)

    def totals(self) -> dict[str, float]:
        """Images and jobs by outcome so far, for the periodic summary line."""
        get = self.registry.get_sample_value
        totals = {"images": get("sidecar_images_total") or 0.0}
        for outcome in OUTCOMES:
            totals[outcome] = get("sidecar_jobs_total", {"outcome": outcome}) or 0.0
        return totals

    async def summarize(self, interval: float) -> None:
        """Every ``interval`` seconds, one log line: images/min, A1111 busy fraction, failures, and the
        worker's own CPU per image stored (its cost on the node; the benchmark's figure, live)."""
        previous, cpu_before = self.totals(), time.process_time()
        while True:
            await asyncio.sleep(interval)
            now, cpu = self.totals(), time.process_time()
            delta = {key: now.get(key, 0) - previous.get(key, 0) for key in now}
            previous, cpu_spent, cpu_before = now, cpu - cpu_before, cpu
            images = delta.get("images", 0)
            log.info(
                "summary",
                extra={
                    "stage": "summary",
                    "images_per_min": round(images * 60 / interval, 1),
                    "jobs_done": int(delta.get("succeeded", 0)),
                    "failures": int(sum(delta.get(k, 0) for k in ("retried", "poisoned", "abandoned"))),
                    "poisoned": int(delta.get("poisoned", 0)),
                    "a1111_busy_fraction": round(self.busy.fraction(), 3),
                    "cpu_ms_per_image": round(cpu_spent * 1000 / images, 2) if images else None,
                },
            )

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with self.stage_seconds.labels(name).time():
            yield


__all__ = ["BusyMeter", "Metrics"]
