"""A stand-in for AUTOMATIC1111 Stable Diffusion Web UI's API (v1.10.1) for local runs, tests, benchmarks.

It serves what an A1111 client uses of ``webui.py --api --nowebui``: txt2img, progress, interrupt,
skip, options, samplers, schedulers, sd-models, sd-vae, loras, upscalers, latent-upscale-modes,
prompt-styles and the refresh endpoints, answering as the recording of the real server does
(tests/data/a1111-v1.10.1, checked by tests/test_standin_contract.py): same status codes, bodies,
field order, error shapes (api_middleware's {"error", "detail", "body", "errors"}, pydantic v1's 422,
FastAPI's 404) and queueing (one generation at a time, in arrival order). Nothing is sampled: a
sampling pass sleeps ``seconds_per_image * batch_size`` and the images are pooled canvases of the
right size with a label drawn on each (seed, size, prompt; ``a1111.pngs``), encoded as the global
options ``samples_format`` (png, jpg, webp) and ``jpeg_quality`` say when the answer is made, after
a request's ``override_settings`` were restored, as in A1111 (``POST /sdapi/v1/options`` sets them).

    python -m a1111.standin --host 127.0.0.1 --port 7860 --seconds-per-image 0.25 [--startup-delay S]

A1111 1.10 behaviour kept on purpose, surprising or not (modules ``a1111.plan`` and ``.generation``):
* an unknown sampler name, the legacy alias "k_euler_a" included, silently runs "DPM++ 2M" (Karras),
  visible only in ``info.sampler_name``; ``--strict-samplers`` gives A1111 1.8's
  ``404 Sampler not found`` instead. A missing LoRA is skipped, an unknown checkpoint in
  ``override_settings`` runs the loaded model, an unknown VAE or style is ignored: all 200.
* ``restore_faces`` without the weights (``--face-restoration`` says they are on disk) tries to fetch
  them for each image (``--download-seconds``), fails (offline, ``--downloads fail``) and returns the
  image unrestored, 200, as 1.10's face_restoration_utils does; a downloadable ``hr_upscaler`` alike.
* ``POST /sdapi/v1/interrupt`` ends the running generation early: 200 with the images of the batches
  it started; a request waiting at the queue lock is not touched.

Assets (``a1111.assets``): ``--checkpoints``, ``--loras``, ``--vaes``, ``--upscalers``, ``--style``,
``--models-dir``, ``--no-hashing``; by default what examples/jobs.jsonl and ``enqueue --generate``
name. At run time ``POST /standin/assets`` {"add": [{"kind", "name", "pending", ...}], "remove":
[{"kind", "name"}], "face_restoration": bool}; ``GET /standin/assets`` lists them. A pending asset
is a file copied onto the node: listed after ``POST /sdapi/v1/refresh-loras``, ``/refresh-checkpoints``
or ``/refresh-vae`` (the last two wait for the queue lock, as in A1111).

Knobs A1111 does not have, all under ``/standin/``:
* ``POST /standin/faults`` merges {"fail_next": N, "fail_status": 500, "fail_error": "OutOfMemoryError",
  "fail_message": "...", "hang_next": N, "crash_next": bool, "crash_after": N|null,
  "crash_on_prompt": "text"|null, "pinned_options": {"samples_format": "png"}} and returns the
  result; ``GET`` shows it. fail: the call holds the queue a moment, then fails in A1111's shape.
  hang: it holds the queue until interrupted. crash: ``os._exit(1)`` when its generation starts
  (crash_after N: on the (N+1)-th generation; crash_on_prompt: every generation whose prompt
  contains the text, a job that kills A1111). pinned_options: options held at a value, as if
  something else on the node kept setting them (set at once; ``POST /sdapi/v1/options`` answers 200
  and leaves them so; ``{}`` lets go).
* ``GET /standin/stats``: {"requests", "images", "busy_seconds", "started_at", "generations":
  [[start, end, n_images], ...], "generations_detail": [{"index", "task_id", "prompt", "seed",
  "all_seeds", "job_timestamp", "interrupted", "skipped", "steps", "steps_done", "steps_total",
  "images", "sampler", "model", "loras", "missing_loras", "downloads", "fault", "error", "started",
  "ended"}, ...], "received": [the last 1000 txt2img bodies as sent]}; unix times. ``job_timestamp``
  (A1111's 14 digits, as in ``info``) is unique per generation: it identifies one from a job.json.
* ``POST /standin/reset`` clears the stats and the faults (``--crash-on-prompt`` stays) and restores the
  files and options.
CLI equivalents: ``--fail-next N``, ``--hang-next N``, ``--crash-after N``, ``--crash-on-prompt TEXT``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from a1111.assets import AssetsUpdate
from a1111.auth import PREFIX, ApiAuth, parse_api_auth
from a1111.faults import Faults
from a1111.flags import parse_args, parse_command
from a1111.generation import Settings, StandIn
from a1111.shapes import Txt2ImgRequest, a1111_error, v1_errors
from a1111.tables import LATENT_UPSCALE_MODES, SCHEDULERS, VERSION, samplers_body

__all__ = ["TXT2IMG", "VERSION", "Settings", "StandIn", "create_app", "main", "parse_args"]

log = logging.getLogger("a1111.standin")

TXT2IMG = "/sdapi/v1/txt2img"


class ProcessTime:
    """api_middleware's log_and_time: every answer carries X-Process-Time (seconds, 4 decimals)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.time()

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                took = str(round(time.time() - started, 4)).encode()
                message["headers"] = [*message.get("headers", []), (b"x-process-time", took)]
            await send(message)

        await self.app(scope, receive, timed)


def create_app(settings: Settings, api_auth: str | None = None) -> FastAPI:
    """The stand-in's app; ``api_auth``: A1111's ``--api-auth`` value (``user:password[,...]``)."""
    standin = StandIn(settings)
    app = FastAPI(title="A1111 stand-in", version=VERSION)
    app.state.standin = standin
    app.add_middleware(ProcessTime)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        if request.url.path == TXT2IMG:
            standin.record(exc.body)
        return JSONResponse({"detail": v1_errors(exc.errors(), exc.body)}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        return a1111_error(500, type(exc).__name__, errors=str(exc))

    @app.post(TXT2IMG)
    async def txt2img(req: Txt2ImgRequest, request: Request) -> Response:
        standin.record(await request.json())
        return await standin.txt2img(req)

    add_a1111_routes(app, standin)
    add_asset_routes(app, standin)
    add_standin_routes(app, standin)
    if api_auth is not None:
        credentials = parse_api_auth(api_auth)

        @app.post("/standin/api-auth")
        async def change_api_auth(request: Request) -> dict[str, Any]:
            """A1111 restarted with another --api-auth (the body: the new value as a JSON string)."""
            credentials.clear()
            credentials.update(parse_api_auth(str(await request.json())))
            return {}

        routes = {path for route in app.routes if (path := getattr(route, "path", "")).startswith(PREFIX)}
        app.add_middleware(ApiAuth, credentials=credentials, routes=routes)
    return app


def add_a1111_routes(app: FastAPI, standin: StandIn) -> None:
    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return standin.progress()

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict[str, Any]:
        standin.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip() -> None:
        standin.interrupt(skip=True)

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return samplers_body()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        return SCHEDULERS

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict[str, Any]:
        return standin.options

    @app.post("/sdapi/v1/options", response_model=None)
    async def set_options(update: dict[str, Any]) -> Response | None:
        return await standin.set_options(update)


def add_asset_routes(app: FastAPI, standin: StandIn) -> None:
    """The lists of what is on disk, and their rescans."""

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return standin.assets.bodies("checkpoint")

    @app.get("/sdapi/v1/loras")
    async def loras() -> list[dict[str, Any]]:
        return standin.assets.bodies("lora")

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae() -> list[dict[str, Any]]:
        return standin.assets.bodies("vae")

    @app.get("/sdapi/v1/upscalers")
    async def upscalers() -> list[dict[str, Any]]:
        return standin.assets.bodies("upscaler")

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes() -> list[dict[str, Any]]:
        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    @app.get("/sdapi/v1/prompt-styles")
    async def prompt_styles() -> list[dict[str, Any]]:
        return standin.assets.bodies("style")

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras() -> None:  # the Lora extension's route: no queue lock
        standin.assets.refresh("lora")

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints() -> None:
        async with standin.lock:
            standin.assets.refresh("checkpoint")

    @app.post("/sdapi/v1/refresh-vae")
    async def refresh_vae() -> None:
        async with standin.lock:
            standin.assets.refresh("vae")


def add_standin_routes(app: FastAPI, standin: StandIn) -> None:
    @app.get("/standin/faults")
    async def get_faults() -> Faults:
        return standin.faults

    @app.post("/standin/faults")
    async def set_faults(update: Faults) -> Faults:
        standin.faults = standin.faults.model_copy(update=update.model_dump(exclude_unset=True))
        standin.options.update(standin.faults.pinned_options)
        return standin.faults

    @app.get("/standin/assets")
    async def get_assets() -> dict[str, Any]:
        return standin.assets.summary()

    @app.post("/standin/assets")
    async def set_assets(update: AssetsUpdate) -> dict[str, Any]:
        for ref in update.remove:
            standin.assets.remove(ref.kind, ref.name)
        for spec in update.add:
            standin.assets.add(spec)
        if update.face_restoration is not None:
            standin.assets.face_restoration = update.face_restoration
        return standin.assets.summary()

    @app.get("/standin/stats")
    async def stats() -> dict[str, Any]:
        return standin.stats_body()

    @app.post("/standin/reset")
    async def reset() -> dict[str, Any]:
        standin.reset()
        return {}


def main(argv: list[str] | None = None) -> None:
    settings, api_auth = parse_command(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = uvicorn.Config(
        create_app(settings, api_auth),
        host=settings.host,
        port=settings.port,
        http="httptools",
        access_log=False,
        log_level=settings.log_level,
        workers=1,
        timeout_graceful_shutdown=3,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
