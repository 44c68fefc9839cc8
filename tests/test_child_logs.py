"""A1111 as a supervised child, seen in the worker's logs: with JSON logs every line the worker writes
is a JSON object with its ``worker_id``, the child's output included (logger ``a1111``, progress bars
collapsed, escape codes gone, long lines cut); with text logs the child's output passes through raw.

The worker and its child are real processes; the child is the stand-in or a script that writes what
A1111 writes (tqdm bars, colours, warnings, tracebacks).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar.config import Settings
from sidecar.dev.devenv import free_port
from sidecar.storage import Storage
from sidecar.supervisor import LINE_LIMIT, ChildLines
from tests.conftest import ROOT, settings_env, worker_command
from tests.helpers import blob_names

JOB = {"prompt": "a lighthouse at dusk", "sampler_name": "k_euler_a", "steps": 10}
BAR_UPDATES = 400
CHATTER = 3000  # lines on stdout: several pipe buffers' worth


class Worker:
    """``python -m sidecar run`` with its stdout and stderr each in a file of their own."""

    def __init__(self, settings: Settings, *args: str, log_dir: Path) -> None:
        self.out_path, self.err_path = log_dir / "worker.out", log_dir / "worker.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                worker_command(*args), env=settings_env(settings), cwd=ROOT, stdout=out, stderr=err
            )

    def raw(self) -> bytes:
        return self.out_path.read_bytes() + self.err_path.read_bytes()

    def entries(self) -> list[dict[str, Any]]:
        """Every line of stdout and stderr as JSON (fails on the first line that is not)."""
        entries = []
        for path in (self.out_path, self.err_path):
            lines = path.read_bytes().split(b"\n")
            if lines[-1] == b"":  # after the last newline (or an empty file)
                lines.pop()
            for number, line in enumerate(lines, 1):
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    raise AssertionError(f"{path.name} line {number} is not JSON: {line[:300]!r}") from None
        return entries

    def child_lines(self) -> list[dict[str, Any]]:
        return [entry for entry in self.entries() if entry["logger"] == "a1111"]

    async def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.raw()[-3000:].decode()}")
            await asyncio.sleep(0.05)

    async def exit_code(self, timeout: float = 60) -> int:
        await self.wait(lambda: self.proc.poll() is not None, timeout, "the worker to exit")
        return int(self.proc.returncode)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# What A1111 writes on a bad day: a coloured log line, a tqdm bar, a warning, a traceback, much chatter
# on stdout, a line far too long, and a last line without a newline; then it exits 3.
CHILD = textwrap.dedent(
    f"""
    import sys, time, traceback, warnings

    print("\\x1b[32mINFO\\x1b[0m:     Loading \\x1b[1mmodel.safetensors\\x1b[0m", file=sys.stderr, flush=True)
    for i in range({BAR_UPDATES} + 1):
        share, bar = i * 100 // {BAR_UPDATES}, "#" * (i * 20 // {BAR_UPDATES})
        sys.stderr.write(f"\\r\\x1b[34m{{share:3d}}%\\x1b[0m|{{bar:<20}}| {{i}}/{BAR_UPDATES}")
        sys.stderr.flush()
    sys.stderr.write("\\n")
    warnings.warn("the old sampler is deprecated", FutureWarning, stacklevel=1)
    for i in range({CHATTER}):
        print(f"chatter {{i:05d}} " + "." * 80)
    print("y" * 20000, flush=True)
    try:
        raise RuntimeError("CUDA out of memory")
    except RuntimeError:
        traceback.print_exc()
    sys.stderr.write("the child's last words")
    sys.exit(3)
    """
)


def child_command(tmp_path: Path) -> str:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return f"{sys.executable} {script}"


async def test_every_line_is_json_with_the_stand_in_as_child(
    make_settings: Any, storage: Storage, tmp_path: Path
) -> None:
    """The worker runs three jobs on a supervised stand-in logging at info, then stops it: every line on
    its stdout and stderr is JSON with the worker's id, the stand-in's uvicorn lines among them (its
    start and, read to the end after it was stopped, its shutdown)."""
    port = free_port()
    settings = make_settings(
        a1111_command=(
            f"{sys.executable} -m a1111.standin --host 127.0.0.1 --port {port} --log-level info "
            "--seconds-per-image 0.05"
        ),
        a1111_url=f"http://127.0.0.1:{port}",
        log_format="json",
    )
    queue = settings.queue_name[0]
    for index in range(3):
        await storage.send(queue, json.dumps({**JOB, "id": f"child-logs-{index}"}))
    worker = Worker(settings, "--max-jobs", "3", log_dir=tmp_path)
    try:
        assert await worker.exit_code(90) == 0, worker.raw()[-3000:].decode()
    finally:
        worker.stop()
    entries = worker.entries()
    assert {entry.get("worker_id") for entry in entries} == {settings.worker_id}
    assert len([entry for entry in entries if entry["msg"] == "job done"]) == 3
    child = worker.child_lines()
    messages = [entry["msg"] for entry in child]
    assert any("Uvicorn running on" in msg for msg in messages), messages
    assert any("Finished server process" in msg for msg in messages), messages  # after the SIGTERM
    assert {entry["stream"] for entry in child} <= {"stdout", "stderr"}
    assert all(entry["level"] == "info" for entry in child if entry["msg"].startswith("INFO:")), child
    assert worker.out_path.read_bytes() == b""  # all of it is on stderr, the log stream
    assert len(await blob_names(storage)) >= 3


async def test_a_noisy_child_becomes_json_lines(make_settings: Any, tmp_path: Path) -> None:
    """A child writing a tqdm bar (hundreds of \\r updates), colours, a warning, thousands of lines, a
    line of 20,000 characters and a traceback, then exiting 3: every line the worker writes is JSON,
    the bar is one line, nothing is lost (the last words without a newline included, read before the
    exit is reported) and the worker stops on the child's exit."""
    settings = make_settings(
        a1111_command=child_command(tmp_path),
        a1111_url=f"http://127.0.0.1:{free_port()}",  # nothing there: the child never serves
        log_format="json",
    )
    worker = Worker(settings, log_dir=tmp_path)
    try:
        assert await worker.exit_code(60) != 0
    finally:
        worker.stop()
    entries = worker.entries()  # every line JSON
    assert {entry.get("worker_id") for entry in entries} == {settings.worker_id}
    child = worker.child_lines()
    messages = [entry["msg"] for entry in child]
    assert not [msg for msg in messages if "\x1b" in msg or "\r" in msg]

    assert messages[0] == "INFO:     Loading model.safetensors"
    assert child[0]["level"] == "info" and child[0]["stream"] == "stderr"
    bar = [entry for entry in child if f"/{BAR_UPDATES}" in entry["msg"]]
    assert 1 <= len(bar) <= 3, bar
    assert bar[-1]["msg"] == f"100%|{'#' * 20}| {BAR_UPDATES}/{BAR_UPDATES}"
    assert bar[-1]["progress"] is True and bar[-1]["level"] == "info" and "partial" not in bar[-1]

    warning = [entry for entry in child if "FutureWarning: the old sampler is deprecated" in entry["msg"]]
    assert len(warning) == 1 and warning[0]["level"] == "warning"

    chatter = [entry for entry in child if entry["msg"].startswith("chatter ")]
    assert [entry["msg"][:13] for entry in chatter] == [f"chatter {i:05d}" for i in range(CHATTER)]
    assert {(entry["stream"], entry["level"]) for entry in chatter} == {("stdout", "info")}

    long_line = [entry["msg"] for entry in child if entry["msg"].startswith("yyy")]
    assert len(long_line) == 1 and long_line[0].startswith("y" * LINE_LIMIT)
    assert long_line[0].endswith(f"[truncated: {20000 - LINE_LIMIT} more characters]")
    assert len(long_line[0]) < LINE_LIMIT + 100

    start = messages.index("Traceback (most recent call last):")
    end = messages.index("RuntimeError: CUDA out of memory")
    assert end - start >= 2  # the frames between, one line each
    assert {entry["level"] for entry in child[start : end + 1]} == {"error"}

    assert messages[-1] == "the child's last words"
    order = [entry["msg"] for entry in entries]
    exit_line = order.index("A1111 exited with 3")
    assert order.index("the child's last words") < exit_line
    assert entries[exit_line]["logger"] == "sidecar.supervisor" and entries[exit_line]["code"] == 3


async def test_text_logs_pass_the_child_output_through_raw(make_settings: Any, tmp_path: Path) -> None:
    """With text logs the child writes to the worker's stdout and stderr itself, byte for byte."""
    settings = make_settings(
        a1111_command=child_command(tmp_path),
        a1111_url=f"http://127.0.0.1:{free_port()}",
        log_format="text",
    )
    worker = Worker(settings, log_dir=tmp_path)
    try:
        assert await worker.exit_code(60) != 0
    finally:
        worker.stop()
    out, err = worker.out_path.read_bytes(), worker.err_path.read_bytes()
    assert b"\x1b[32mINFO\x1b[0m:     Loading" in err
    assert err.count(b"\r") == BAR_UPDATES + 1
    assert b"chatter 02999 " in out and b"y" * 20000 in out
    assert b"the child's last words" in err
    assert b'"logger": "a1111"' not in err


def test_a_long_bar_yields_one_state_per_interval() -> None:
    """A bar rewritten for 60 s (times given, not waited for): an intermediate state at most every
    10 s, then its final state once the line ends; lines without \\r pass as they are."""
    lines = ChildLines(interval=10.0)
    emitted = lines.feed("before\n", 0.0)
    for step in range(601):  # one update every 0.1 s
        emitted += lines.feed(f"\r{step}/600", step / 10)
    emitted += lines.feed("\nafter\n", 60.0)
    texts = [(line.text, line.partial) for line in emitted]
    assert texts[0] == ("before", False) and texts[-2:] == [("600/600", False), ("after", False)]
    partial = [line for line in emitted if line.partial]
    assert 5 <= len(partial) <= 6
    # each one the latest state when it was due, about 10 s apart
    steps = [int(line.text.split("/")[0]) for line in partial]
    assert all(100 * (n + 1) <= step <= 100 * (n + 1) + 2 for n, step in enumerate(steps)), steps


def test_the_workers_own_warnings_and_a_crash_are_json_lines_too() -> None:
    """Besides the child's: a Python warning and an uncaught exception in a process that configured
    JSON logs come out as JSON lines with its worker_id, not as raw text."""
    code = textwrap.dedent(
        """
        import warnings
        from sidecar import logs

        logs.configure("json", worker_id="node-7")
        warnings.warn("a deprecated call", DeprecationWarning, stacklevel=1)
        raise RuntimeError("out of luck")
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", code], cwd=ROOT, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 1 and done.stdout == b""
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    assert {entry["worker_id"] for entry in entries} == {"node-7"}
    warning, crash = entries
    assert warning["logger"] == "py.warnings" and "a deprecated call" in warning["msg"]
    assert crash["level"] == "critical" and "RuntimeError: out of luck" in crash["exc"]
