"""A1111's ``shared.state`` as ``/sdapi/v1/progress`` shows it, the job clock, and the stats that
identify every generation (``GET /standin/stats``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from fastapi.responses import Response

from a1111.plan import Plan


@dataclass
class Outcome:
    sizes: list[tuple[int, int]] = field(default_factory=list)  # one per image made
    steps_done: int = 0
    downloads: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Stats:
    started_at: float = field(default_factory=time.time)
    requests: int = 0
    images: int = 0
    busy_seconds: float = 0.0
    generations: deque[tuple[float, float, int]] = field(default_factory=lambda: deque(maxlen=100_000))
    details: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50_000))
    count: int = 0
    received: deque[Any] = field(default_factory=lambda: deque(maxlen=1000))
    model_switches: int = 0  # checkpoints loaded in place of another (each costs model_load_seconds)
    lora_changes: int = 0  # LoRA sets applied in place of another (each costs lora_seconds)

    def record(
        self,
        task: str,
        started: float,
        plan: Plan | None,
        outcome: Outcome,
        fault: str | None,
        error: Response | None,
        state: State,
    ) -> None:
        """One generation ended (``state`` as it was at its end, before ``state.end()``)."""
        ended = time.time()
        made = len(outcome.sizes)
        self.images += made
        self.busy_seconds += ended - started
        self.generations.append((started, ended, made))
        detail: dict[str, Any] = {"index": self.count, "task_id": task, "started": started, "ended": ended}
        self.count += 1
        if plan is not None:
            req, passes = plan.req, 2 if plan.hires_size else 1
            detail.update(
                prompt=plan.prompt,
                seed=plan.seeds[0],
                all_seeds=plan.seeds,
                job_timestamp=plan.job_timestamp,
                steps=plan.steps,
                steps_total=(plan.steps + (plan.hr_steps if passes == 2 else 0)) * (req.n_iter or 1),
                sampler=plan.sampler,
                model=plan.model.title,
                loras=[lora.name for lora in plan.loras],
                missing_loras=plan.missing_loras,
            )
        else:
            detail.update(prompt=None, seed=None, all_seeds=[], job_timestamp=state.job_timestamp, steps=None)
        error_body = json.loads(bytes(error.body)) if error is not None else None
        detail.update(
            images=made,
            interrupted=state.interrupted,
            skipped=state.skipped,
            steps_done=outcome.steps_done,
            downloads=outcome.downloads,
            fault=fault,
            error=error_body,
        )
        self.details.append(detail)

    def body(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "images": self.images,
            "busy_seconds": self.busy_seconds,
            "started_at": self.started_at,
            "generations": list(self.generations),
            "generations_detail": list(self.details),
            "received": list(self.received),
            "model_switches": self.model_switches,
            "lora_changes": self.lora_changes,
        }


class JobClock:
    """state.job_timestamp ("%Y%m%d%H%M%S"), made unique: a second already used moves on to the next
    one, so a burst of generations runs ahead of the wall clock until an idle moment catches up."""

    def __init__(self) -> None:
        self.last: datetime | None = None

    def next(self) -> str:
        now = datetime.now().replace(microsecond=0)
        if self.last is not None and now <= self.last:
            now = self.last + timedelta(seconds=1)
        self.last = now
        return now.strftime("%Y%m%d%H%M%S")


@dataclass
class State:
    """A1111's shared.state, as /sdapi/v1/progress shows it."""

    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    time_start: float = 0.0
    pass_started: float = 0.0
    pass_seconds: float | None = None  # None: the pass hangs until interrupted
    sampling: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def begin(self, timestamp: str) -> None:
        self.skipped = self.interrupted = False
        self.job, self.job_count, self.job_no, self.sampling_step = "scripts_txt2img", -1, 0, 0
        self.job_timestamp, self.time_start = timestamp, time.time()

    def end(self) -> None:
        self.job, self.job_count, self.sampling = "", 0, False

    def nextjob(self) -> None:
        self.job_no += 1
        self.sampling_step = 0

    def live_step(self) -> int:
        if not self.sampling or not self.pass_seconds:
            return self.sampling_step
        done = (time.time() - self.pass_started) / self.pass_seconds
        return min(self.sampling_steps, int(done * self.sampling_steps))

    async def run_pass(self, steps: int, seconds: float | None) -> int:
        """One sampling pass; /interrupt and /skip (which set ``wake``) end it early. Steps sampled."""
        self.sampling_steps, self.sampling_step = steps, 0
        if self.interrupted or self.skipped:
            return 0
        self.pass_started, self.pass_seconds, self.sampling = time.time(), seconds, True
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)
        self.sampling_step = self.live_step() if self.interrupted or self.skipped else steps
        self.sampling = False
        return self.sampling_step

    def as_dict(self) -> dict[str, Any]:
        keys = ("skipped", "interrupted", "stopping_generation", "job", "job_count", "job_timestamp")
        state = {key: getattr(self, key) for key in keys}
        state.update(job_no=self.job_no, sampling_step=self.live_step(), sampling_steps=self.sampling_steps)
        return state

    def progress(self) -> dict[str, Any]:
        """modules/api progressapi (API-only mode: no current_task, no live preview)."""
        body: dict[str, Any] = {"progress": 0.0, "eta_relative": 0.0, "state": self.as_dict()}
        body.update(current_image=None, textinfo=None)
        if self.job_count == 0:
            return body
        progress = 0.01 + (self.job_no / self.job_count if self.job_count > 0 else 0.0)
        if self.sampling_steps > 0:
            progress += 1 / self.job_count * body["state"]["sampling_step"] / self.sampling_steps
        elapsed = time.time() - self.time_start
        eta = elapsed / progress if progress else 0.0
        body.update(progress=min(progress, 1.0), eta_relative=eta - elapsed)
        return body
