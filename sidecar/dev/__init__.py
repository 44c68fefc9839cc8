"""Development tools: the benchmark, the demo, the local emulators and the latency proxy.

Nothing in the product imports this package; the CLI imports it lazily for ``bench`` and ``demo``.
What these tools need beyond the worker (the A1111 stand-in's web server, the chart, process
statistics) comes with the ``tools`` extra: ``pip install 'a1111-sidecar[tools]'``.
"""

from __future__ import annotations

import importlib.util

EXTRA = "tools"
# The modules each command needs that only the extra installs: the stand-in (fastapi, uvicorn with
# httptools) runs as a child process, so a missing one would otherwise show only as its traceback.
_STANDIN = ("fastapi", "uvicorn", "httptools")
NEEDS = {"bench": (*_STANDIN, "matplotlib", "psutil"), "demo": (*_STANDIN, "PIL")}


def missing(command: str) -> list[str]:
    """The modules of the extra that ``command`` needs and this environment lacks."""
    return [name for name in NEEDS[command] if importlib.util.find_spec(name) is None]


def require_extra(command: str) -> None:
    """Stop with one line naming the extra (exit 1) when ``command`` cannot run here."""
    if missing(command):
        raise SystemExit(f"{command} needs the \"{EXTRA}\" extra: pip install 'a1111-sidecar[{EXTRA}]'")
