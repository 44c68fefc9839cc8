"""Commands: run, enqueue, status, grant, bench, demo (``python -m sidecar --help``).

``commands`` does the work, ``parser`` reads the arguments; ``main`` ties them and turns errors into
one line and an exit code.
"""

from __future__ import annotations

import os
import sys

from sidecar.cli.commands import UsageError, cmd_run
from sidecar.cli.parser import build_parser
from sidecar.config import unknown_variables
from sidecar.errors import ConfigError, SidecarError

__all__ = ["UsageError", "build_parser", "main"]


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
