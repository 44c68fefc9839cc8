"""``enqueue``'s progress: a tqdm bar on a terminal, plain lines in a log; skipped lines above the bar."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

from sidecar.formatting import format_duration

if TYPE_CHECKING:
    _TqdmBase = tqdm[None]
else:
    _TqdmBase = tqdm


class _Bar(_TqdmBase):
    """tqdm's bar with the fields the formats below name: sent, speed (msg/s) and eta_text."""

    monitor_interval = 0  # no monitor thread: the bar is updated often enough

    @property
    def format_dict(self) -> dict[str, Any]:
        fields = dict(super().format_dict)
        fields.update(_fields(fields["n"], fields["total"], fields["elapsed"], fields["rate"]))
        return fields


def _fields(sent: int, total: float | None, elapsed: float, rate: float | None) -> dict[str, str]:
    if rate is None:
        rate = sent / elapsed if elapsed > 0 else 0.0
    eta = format_duration((total - sent) / rate) if total and rate > 0 else "?"
    return {"sent": f"{sent:,}", "speed": f"{rate:,.0f} msg/s", "eta_text": eta}


class Progress:
    """Messages sent, their rate and, when the input's size is known, the share done and an ETA.

    On a terminal, a tqdm bar redrawn in place. Anywhere else (a log, a pipe) a plain line every
    ``LOG_EVERY`` seconds, without carriage returns or escape codes. A file's share is its bytes read;
    the messages it holds in all are estimated from that for the ETA, never shown as a count.
    """

    LOG_EVERY = 10.0
    WITH_SHARE = "[{bar:24}] {percentage:3.0f}%  {sent} sent  {speed}  ETA {eta_text}"
    WITHOUT_SHARE = "{sent} sent  {speed}"
    PLAIN = "{percentage:3.0f}%  {sent} sent  {speed}  ETA {eta_text}"  # WITH_SHARE without the bar

    def __init__(
        self, total: int | None, fraction: Callable[[], float | None], stream: TextIO = sys.stderr
    ) -> None:
        self.total = total
        self.fraction = fraction
        self.stream = stream
        self.started = self._last = time.monotonic()
        self.bar: _Bar | None = None
        if stream.isatty():
            self.bar = _Bar(
                total=total,
                file=stream,
                mininterval=0.2,
                ascii="-#",
                bar_format=self.WITH_SHARE if total or fraction() is not None else self.WITHOUT_SHARE,
            )

    def _expected(self, sent: int) -> float | None:
        """The messages the input holds in all: given, or estimated from the share of a file read."""
        if self.total:
            return self.total
        fraction = self.fraction()
        return max(float(sent), sent / fraction) if fraction else None

    def update(self, sent: int) -> None:
        if self.bar is not None:
            self.bar.total = self._expected(sent)
            self.bar.update(sent - self.bar.n)
            return
        now = time.monotonic()
        if now - self._last >= self.LOG_EVERY:
            self._last = now
            expected = self._expected(sent)
            fields = _fields(sent, expected, now - self.started, None)
            if expected:
                text = self.PLAIN.format(percentage=100 * min(1.0, sent / expected), **fields)
            else:
                text = self.WITHOUT_SHARE.format(**fields)
            print(f"enqueue: {text}", file=self.stream, flush=True)

    def close(self, sent: int) -> None:
        if self.bar is not None:
            self.bar.total = self._expected(sent)
            self.bar.update(sent - self.bar.n)
            self.bar.close()


def print_bad(progress_stream: TextIO = sys.stderr) -> Callable[[int, str], None]:
    """An ``on_bad`` that reports each skipped line on its own line (the bar redraws below it)."""

    def report(line: int, reason: str) -> None:
        text = f"enqueue: line {line} skipped: {reason}"
        if progress_stream.isatty():
            tqdm.write(text, file=progress_stream)  # above the bar, which is drawn again below it
        else:
            print(text, file=progress_stream, flush=True)

    return report
