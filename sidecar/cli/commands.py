"""What each command does: run, enqueue, status, grant, bench, demo."""

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

from sidecar import logs
from sidecar.app import run_worker
from sidecar.config import load_settings, unknown_variables
from sidecar.errors import SidecarError
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
