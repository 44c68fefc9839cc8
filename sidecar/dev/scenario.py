"""What one benchmark run is: the scenario (from the command line) and one mode's results."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODES = {"sequential", "pipelined", "queue-order"}  # queue-order: pipelined, SIDECAR_AFFINITY_MAX_WAIT=0


class BenchError(Exception):
    pass


@dataclass
class Scenario:
    jobs: int = 200
    seconds_per_image: float = 0.25
    latency_ms: float = 40.0
    bandwidth_mbit: float = 25.0
    prefetch: int = 1
    modes: list[str] = field(default_factory=lambda: ["sequential", "pipelined"])
    report: Path = Path("bench-report")
    seed: int = 0
    models: int = 0  # > 0: a mixed workload, each job's checkpoint drawn from this many
    model_load_seconds: float = 3.0  # the stand-in's --model-load-seconds with --models
    affinity_max_wait: float | None = None  # SIDECAR_AFFINITY_MAX_WAIT of the pipelined mode (None: default)
    a1111_url: str | None = None  # a real A1111 instead of the stand-in

    def checkpoints(self) -> list[str]:
        """The mixed workload's checkpoints, installed in the stand-in (the first one loaded at start)."""
        return [f"bench-model-{n}.safetensors" for n in range(self.models)]

    @property
    def latency(self) -> float:
        return self.latency_ms / 1000

    @property
    def bits_per_second(self) -> float:
        return self.bandwidth_mbit * 1_000_000

    def prefetch_of(self, mode: str) -> int:
        return 0 if mode == "sequential" else self.prefetch

    def affinity_of(self, mode: str) -> float | None:
        """The mode's SIDECAR_AFFINITY_MAX_WAIT (None: the worker's default)."""
        return 0.0 if mode == "queue-order" else self.affinity_max_wait

    def describe(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "seconds_per_image": self.seconds_per_image,
            "latency_ms": self.latency_ms,
            "bandwidth_mbit": self.bandwidth_mbit,
            "prefetch": self.prefetch,
            "seed": self.seed,
            **({"models": self.models, "model_load_seconds": self.model_load_seconds} if self.models else {}),
            **({"a1111_url": self.a1111_url} if self.a1111_url else {}),
        }


@dataclass
class ModeRun:
    """One mode's measurements: the JSON summary plus what the chart needs."""

    mode: str
    summary: dict[str, Any]
    finished: list[tuple[float, float]]  # (seconds since ready, images) per finished job
    wall_s: float
    upload_bytes_per_image: float | None


def scenario_of(args: argparse.Namespace) -> Scenario:
    modes = [mode.strip() for mode in str(args.modes).split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if not modes or unknown:
        raise SystemExit(f"bench: --modes takes sequential, pipelined and/or queue-order, not {args.modes!r}")
    if args.jobs < 1:
        raise SystemExit("bench: --jobs must be at least 1")
    if args.prefetch < 1:
        raise SystemExit("bench: --prefetch (the pipelined mode's SIDECAR_PREFETCH) must be at least 1")
    if args.models < 0 or args.model_load_seconds < 0:
        raise SystemExit("bench: --models and --model-load-seconds must not be negative")
    if args.seconds_per_image < 0 or args.latency_ms < 0 or args.bandwidth_mbit < 0:
        raise SystemExit("bench: --seconds-per-image, --latency-ms and --bandwidth-mbit must not be negative")
    return Scenario(
        jobs=args.jobs,
        seconds_per_image=args.seconds_per_image,
        latency_ms=args.latency_ms,
        bandwidth_mbit=args.bandwidth_mbit,
        prefetch=args.prefetch,
        modes=list(dict.fromkeys(modes)),
        report=Path(args.report),
        seed=args.seed,
        models=args.models,
        model_load_seconds=args.model_load_seconds,
        affinity_max_wait=args.affinity_max_wait,
        a1111_url=args.a1111_url,
    )
