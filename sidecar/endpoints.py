"""``/healthz``, ``/readyz`` and ``/metrics`` on SIDECAR_HTTP_PORT (aiohttp, already a dependency of the
Azure SDK's async transport)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.errors import SidecarError
from sidecar.observability import Metrics


class Stopping(Protocol):
    """The worker's stop (``sidecar.pipeline.stop.Stop``) as readiness sees it."""

    @property
    def is_set(self) -> bool: ...

    @property
    def error(self) -> SidecarError | None: ...


@dataclass
class Health:
    """What readiness is made of. Ready = A1111 warmed up, storage answering, not stopping."""

    stop: Stopping
    storage_answering: Callable[[], bool] = field(default=lambda: False)
    a1111_warm: bool = False

    @property
    def draining(self) -> bool:
        return self.stop.is_set

    @property
    def ready(self) -> bool:
        return self.a1111_warm and self.storage_answering() and not self.draining

    def reasons(self) -> list[str]:
        reasons = []
        # why the worker is stopping for good (a storage refusal, A1111 gone), once it is
        fatal = self.stop.error
        if fatal is not None:
            reasons.append(f"stopping: {fatal}")
        if not self.a1111_warm:
            reasons.append("A1111 has not passed its warm-up")
        if not self.storage_answering():
            reasons.append("storage does not answer")
        if self.draining:
            reasons.append("draining")
        return reasons


def make_app(health: Health, metrics: Metrics) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        metrics.ready.set(1 if health.ready else 0)
        if health.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reasons": health.reasons()}, status=503)

    async def metrics_view(_: web.Request) -> web.Response:
        metrics.ready.set(1 if health.ready else 0)
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app


async def serve(health: Health, metrics: Metrics, port: int, host: str = "0.0.0.0") -> web.AppRunner:
    """Start the endpoints; the caller cleans up the returned runner. Port 0 picks a free port."""
    runner = web.AppRunner(make_app(health, metrics), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("the endpoints are not listening")
