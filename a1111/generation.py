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
import logging
import os
import random
import string
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import Response

from a1111.assets import AssetSpec, AssetStore, Checkpoint, default_specs
from a1111.faults import Faults
from a1111.options_v1_10_1 import OPTIONS
from a1111.plan import Plan
from a1111.pngs import Encoding, PngPool
from a1111.resolve import build_plan
from a1111.shapes import A1111Failure, Txt2ImgRequest, a1111_error
from a1111.state import JobClock, Outcome, State, Stats
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
    model_load_seconds: float = 0.0  # loading another checkpoint (an override, hr_checkpoint_name)
    lora_seconds: float = 0.0  # applying a changed LoRA set (names and weights) to the weights
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
        self.applied_loras: tuple[str, ...] = ()
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
        canvases = []
        for seed, size in zip(plan.seeds, made, strict=False):
            pool = await self.pngs.get(*size)
            canvases.append(pool[seed % len(pool)])
        try:  # encode_pil_to_base64 reads the global options: the request's overrides are restored
            encoding = Encoding.from_options(self.options) if canvases else Encoding()
        except ValueError as error:
            return a1111_error(500, "HTTPException", detail=str(error))
        body = await asyncio.to_thread(plan.response, canvases, len(outcome.sizes), encoding)
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
            await self.apply_loras(plan.lora_set)
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
            self.stats.model_switches += 1
            await asyncio.sleep(self.settings.model_load_seconds)
            self.loaded = model
            self.applied_loras = ()  # fresh weights
            self.options["sd_checkpoint_hash"] = model.sha256

    async def apply_loras(self, loras: tuple[str, ...]) -> None:
        """networks.network_apply_weights: the weights are restored and the LoRAs applied again when
        the set (names and weights) differs from the one applied; the same set costs nothing."""
        if loras != self.applied_loras:
            self.stats.lora_changes += 1
            await asyncio.sleep(self.settings.lora_seconds)
            self.applied_loras = loras

    def finish(
        self,
        task: str,
        started: float,
        plan: Plan | None,
        outcome: Outcome,
        fault: str | None,
        error: Response | None,
    ) -> None:
        self.stats.record(task, started, plan, outcome, fault, error, self.state)
        self.state.end()

    def interrupt(self, skip: bool = False) -> None:
        """shared.state.interrupt() / skip(): ends the running pass; the next job's begin() clears it."""
        if skip:
            self.state.skipped = True
        else:
            self.state.interrupted = True
        self.state.wake.set()

    def progress(self) -> dict[str, Any]:
        return self.state.progress()

    async def set_options(self, update: dict[str, Any]) -> Response | None:
        """Api.set_config: the checkpoint must exist; an unknown key is opts.set()'s KeyError."""
        name = update.get("sd_model_checkpoint")
        if name is not None and self.assets.checkpoint(name) is None:
            return a1111_error(500, "RuntimeError", errors=f"model {name!r} not found")
        for key, value in update.items():
            if key not in self.options:
                return a1111_error(500, "KeyError", errors=repr(key))
            self.options[key] = self.faults.pinned_options.get(key, value)
            model = self.assets.checkpoint(value) if key == "sd_model_checkpoint" else None
            if model is not None:  # the onchange callback reloads the weights behind the queue lock
                async with self.lock:
                    await self.load_model(model)
                self.options["sd_model_checkpoint"] = model.title
        return None

    def stats_body(self) -> dict[str, Any]:
        return self.stats.body()
