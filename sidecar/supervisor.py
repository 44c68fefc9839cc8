"""A1111 as a supervised child (SIDECAR_A1111_COMMAND).

With text logs the child's output goes straight to the sidecar's own stdout/stderr. With JSON logs
(``logs.configure`` chose JSON) the sidecar reads the child's stdout and stderr through pipes and
re-emits every line as a JSON line of the ``a1111`` logger (``ChildLines``: progress bars, escape
codes, long lines; ``ChildLevels``: each line's level). Both pipes are read all the time, by tasks of the
event loop, so a chatty child never blocks on a full pipe; its last lines are read before its exit is
reported.

The exit is noticed at once: the ``on_exit`` callback lets the worker drain, give back held messages and
exit non-zero so the orchestrator restarts the container. After the worker drains on SIGTERM, the child
is stopped too.

The child gets the sidecar's environment without the storage credentials: A1111 runs extensions and
model code, and needs none of them. It keeps ``SIDECAR_A1111_API_AUTH``, from which the image's
``start-webui.sh`` sets A1111's ``--api-auth``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import re
import shlex
import signal
from collections.abc import Callable, Mapping
from typing import NamedTuple

from sidecar import logs

log = logging.getLogger(__name__)
child_log = logging.getLogger("a1111")

LINE_LIMIT = 8192  # characters kept of one line of the child's output; the rest is counted, not kept
PROGRESS_INTERVAL = 10.0  # seconds between two intermediate states of one line rewritten with \r
DRAIN_TIMEOUT = 5.0  # after the child exits, how long its pipes may stay open (a grandchild) before
# the exit is reported anyway
_CHUNK = 65536

# Escape sequences (CSI: colours, cursor moves; OSC: titles; two-byte ones) and the other control
# characters but tab.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]|[\x00-\x08\x0b-\x1f\x7f]"
)
_LEVEL_WORD = re.compile(r"^(?:\S+\s+){0,3}?\[?(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\]?(?::|\s|$)")
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*)?(?:Error|Exception)(?::|\s|$)")
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "FATAL": logging.CRITICAL,
}


# What A1111 may see of the sidecar's settings: its own credential, nothing about storage.
KEPT_FOR_A1111 = {"SIDECAR_A1111_API_AUTH"}


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the sidecar's settings and Azure credentials (connection strings, SAS,
    service principal secrets), except what A1111 itself needs."""
    return {
        name: value
        for name, value in environ.items()
        if name in KEPT_FOR_A1111 or not name.upper().startswith(("SIDECAR_", "AZURE_"))
    }


class Line(NamedTuple):
    text: str
    progress: bool = False  # the line was rewritten with \r: a progress bar
    partial: bool = False  # an intermediate state of such a line, not its last


def clean(text: str) -> str:
    """``text`` without escape sequences and control characters, trailing blanks dropped."""
    return _ANSI.sub("", text).rstrip()


class ChildLines:
    """One of the child's streams, turned from text into log lines.

    A line is text up to ``\\n``. A line rewritten with ``\\r`` (tqdm's bar) yields its final state
    when the ``\\n`` comes; while it is being rewritten, at most one intermediate state (``partial``)
    every ``interval`` seconds. Escape codes are stripped, blank lines dropped, and a line longer than
    ``limit`` characters is cut there with a marker saying how much was left out.
    """

    def __init__(self, limit: int = LINE_LIMIT, interval: float = PROGRESS_INTERVAL) -> None:
        self.limit = limit
        self.interval = interval
        self._segment: list[str] = []  # the text since the last \r or \n, at most `limit` kept
        self._kept = 0
        self._dropped = 0
        self._state: str | None = None  # the latest complete state of a line rewritten with \r
        self._shown: str | None = None  # the last intermediate state emitted
        self._since = 0.0  # when the last intermediate state was emitted (or the rewriting began)

    def feed(self, text: str, now: float) -> list[Line]:
        lines: list[Line] = []
        for piece in re.split(r"([\r\n])", text):
            if piece == "\n":
                lines += self._end_line()
            elif piece == "\r":
                state = self._render()
                if state:
                    if self._state is None:
                        self._since = now
                    self._state = state
                self._clear()
            elif piece:
                self._append(piece)
        return lines + self.tick(now)

    def tick(self, now: float) -> list[Line]:
        """The intermediate state of a line being rewritten, if one is due."""
        due = self.due_in(now)
        if due is None or due > 0 or self._state is None:
            return []
        self._shown, self._since = self._state, now
        return [Line(self._state, progress=True, partial=True)]

    def due_in(self, now: float) -> float | None:
        """Seconds until an intermediate state is due (None: none will be, the line is not rewritten
        or its latest state was shown)."""
        if self._state is None or self._state == self._shown:
            return None
        return max(0.0, self._since + self.interval - now)

    def close(self) -> list[Line]:
        """The end of the stream: what is left of the last line, as if it had ended with ``\\n``."""
        return self._end_line()

    def _end_line(self) -> list[Line]:
        # the text since the last \r, or (after "\r\n", or a bar ended by "\r") the bar's last state
        final = self._render() or self._state
        progress = self._state is not None
        self._clear()
        self._state = self._shown = None
        return [Line(final, progress=progress)] if final else []

    def _append(self, piece: str) -> None:
        room = self.limit - self._kept
        if len(piece) > room:
            self._dropped += len(piece) - room
            piece = piece[:room]
        if piece:
            self._segment.append(piece)
            self._kept += len(piece)

    def _render(self) -> str:
        text = clean("".join(self._segment))
        if self._dropped:
            text += f" ...[truncated: {self._dropped} more characters]"
        return text

    def _clear(self) -> None:
        self._segment, self._kept, self._dropped = [], 0, 0


class ChildLevels:
    """The level of each line of one stream: a log-level word among its first words (``INFO:``,
    ``2024-01-01 12:00:00 WARNING name: ...``) says it; a Python traceback (its header, indented lines and
    the exception line after them) and a line that starts with ``SomethingError``/``...Exception`` are
    errors; a progress bar is info; anything else is info on stdout and a warning on stderr."""

    def __init__(self, stream: str) -> None:
        self.default = logging.INFO if stream == "stdout" else logging.WARNING
        self._traceback = False

    def level(self, line: Line) -> int:
        text = line.text
        if text.startswith("Traceback (most recent call last)"):
            self._traceback = True
            return logging.ERROR
        if self._traceback:
            self._traceback = text[:1].isspace()  # the first unindented line is the exception itself
            return logging.ERROR
        word = _LEVEL_WORD.match(text)
        if word:
            return _LEVELS[word.group(1)]
        if _ERROR_LINE.match(text):
            return logging.ERROR
        return logging.INFO if line.progress else self.default


async def relay_lines(stream: asyncio.StreamReader, name: str) -> None:
    """Read ``stream`` (the child's ``name``: stdout or stderr) to its end, logging its lines."""
    loop = asyncio.get_running_loop()
    lines, levels = ChildLines(), ChildLevels(name)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def emit(batch: list[Line]) -> None:
        for line in batch:
            extra: dict[str, object] = {"stream": name}
            if line.progress:
                extra["progress"] = True
            if line.partial:
                extra["partial"] = True
            child_log.log(levels.level(line), "%s", line.text, extra=extra)

    try:
        while True:
            try:
                chunk = await asyncio.wait_for(stream.read(_CHUNK), lines.due_in(loop.time()))
            except TimeoutError:
                emit(lines.tick(loop.time()))
                continue
            if not chunk:
                break
            emit(lines.feed(decoder.decode(chunk), loop.time()))
        emit(lines.feed(decoder.decode(b"", final=True), loop.time()) + lines.close())
    except asyncio.CancelledError:
        emit(lines.close())
        raise
    except Exception:
        log.exception("cannot relay A1111's %s: reading on without logging it", name)
        while await stream.read(_CHUNK):  # keep the pipe empty: the child must never block on it
            pass


class Supervisor:
    def __init__(
        self,
        command: str,
        on_exit: Callable[[int], None],
        stop_timeout: float = 30.0,
        relay_output: bool | None = None,
    ) -> None:
        """``relay_output``: read the child's output and log it line by line (None: when the logs are
        JSON lines); otherwise the child writes to the sidecar's stdout and stderr itself."""
        self.argv = shlex.split(command)
        self.on_exit = on_exit
        self.stop_timeout = stop_timeout
        self.relay_output = relay_output
        self.drain_timeout = DRAIN_TIMEOUT
        self.process: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._relays: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        relay = logs.json_active() if self.relay_output is None else self.relay_output
        pipe = asyncio.subprocess.PIPE if relay else None
        # A session of its own: stopping A1111 also stops the launcher's children (python, git, ...).
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, start_new_session=True, env=child_environment(os.environ), stdout=pipe, stderr=pipe
        )
        log.info("started A1111", extra={"stage": "a1111_start", "pid": self.process.pid})
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            if stream is not None:
                self._relays.append(asyncio.create_task(relay_lines(stream, name), name=f"a1111-{name}"))
        self._watch = asyncio.create_task(self._wait(), name="a1111-watch")

    async def _wait(self) -> None:
        assert self.process is not None
        code = await self.process.wait()
        unexpected = not self._stopping
        await self._drain()
        if unexpected:
            log.error("A1111 exited with %s", code, extra={"stage": "a1111_exit", "code": code})
            self.on_exit(code)

    async def _drain(self) -> None:
        """Its last lines: the pipes are read to their end (bounded: a grandchild may hold them)."""
        if not self._relays:
            return
        _, open_still = await asyncio.wait(self._relays, timeout=self.drain_timeout)
        if open_still:
            log.warning(
                "A1111's output is still open %.0f s after it exited (a process it started?): no longer read",
                self.drain_timeout,
                extra={"stage": "a1111_exit"},
            )
            for task in open_still:
                task.cancel()
            await asyncio.gather(*open_still, return_exceptions=True)

    async def stop(self) -> None:
        """SIGTERM the child's process group, then SIGKILL after the timeout."""
        self._stopping = True
        process = self.process
        if process is None:
            return
        if process.returncode is not None:  # it exited by itself: its last lines are still read
            if self._watch is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watch
            return
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=self.stop_timeout)
        except TimeoutError:
            self._signal(signal.SIGKILL)
            await process.wait()
        if self._watch is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        log.info("stopped A1111", extra={"stage": "a1111_stop", "code": process.returncode})

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
