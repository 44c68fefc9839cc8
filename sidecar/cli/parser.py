"""The command line's grammar: each command's options (``python -m sidecar --help``)."""

from __future__ import annotations

import argparse

from sidecar import __version__
from sidecar.cli.commands import (
    cmd_bench,
    cmd_demo,
    cmd_enqueue,
    cmd_grant,
    cmd_run,
    cmd_status,
)

CREATE_QUEUES_HELP = (
    "create the queues and the container if they are missing (needs an admin credential; also "
    "SIDECAR_CREATE_QUEUES=true); without it a missing queue is an error, so a typo cannot go unseen"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="a1111-sidecar", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="the worker: runs until SIGTERM/SIGINT")
    run.add_argument("--max-jobs", type=int, default=None, help="stop after N finished jobs")
    run.add_argument("--exit-when-empty", action="store_true", help="drain the queue, then exit 0")
    run.add_argument("--create-queues", action="store_true", help=CREATE_QUEUES_HELP)
    run.add_argument(
        "--wait-invisible",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --exit-when-empty: wait up to SECONDS for messages still invisible under other "
        "(perhaps dead) consumers' leases to come back, and run them",
    )
    run.add_argument(
        "--env-file",
        default=None,
        metavar="PATH",
        help="read settings from NAME=value lines too (e.g. written by grant --output); the environment wins",
    )
    run.set_defaults(func=cmd_run, parser=run)

    enq = commands.add_parser("enqueue", help="put jobs on the queue (validated; spread over shards)")
    enq.add_argument("--file", help="JSONL file, one job per line (any size: streamed); - reads stdin")
    enq.add_argument("--generate", type=int, metavar="N", help="generate N benchmark-style jobs")
    enq.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for --generate: the same seed makes the same jobs and ids (default: a new one per run)",
    )
    enq.add_argument("--create-queues", action="store_true", help=CREATE_QUEUES_HELP)
    enq.add_argument(
        "--base64", action="store_true", help="base64-encode messages like Azure Functions producers"
    )
    enq.add_argument("--concurrency", type=int, default=32, help="messages in flight at once (32)")
    enq.add_argument(
        "--route-by-checkpoint",
        action="store_true",
        help="with several queues, send each job to the queue of its checkpoint (a stable hash of its "
        "name over SIDECAR_QUEUE_NAME, or --route) instead of round-robin: one queue per model",
    )
    enq.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="MODEL=QUEUE",
        help="send jobs naming checkpoint MODEL to QUEUE (repeatable; implies --route-by-checkpoint)",
    )
    enq.add_argument(
        "--stop-on-bad",
        action="store_true",
        help="stop at the first invalid line (exit 1) instead of skipping",
    )
    enq.add_argument(
        "--start-line",
        type=int,
        default=1,
        metavar="L",
        help="skip the lines (or generated jobs) before L: resumes a run that stopped",
    )
    enq.add_argument(
        "--ttl",
        type=int,
        default=None,
        metavar="SECONDS",
        help="messages expire after SECONDS (default: never; Azure's own default would be 7 days)",
    )
    enq.set_defaults(func=cmd_enqueue, parser=enq)

    status = commands.add_parser("status", help="queue depth, poison reasons, results")
    status.add_argument("--watch", action="store_true", help="refresh until interrupted, with rates")
    status.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes with --watch")
    status.add_argument("--json", action="store_true", help="one JSON object per refresh")
    status.add_argument(
        "--scan-limit",
        type=int,
        default=100_000,
        metavar="N",
        help="list at most N blobs per refresh to count results (0: do not list)",
    )
    status.set_defaults(func=cmd_status, parser=status)

    grant = commands.add_parser(
        "grant", help="operator: print a node's settings with least-privilege, expiring SAS credentials"
    )
    grant.add_argument("--days", type=float, default=7.0, help="days until the credentials expire (7)")
    grant.add_argument("--json", action="store_true", help="also say what they may and may not do")
    grant.add_argument(
        "--output", default=None, metavar="PATH", help="write the NAME=value lines to PATH (mode 0600)"
    )
    grant.set_defaults(func=cmd_grant, parser=grant)

    bench = commands.add_parser("bench", help="throughput benchmark: sequential vs pipelined, with a report")
    bench.add_argument("--jobs", type=int, default=200, help="jobs per mode")
    bench.add_argument("--seconds-per-image", type=float, default=0.25, help="stand-in GPU time per image")
    bench.add_argument("--latency-ms", type=float, default=40.0, help="round trip added to storage requests")
    bench.add_argument("--bandwidth-mbit", type=float, default=25.0, help="shared uplink; 0 = unlimited")
    bench.add_argument("--prefetch", type=int, default=1, help="SIDECAR_PREFETCH of the pipelined mode")
    bench.add_argument(
        "--modes", default="sequential,pipelined", help="sequential, pipelined and/or queue-order"
    )
    bench.add_argument("--report", default="bench-report", help="folder for the report, chart and logs")
    bench.add_argument("--seed", type=int, default=0, help="seed of the generated jobs")
    bench.add_argument(
        "--models",
        type=int,
        default=0,
        metavar="K",
        help="mixed workload: each job's checkpoint drawn at random from K installed in the stand-in",
    )
    bench.add_argument(
        "--model-load-seconds",
        type=float,
        default=3.0,
        metavar="S",
        help="with --models: the stand-in's seconds per checkpoint load (assumed: 3 s, SD 1.5, local SSD)",
    )
    bench.add_argument(
        "--affinity-max-wait",
        type=float,
        default=None,
        metavar="S",
        help="SIDECAR_AFFINITY_MAX_WAIT of the pipelined mode (default: the worker's); queue-order uses 0",
    )
    bench.add_argument(
        "--a1111-url",
        default=None,
        metavar="URL",
        help="a real A1111 instead of the stand-in (busy and model switches then from the worker's log)",
    )
    bench.set_defaults(func=cmd_bench)

    demo = commands.add_parser("demo", help="Azurite + stand-in A1111 + the worker over sample jobs")
    demo.add_argument("--jobs", default=None, help="JSONL file of jobs (default: the bundled sample jobs)")
    demo.add_argument("--out", default="out", help="where to copy the images")
    demo.set_defaults(func=cmd_demo)
    return parser
