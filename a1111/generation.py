"""A1111's queue lock and ``shared.state``, and a generation's costs: model switches, sampling passes,
downloads, interrupts and the faults the stand-in injects; the stats that identify every generation.

Interrupts as recorded: ``POST /sdapi/v1/interrupt`` sets ``state.interrupted``; the pass running
ends at once and its batch is still returned (the infotext keeps the full step count), later batches
and the hires pass are skipped; the flag stays set until the next job takes the queue lock
(``state.begin``), so an interrupt while idle, or one that hit the job ahead, does not touch a
request waiting at the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import string
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from fastapi.responses import Response

from a1111.assets import AssetSpec, AssetStore, Checkpoint, default_specs
from a1111.faults import Faults
from a1111.options_v1_10_1 import OPTIONS
from a1111.plan import Plan, build_plan
from a1111.pngs import PngPool
from a1111.shapes import A1111Failure, Txt2ImgRequest, a1111_error
from a1111.tables import resolve_sampler

log = logging.getLogger("a1111.standin")


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    seconds_per_image: float = 0.25
    seconds_per_step: float = 0.0  # added per image and sampling step (0: a pass costs the same at any steps)
    startup_delay: float = 0.0
    log_level: str = "warning"
    strict_samplers: bool = False
    fail_next: int = 0
    hang_next: int = 0
    crash_after: int | None = None
    crash_on_prompt: str | None = None
    model_switch_seconds: float = 0.0  # loading another checkpoint (an override, hr_checkpoint_name)
    download_seconds: float = 10.0  # one try to fetch missing weights (face restoration, an upscaler)
    downloads: str = "fail"  # "fail" (offline, as recorded) or "succeed" (the weights land on disk)
    models_dir: str = "/stable-diffusion-webui/models"
    hashing: bool = True  # False: A1111's --no-hashing
    face_restoration: bool = False  # the face-restoration weights are on disk
    assets: list[AssetSpec] = field(default_factory=default_specs)

    def new_store(self) -> AssetStore:
        store = AssetStore(self.models_dir, self.hashing, self.face_restoration)
        for spec in self.assets:
            store.add(spec)
        if not store.listed["checkpoint"]:
            raise ValueError("no checkpoint: A1111 cannot start without one")
        return store


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


@dataclass
class Outcome:
    sizes: list[tuple[int, int]] = field(default_factory=list)  # one per image made
    steps_done: int = 0
    downloads: list[dict[str, Any]] = field(default_factory=list)


class StandIn:
    """The server's state: A1111's queue lock, shared.state, options and files, plus the stand-in's knobs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lock = asyncio.Lock()  # A1111's queue_lock; asyncio.Lock wakes its waiters in FIFO order
        self.state, self.clock, self.pngs = State(), JobClock(), PngPool()
        self.faults = self.configured_faults()
        self.stats = Stats()
        self.model_loaded_at = time.monotonic() + settings.startup_delay
        self.restart()

    def configured_faults(self) -> Faults:
        s = self.settings
        return Faults(
            fail_next=s.fail_next,
            hang_next=s.hang_next,
            crash_after=s.crash_after,
            crash_on_prompt=s.crash_on_prompt,
        )

    def restart(self) -> None:
        """The files and options of a fresh start (the first checkpoint loaded)."""
        self.assets = self.settings.new_store()
        self.loaded = next(a for a in self.assets.listed["checkpoint"].values() if isinstance(a, Checkpoint))
        self.options: dict[str, Any] = dict(OPTIONS)
        self.options.update(sd_model_checkpoint=self.loaded.title, sd_checkpoint_hash=self.loaded.sha256)

    def reset(self) -> None:
        """POST /standin/reset: stats, faults, files and options as at start."""
        self.stats = Stats(started_at=self.stats.started_at)
        self.faults = Faults(crash_on_prompt=self.settings.crash_on_prompt)
        self.restart()

    def record(self, body: Any) -> None:
        self.stats.requests += 1
        self.stats.received.append(body.decode(errors="replace") if isinstance(body, bytes) else body)

    async def txt2img(self, req: Txt2ImgRequest) -> Response:
        requested = req.sampler_name or req.sampler_index
        sampler, _, known = resolve_sampler(requested, req.scheduler)
        if not known:
            if self.settings.strict_samplers:
                return a1111_error(404, "HTTPException", detail="Sampler not found")
            log.warning("Unknown sampler %r: running %r instead, as A1111 1.10 does", requested, sampler)
        async with self.lock:
            # the model loads in a background thread; txt2img blocks on it inside the queue lock
            await asyncio.sleep(self.model_loaded_at - time.monotonic())
            result = await self.generate(req, sampler)
        if isinstance(result, Response):
            return result
        plan, outcome = result
        made = outcome.sizes if req.send_images else []
        pngs = []
        for seed, size in zip(plan.seeds, made, strict=False):
            pool = await self.pngs.get(*size)
            pngs.append(pool[seed % len(pool)])
        body = await asyncio.to_thread(plan.response, pngs, len(outcome.sizes))
        return Response(body, media_type="application/json")

    async def generate(self, req: Txt2ImgRequest, sampler: str) -> tuple[Plan, Outcome] | Response:
        """Under the queue lock: process_images, with the faults and the costs."""
        self.state.begin(self.clock.next())
        task = req.force_task_id or f"task(txt2img-{''.join(random.choices(string.digits, k=7))})"
        fault, started, outcome = self.faults.take(req.prompt), time.time(), Outcome()
        plan: Plan | None = None
        error: Response | None = None
        try:
            if fault == "crash":
                log.error("crash fault: exiting in the middle of a generation")
                os._exit(1)
            plan = build_plan(req, self.assets, self.options, sampler)
            plan.job_timestamp = self.state.job_timestamp
            if plan.missing_loras:
                log.warning("Lora not found: %s", ", ".join(plan.missing_loras))
            await self.load_model(plan.model)
            self.state.job_count = plan.req.n_iter or 1
            if plan.hires_size:
                self.state.job_count *= 2
            if fault == "fail":
                await asyncio.sleep(min(0.05, self.settings.seconds_per_image))
                error = self.faults.failure()
            else:
                await self.sample(plan, outcome, hang=fault == "hang")
                if req.override_settings_restore_afterwards is False:
                    self.options.update(plan.overrides)
        except A1111Failure as failure:
            log.warning("txt2img failed as A1111 would: %s: %s", failure.error, failure.message)
            error, outcome.sizes = failure.response(), []
        finally:
            self.finish(task, started, plan, outcome, fault, error)
        if error is not None or plan is None:
            return error or a1111_error(500, "RuntimeError", errors="no plan")
        return plan, outcome

    async def sample(self, plan: Plan, outcome: Outcome, hang: bool) -> None:
        """process_images_inner's batch loop."""
        state, req = self.state, plan.req
        batch, n_iter = req.batch_size or 1, req.n_iter or 1
        per_image, per_step = self.settings.seconds_per_image, self.settings.seconds_per_step
        seconds = None if hang else batch * (per_image + per_step * plan.steps)
        hr_seconds = None if hang else batch * (per_image + per_step * plan.hr_steps)
        for n in range(n_iter):
            if state.skipped:
                state.skipped = False
            if state.interrupted:
                break
            await self.load_model(plan.model)  # reload_model_weights(): back from a hires checkpoint
            if n_iter > 1:
                state.job = f"Batch {n + 1} out of {n_iter}"
            outcome.steps_done += await state.run_pass(plan.steps, seconds)
            size = plan.size
            if plan.hires_size and not state.interrupted:
                if plan.hr_model is not None:
                    await self.load_model(plan.hr_model)
                if plan.hr_sampler_error:
                    raise A1111Failure("AssertionError", plan.hr_sampler_error)
                upscaler = plan.hr_upscaler
                for _ in range(batch):
                    if upscaler is not None and upscaler.needs_download:
                        if await self.download(outcome, f"upscaler {upscaler.name}"):
                            upscaler = plan.hr_upscaler = self.assets.downloaded(upscaler)
                state.nextjob()
                outcome.steps_done += await state.run_pass(plan.hr_steps, hr_seconds)
                size = plan.hires_size
            state.nextjob()
            for _ in range(batch):
                if req.restore_faces and not self.assets.face_restoration:
                    self.assets.face_restoration = await self.download(outcome, "face restoration")
            outcome.sizes += [size] * batch

    async def download(self, outcome: Outcome, what: str) -> bool:
        """modelloader.load_file_from_url for missing weights: one try per image, as A1111 makes it."""
        seconds = self.settings.download_seconds
        await asyncio.sleep(seconds)
        ok = self.settings.downloads == "succeed"
        if not ok:  # A1111 logs it and goes on: no restoration, a plain resize instead of the upscaler
            log.warning("Unable to load %s model: downloading its weights failed", what)
        outcome.downloads.append({"what": what, "seconds": seconds, "ok": ok})
        return ok

    async def load_model(self, model: Checkpoint) -> None:
        if model != self.loaded:
            await asyncio.sleep(self.settings.model_switch_seconds)
            self.loaded = model
            self.options["sd_checkpoint_hash"] = model.sha256

    def finish(
        self,
        task: str,
        started: float,
        plan: Plan | None,
        outcome: Outcome,
        fault: str | None,
        error: Response | None,
    ) -> None:
        state, stats, ended = self.state, self.stats, time.time()
        interrupted, skipped = state.interrupted, state.skipped
        state.end()
        made = len(outcome.sizes)
        stats.images += made
        stats.busy_seconds += ended - started
        stats.generations.append((started, ended, made))
        detail: dict[str, Any] = {"index": stats.count, "task_id": task, "started": started, "ended": ended}
        stats.count += 1
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
            interrupted=interrupted,
            skipped=skipped,
            steps_done=outcome.steps_done,
            downloads=outcome.downloads,
            fault=fault,
            error=error_body,
        )
        stats.details.append(detail)

    def interrupt(self, skip: bool = False) -> None:
        """shared.state.interrupt() / skip(): ends the running pass; the next job's begin() clears it."""
        if skip:
            self.state.skipped = True
        else:
            self.state.interrupted = True
        self.state.wake.set()

    def progress(self) -> dict[str, Any]:
        """modules/api progressapi (API-only mode: no current_task, no live preview)."""
        state = self.state
        body: dict[str, Any] = {"progress": 0.0, "eta_relative": 0.0, "state": state.as_dict()}
        body.update(current_image=None, textinfo=None)
        if state.job_count == 0:
            return body
        progress = 0.01 + (state.job_no / state.job_count if state.job_count > 0 else 0.0)
        if state.sampling_steps > 0:
            progress += 1 / state.job_count * body["state"]["sampling_step"] / state.sampling_steps
        elapsed = time.time() - state.time_start
        eta = elapsed / progress if progress else 0.0
        body.update(progress=min(progress, 1.0), eta_relative=eta - elapsed)
        return body

    async def set_options(self, update: dict[str, Any]) -> Response | None:
        """Api.set_config: the checkpoint must exist; an unknown key is opts.set()'s KeyError."""
        name = update.get("sd_model_checkpoint")
        if name is not None and self.assets.checkpoint(name) is None:
            return a1111_error(500, "RuntimeError", errors=f"model {name!r} not found")
        for key, value in update.items():
            if key not in self.options:
                return a1111_error(500, "KeyError", errors=repr(key))
            self.options[key] = value
            model = self.assets.checkpoint(value) if key == "sd_model_checkpoint" else None
            if model is not None:  # the onchange callback reloads the weights behind the queue lock
                async with self.lock:
                    await self.load_model(model)
                self.options["sd_model_checkpoint"] = model.title
        return None

    def stats_body(self) -> dict[str, Any]:
        s = self.stats
        return {
            "requests": s.requests,
            "images": s.images,
            "busy_seconds": s.busy_seconds,
            "started_at": s.started_at,
            "generations": list(s.generations),
            "generations_detail": list(s.details),
            "received": list(s.received),
        }
