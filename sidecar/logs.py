"""Logging: one JSON object per line in containers, readable text on a terminal.

Fields passed with ``extra=`` (job_id, stage, timings, ...) become keys of the JSON object. In JSON
mode every line also carries ``worker_id``, Python warnings and an uncaught exception become JSON lines
too, and the supervised A1111's output is re-emitted as lines of the ``a1111`` logger
(``sidecar/supervisor.py``): nothing else reaches the stream.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# Account keys, SAS signatures and tokens never reach a log line, whatever message carried them.
_SECRETS = re.compile(r"(?i)(AccountKey=|SharedAccessSignature=|[?&;]sig=|Bearer\s+)([^;&\s\"']+)")


def redact(text: str) -> str:
    return _SECRETS.sub(lambda m: m.group(1) + "***", text)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{key}={value}" for key, value in _extras(record).items())
        line = f"{clock} {record.levelname:<7} {record.getMessage()}" + (f"  [{extras}]" if extras else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class WorkerId(logging.Filter):
    """Adds ``worker_id`` to every record that does not name one itself."""

    def __init__(self, worker_id: str) -> None:
        super().__init__()
        self.worker_id = worker_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "worker_id"):
            record.worker_id = self.worker_id
        return True


def uses_json(fmt: str) -> bool:
    """Whether ``fmt`` (auto, json, text) means JSON lines here: ``auto`` is JSON unless stderr is a TTY."""
    return fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())


def json_active() -> bool:
    """Whether the root logger writes JSON lines (``configure`` chose JSON)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("sidecar").critical("uncaught exception", exc_info=(kind, value, tb))


def configure(fmt: str = "auto", level: int = logging.INFO, worker_id: str | None = None) -> None:
    """Log to stderr as JSON lines or text (``fmt``: auto, json, text). With ``worker_id``, every JSON
    line carries it (text lines stay short: a terminal shows one worker)."""
    use_json = uses_json(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    if use_json and worker_id is not None:
        handler.addFilter(WorkerId(worker_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # In JSON mode nothing may bypass the handler: warnings and a crash's traceback become JSON lines.
    logging.captureWarnings(use_json)
    if use_json:
        sys.excepthook = _log_uncaught
    elif sys.excepthook is _log_uncaught:
        sys.excepthook = sys.__excepthook__
    # The SDK logs every request at INFO; keep only its warnings.
    for noisy in ("azure", "httpx", "httpcore", "aiohttp", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
