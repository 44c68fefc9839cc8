"""Model and LoRA affinity: the order in which held jobs go to A1111.

A1111 keeps one checkpoint in memory (``sd_checkpoints_limit`` 1). A job whose checkpoint differs from
the loaded one reloads the weights (seconds), and with ``override_settings_restore_afterwards`` (always
on for our jobs) the next job without an override loads the default one again. A changed set of LoRAs
(names and weights) is applied again to the weights (a fraction of a second). In queue order a mixed
queue pays a switch on most jobs; ``Window`` (the ``ready`` queue between fetching and generating)
hands out the jobs it holds in a better order:

* a job that keeps the loaded checkpoint and LoRA set first, then one that keeps the checkpoint, the
  oldest of them first;
* when no job keeps the checkpoint, the checkpoint of the oldest job waiting;
* a hard bound on how long a job is *passed over* (from the first time a job fetched after it was taken
  before it, until it is taken itself): ``SIDECAR_AFFINITY_MAX_WAIT`` seconds. Before a group of jobs of
  another checkpoint would run past it (the time to serve the groups due earlier, the switches
  included, as measured between takes, plus two long intervals of slack), that group is served at
  once, and then served out before anything else may take its place; ``0`` hands the jobs out in
  the order they were fetched.

Each job's passed-over seconds go into its ``timings`` (``passed_over_s``: the ``job done`` line,
``job.json`` and the result message).
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.jobs import Job
from sidecar.pipeline.book import Held

# extra_networks' tag; the Lora extension answers to "lora" and its alias "lyco"
_NETWORK = re.compile(r"<(lora|lyco):([^>]+)>")
_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")
SAMPLES = 32  # intervals between takes kept for the estimates


@dataclass(frozen=True)
class Affinity:
    """What a job needs loaded: a checkpoint (None: A1111's default) and a set of LoRA tags."""

    checkpoint: str | None = None
    loras: tuple[str, ...] = ()


DEFAULT = Affinity()


def affinity_of(job: Job) -> Affinity:
    """The checkpoint of ``override_settings.sd_model_checkpoint`` (without a ``[hash]`` suffix: A1111's
    titles carry one, names do not) and the LoRA tags of the prompt, with their weights."""
    overrides = job.spec.override_settings
    name = overrides.sd_model_checkpoint if overrides is not None else None
    checkpoint = _HASH.sub("", name) if name else None
    tags = sorted({args.strip() for _, args in _NETWORK.findall(job.spec.prompt or "")})
    return Affinity(checkpoint, tuple(tags))


@dataclass
class _Entry:
    held: Held
    affinity: Affinity
    order: int
    passed_since: float | None = None


class Window(asyncio.Queue[Held | None]):
    """The ``ready`` queue: put in fetch order, taken in affinity order (``max_wait`` 0: fetch order).

    ``None`` (no more jobs) is handed out once nothing else is left."""

    def __init__(self, max_wait: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_wait = max_wait
        self.clock = clock
        self.loaded = DEFAULT  # what the job taken last needs: what A1111 will have loaded
        self.switches = 0  # checkpoint changes between consecutive takes
        self.passed_over_max = 0.0
        self._run_started = clock()  # when the loaded checkpoint was taken first
        self._last_take: float | None = None
        self._steps: deque[float] = deque(maxlen=SAMPLES)  # take intervals within one checkpoint
        self._switch_cost = 0.0  # the longest interval after a checkpoint change, recently
        self._order = 0
        super().__init__()

    # asyncio.Queue's storage hooks
    def _init(self, maxsize: int) -> None:
        self._queue: list[_Entry | None] = []

    def _put(self, item: Held | None) -> None:
        if item is None:
            self._queue.append(None)
            return
        self._order += 1
        self._queue.append(_Entry(item, affinity_of(item.job), self._order))

    def _get(self) -> Held | None:
        entries = [e for e in self._queue if e is not None]
        if not entries:
            self._queue.pop(0)
            return None
        now = self.clock()
        entry = self.choose(entries, now) if self.max_wait > 0 else entries[0]
        self._take(entry, now)
        return entry.held

    # the rule
    def choose(self, entries: list[_Entry], now: float) -> _Entry:
        loaded = self.loaded
        same = [e for e in entries if e.affinity.checkpoint == loaded.checkpoint]
        serving_due = any(e.passed_since is not None and e.passed_since < self._run_started for e in same)
        if serving_due:
            return same[0]  # a due group is served out in fetch order, its LoRA sets mixed
        # jobs of the loaded checkpoint passed over for another LoRA set: never left behind
        lagging = [e for e in same if e.passed_since is not None]
        due = self._due_group(entries, now, len(lagging))
        if due is not None:
            return lagging[0] if lagging else due
        if same:
            # Another LoRA set within the checkpoint costs little: the oldest job of the checkpoint
            # goes first once its passed-over jobs, taken one a step, would run past the bound.
            passed = [e.passed_since for e in same if e.passed_since is not None]
            if not passed or min(passed) + self.max_wait - now > self.step() * (len(passed) + 1):
                keeps = [e for e in same if e.affinity.loras == loaded.loras]
                if keeps:
                    return keeps[0]
            return same[0]
        return entries[0]

    def _due_group(self, entries: list[_Entry], now: float, lagging: int = 0) -> _Entry | None:
        """The oldest job of the checkpoint that must be served now for every group of passed-over jobs
        to be taken within the bound (earliest deadline first, each group served whole, after the
        ``lagging`` passed-over jobs of the loaded checkpoint), if any."""
        groups: dict[str | None, list[_Entry]] = {}
        for entry in entries:
            if entry.affinity.checkpoint != self.loaded.checkpoint:
                groups.setdefault(entry.affinity.checkpoint, []).append(entry)
        deadlines = []
        for members in groups.values():
            passed = [e.passed_since for e in members if e.passed_since is not None]
            if passed:
                deadlines.append((min(passed) + self.max_wait, members))
        deadlines.sort(key=lambda item: item[0])
        # Slack of two long intervals: the next take may come only after a checkpoint load still
        # ahead at A1111 (with queue-ahead, the job sent last may be the one that loads), and the
        # estimates are of what was, not of what comes.
        step = self.step()
        elapsed = 2 * max(step, self._switch_cost) + step * lagging
        for deadline, members in deadlines:
            elapsed += self._switch_cost + step * len(members)
            if deadline - now <= elapsed:
                return deadlines[0][1][0]
        return None

    def step(self) -> float:
        """The usual seconds between two takes of the same checkpoint (one generation)."""
        return statistics.median(self._steps) if self._steps else 0.0

    def _take(self, entry: _Entry, now: float) -> None:
        self._queue.remove(entry)
        for other in self._queue:
            if other is None or other.order > entry.order:
                break
            if other.passed_since is None:
                other.passed_since = now
        waited = now - entry.passed_since if entry.passed_since is not None else 0.0
        entry.held.passed_over_s = round(waited, 3)
        self.passed_over_max = max(self.passed_over_max, waited)
        if self._last_take is not None:
            # An interval far longer than the usual one had a checkpoint load in it (which one is
            # not told: with queue-ahead the load shows one take later than the job that caused it).
            interval, step = now - self._last_take, self.step()
            if self._steps and interval > 2 * step + 0.05:
                self._switch_cost = max(interval, 0.9 * self._switch_cost)
            else:
                self._steps.append(interval)
        if entry.affinity.checkpoint != self.loaded.checkpoint:
            self.switches += 1
            self._run_started = now
        self._last_take = now
        self.loaded = entry.affinity
