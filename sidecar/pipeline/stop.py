"""One way to stop, with a reason.

Whatever ends a run (a signal, the queue drained, --max-jobs reached, A1111 gone, storage refusing
us, the credential about to expire, too many failures, an exception nobody planned for, or a start-up
that cannot complete) calls ``Stop.set`` with its ``StopReason``; the lifecycle, the stages and
``/readyz`` read the same object, and the exit code follows from the reason.

Reasons come in three severities:

    graceful  stop fetching, finish what runs, exit 0                  signal, drained, max jobs
    failing   the same drain, but exit non-zero (a sick node)          A1111 gone, too many failures,
                                                                       unexpected
    abort     stop at once, finish nothing, release what is held       storage refused, credential
                                                                       expired, another fatal error,
                                                                       start-up failed

The first reason wins, except that a more severe one overrides a less severe one (A1111 dying after
the queue drained still exits 1; a storage refusal while draining still stops at once). A signal
always starts the grace period, whatever the reason already is.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable
from typing import TypeVar

from sidecar.errors import CredentialExpired, FatalError, SidecarError, StorageRefused

log = logging.getLogger("sidecar.worker")  # the worker's log lines keep their logger's name
T = TypeVar("T")


class Severity(enum.IntEnum):
    GRACEFUL = 0
    FAILING = 1
    ABORT = 2


class StopReason(enum.Enum):
    """Why the worker stops: (what it is, exit code, severity)."""

    SIGNAL = ("signal", 0, Severity.GRACEFUL)
    DRAINED = ("drained", 0, Severity.GRACEFUL)
    MAX_JOBS = ("max jobs", 0, Severity.GRACEFUL)
    A1111_GONE = ("A1111 gone", 1, Severity.FAILING)
    TOO_MANY_FAILURES = ("too many failures", 1, Severity.FAILING)
    UNEXPECTED = ("unexpected error", 1, Severity.FAILING)
    STORAGE_REFUSED = ("storage refused", 1, Severity.ABORT)
    CREDENTIAL_EXPIRED = ("credential expired", 1, Severity.ABORT)
    FATAL = ("fatal error", 1, Severity.ABORT)
    # start-up could not complete
    A1111_NOT_USABLE = ("A1111 not usable", 3, Severity.ABORT)
    STORAGE_NOT_USABLE = ("storage not usable", 1, Severity.ABORT)

    def __init__(self, text: str, exit_code: int, severity: Severity) -> None:
        self.text = text
        self.exit_code = exit_code
        self.severity = severity

    @classmethod
    def of_fatal(cls, error: FatalError) -> StopReason:
        if isinstance(error, StorageRefused):
            return cls.STORAGE_REFUSED
        if isinstance(error, CredentialExpired):
            return cls.CREDENTIAL_EXPIRED
        return cls.FATAL


class Stop:
    """The worker's stop: unset while it runs; once set, a reason (and the error behind it, for the
    reasons that exit non-zero at run time: what ``/readyz`` and the last log line name)."""

    def __init__(self) -> None:
        self.reason: StopReason | None = None
        self.error: SidecarError | None = None
        self._set = asyncio.Event()
        self._signalled = asyncio.Event()
        self._aborted = asyncio.Event()
        self._wakes: list[asyncio.Event] = []

    def set(self, reason: StopReason, error: SidecarError | None = None) -> None:
        """The one place a stop is decided. The first reason wins unless a more severe one comes."""
        if reason is StopReason.SIGNAL:
            self._signalled.set()
        if self.reason is None or reason.severity > self.reason.severity:
            self.reason, self.error = reason, error
        if self.reason.severity is Severity.ABORT:
            self._aborted.set()
        self._set.set()
        for wake in self._wakes:
            wake.set()

    def abort(self, error: FatalError) -> None:
        """Retrying cannot fix this (storage refused us, the credential expires): stop at once."""
        self.set(StopReason.of_fatal(error), error)

    async def guard(self, call: Awaitable[T]) -> T:
        """A storage call. Storage refusing us for good (credentials, a deleted queue or container)
        stops the worker at once; the refusal is raised on, so the stage that met it goes no further.
        Any other exception nobody planned for stops it too (after a drain)."""
        try:
            return await call
        except StorageRefused as error:
            self.abort(error)
            raise
        except (SidecarError, asyncio.CancelledError):
            raise
        except Exception as error:
            log.exception("unexpected error; stopping", extra={"stage": "stop"})
            self.set(StopReason.UNEXPECTED, SidecarError(f"unexpected {type(error).__name__}: {error}"))
            raise

    def also_wake(self, event: asyncio.Event) -> None:
        """Set ``event`` when the stop is set (a stage waiting on it for other reasons too)."""
        self._wakes.append(event)
        if self.is_set:
            event.set()

    @property
    def is_set(self) -> bool:
        """No more fetching."""
        return self._set.is_set()

    @property
    def aborting(self) -> bool:
        """Stopping at once: nothing more is deleted or reported."""
        return self._aborted.is_set()

    @property
    def signalled(self) -> bool:
        """A signal came: the grace period applies."""
        return self._signalled.is_set()

    @property
    def exit_code(self) -> int:
        return 0 if self.reason is None else self.reason.exit_code

    async def wait(self) -> None:
        await self._set.wait()

    async def wait_signalled(self) -> None:
        await self._signalled.wait()

    async def wait_aborted(self) -> None:
        await self._aborted.wait()

    def __repr__(self) -> str:
        return f"Stop({self.reason and self.reason.name}, {self.error!r})"
