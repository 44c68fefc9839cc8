"""Commands: run, enqueue, status, bench, demo (``python -m sidecar --help``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

import uvloop

from sidecar import __version__, logs
from sidecar.app import run_worker
from sidecar.config import load_settings, unknown_variables
from sidecar.errors import ConfigError, SidecarError
from sidecar.formatting import plural
from sidecar.memory import keep_freed_memory
from sidecar.storage import Storage

log = logging.getLogger("sidecar")


class UsageError(Exception):
    """Arguments that do not go together: ``main`` prints the command's usage and exits 2."""


def cmd_run(args: argparse.Namespace) -> int:
    if args.wait_invisible < 0 or (args.wait_invisible and not args.exit_when_empty):
        raise UsageError("--wait-invisible takes seconds >= 0, with --exit-when-empty")
    settings = load_settings(env_file=args.env_file)
    if args.create_queues:
        settings = settings.model_copy(update={"create_queues": True})
    logs.configure(settings.log_format, worker_id=settings.worker_id)
    for warning in unknown_variables():
        log.warning(warning, extra={"stage": "start"})
    keep_freed_memory()
    # libuv's event loop: a third less CPU per job than asyncio's on the upload path.
    return uvloop.run(run_worker(settings, args.max_jobs, args.exit_when_empty, args.wait_invisible))


def cmd_enqueue(args: argparse.Namespace) -> int:
    from sidecar.enqueue import EnqueueStopped, Interrupted, enqueue, generated, lines_of
    from sidecar.jobs import Limits
    from sidecar.progress import print_bad

    if (args.file is None) == (args.generate is None):
        raise UsageError("give exactly one of --file or --generate")
    if args.ttl is not None and args.ttl != -1 and not 1 <= args.ttl <= 7 * 24 * 3600:
        raise UsageError("--ttl must be -1 (never expire) or 1..604800 seconds")
    for name in ("generate", "concurrency", "start_line"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.seed is not None and args.generate is None:
        raise UsageError("--seed goes with --generate")
    settings = load_settings()
    create = args.create_queues or settings.create_queues
    # Without --seed, a seed of this run's own: ids differ from every other run's (a second run would
    # otherwise overwrite the first one's images); it is printed, to make the same jobs again.
    seed = secrets.randbelow(10**9) if args.generate is not None and args.seed is None else args.seed
    try:
        items = (
            lines_of(args.file, args.start_line)
            if args.file
            else generated(args.generate, seed, args.start_line)
        )
    except OSError as error:
        print(f"enqueue: cannot read {args.file}: {error.strerror}", file=sys.stderr)
        return 2
    total = max(0, args.generate - args.start_line + 1) if args.generate is not None else None
    limits = Limits(settings.max_width, settings.max_height, settings.max_steps, settings.max_images)
    routing = None
    if args.route_by_checkpoint or args.route:
        from sidecar.enqueue import Routing

        try:
            routing = Routing(settings.queue_name, Routing.parse(args.route))
        except ValueError as error:
            raise UsageError(str(error)) from None

    async def go() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def interrupt() -> None:
            if stop.is_set():
                os._exit(130)  # a second Ctrl-C: at once
            print("\nenqueue: stopping after the sends in flight (Ctrl-C again to quit now)", file=sys.stderr)
            stop.set()

        storage = Storage.connect(settings)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupt)
        code = 0
        try:
            # creates every queue and the container (an admin setting up), or checks the job queues
            if create:
                await storage.ensure(create=True)
            else:
                await storage.ensure(create=False, queues=settings.queue_name, container=False)
            report = await enqueue(
                storage,
                settings.queue_name,
                items,
                encode_base64=args.base64,
                concurrency=args.concurrency,
                stop_on_bad=args.stop_on_bad,
                limits=limits,
                total=total,
                on_bad=print_bad(),
                stop=stop,
                time_to_live=-1 if args.ttl is None else args.ttl,
                routing=routing,
            )
        except EnqueueStopped as error:
            print(f"enqueue: stopped: {error.reason}", file=sys.stderr)
            report, code = error.report, 130 if isinstance(error, Interrupted) else 1
        except SidecarError as error:
            print(f"enqueue: {error}", file=sys.stderr)
            return 1
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await storage.close()
        shards = ", ".join(f"{queue} ({report.per_queue[queue]:,})" for queue in settings.queue_name)
        print(
            f"sent {plural(report.sent, 'job')} to {shards} in {report.seconds:.1f}s "
            f"({report.rate:,.0f}/s); {plural(report.bad_count, 'bad line')} skipped"
            + (f"; generated with --seed {seed}" if args.generate is not None else "")
        )
        if report.resume_line is not None:
            again = f" --seed {seed}" if args.generate is not None and args.seed is None else ""
            print(
                f"enqueue: every line before {report.resume_line} was sent or skipped; to go on from there, "
                f"run the same command with{again} --start-line {report.resume_line}",
                file=sys.stderr,
            )
        return code

    return asyncio.run(go())


def cmd_status(args: argparse.Namespace) -> int:
    from sidecar.status import show_status

    settings = load_settings()
    return asyncio.run(
        show_status(
            settings, watch=args.watch, interval=args.interval, as_json=args.json, scan_limit=args.scan_limit
        )
    )


def cmd_grant(args: argparse.Namespace) -> int:
    from sidecar.grant import make_grant, print_grant, write_grant

    if not 0 < args.days <= 365:
        raise UsageError("--days must be more than 0 and at most 365")
    settings = load_settings()
    grant = make_grant(settings, args.days)
    if args.output is None:
        print_grant(grant, args.json)
        return 0
    write_grant(grant, Path(args.output))
    print(f"wrote {args.output} (expires {grant.expires:%Y-%m-%dT%H:%M:%SZ})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from sidecar.dev import require_extra

    require_extra("bench")
    from sidecar.dev.bench import run_bench

    return run_bench(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.dev import require_extra

    require_extra("demo")
    from sidecar.dev.demo import demo

    logs.configure("text")
    return asyncio.run(demo(None if args.jobs is None else Path(args.jobs), Path(args.out)))


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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.func is not cmd_run:  # the worker logs them in its own format
        for warning in unknown_variables():
            print(f"a1111-sidecar: warning: {warning}", file=sys.stderr)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except UsageError as error:
        args.parser.error(str(error))  # usage and one line, exit 2
    except BrokenPipeError:
        # `status | head -1`: the reader is gone. As Python's documentation recommends, point stdout at
        # devnull so that the interpreter's own flush at exit does not fail once more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    except ConfigError as error:
        print(f"a1111-sidecar: configuration error: {error}", file=sys.stderr)
        code = 2
    except SidecarError as error:  # storage refusing, say: one line, never a traceback
        print(f"a1111-sidecar: {error}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
