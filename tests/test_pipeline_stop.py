"""The stop: which reason wins, the exit code each gives, what aborts, and /readyz reading it."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.endpoints import Health
from sidecar.errors import (
    A1111Unavailable,
    CredentialExpired,
    FatalError,
    SidecarError,
    StorageRefused,
    StorageUnavailable,
)
from sidecar.pipeline.stop import Severity, Stop, StopReason

EXIT_CODES = {
    StopReason.SIGNAL: 0,
    StopReason.DRAINED: 0,
    StopReason.MAX_JOBS: 0,
    StopReason.A1111_GONE: 1,
    StopReason.TOO_MANY_FAILURES: 1,
    StopReason.UNEXPECTED: 1,
    StopReason.STORAGE_REFUSED: 1,
    StopReason.CREDENTIAL_EXPIRED: 1,
    StopReason.FATAL: 1,
    StopReason.A1111_NOT_USABLE: 3,
    StopReason.STORAGE_NOT_USABLE: 1,
}


def refused() -> StorageRefused:
    return StorageRefused("acct", "delete message", 403, "AuthenticationFailed")


def test_every_reason_has_its_exit_code() -> None:
    assert set(EXIT_CODES) == set(StopReason)
    for reason, code in EXIT_CODES.items():
        stop = Stop()
        stop.set(reason)
        assert (reason, stop.exit_code) == (reason, code)


def test_not_stopped_exits_0() -> None:
    stop = Stop()
    assert not stop.is_set and stop.reason is None and stop.exit_code == 0


def test_the_first_reason_wins_among_equals() -> None:
    stop = Stop()
    stop.set(StopReason.DRAINED)
    stop.set(StopReason.MAX_JOBS)
    stop.set(StopReason.SIGNAL)
    assert stop.reason is StopReason.DRAINED

    stop = Stop()
    first = A1111Unavailable("A1111 exited with code -9")
    stop.set(StopReason.A1111_GONE, first)
    stop.set(StopReason.TOO_MANY_FAILURES, SidecarError("5 failures in a row"))
    stop.set(StopReason.A1111_GONE, A1111Unavailable("A1111 unreachable"))
    assert (stop.reason, stop.error) == (StopReason.A1111_GONE, first)


def test_a_failing_reason_overrides_a_graceful_one_and_not_back() -> None:
    stop = Stop()
    stop.set(StopReason.DRAINED)
    gone = A1111Unavailable("A1111 exited with code 1")
    stop.set(StopReason.A1111_GONE, gone)
    assert (stop.reason, stop.error, stop.exit_code) == (StopReason.A1111_GONE, gone, 1)
    stop.set(StopReason.MAX_JOBS)
    assert stop.reason is StopReason.A1111_GONE and stop.exit_code == 1
    assert not stop.aborting  # A1111 gone drains: what runs is finished


def test_an_abort_overrides_a_failing_reason_and_aborts() -> None:
    stop = Stop()
    stop.set(StopReason.TOO_MANY_FAILURES, SidecarError("5 failures in a row"))
    assert not stop.aborting
    error = refused()
    stop.abort(error)
    assert (stop.reason, stop.error, stop.aborting) == (StopReason.STORAGE_REFUSED, error, True)
    stop.set(StopReason.A1111_GONE, A1111Unavailable("gone"))  # later, less severe: no change
    assert stop.error is error and stop.aborting


def test_the_first_abort_wins() -> None:
    stop = Stop()
    first = refused()
    stop.abort(first)
    stop.abort(CredentialExpired("the SAS expires in 5s"))
    assert (stop.reason, stop.error) == (StopReason.STORAGE_REFUSED, first)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (refused(), StopReason.STORAGE_REFUSED),
        (CredentialExpired("expires"), StopReason.CREDENTIAL_EXPIRED),
        (FatalError("A1111 refused the credentials"), StopReason.FATAL),
    ],
)
def test_fatal_errors_name_their_reason(error: FatalError, reason: StopReason) -> None:
    assert StopReason.of_fatal(error) is reason
    assert reason.severity is Severity.ABORT


def test_a_signal_starts_the_grace_period_whatever_won() -> None:
    stop = Stop()
    stop.set(StopReason.A1111_GONE, A1111Unavailable("gone"))
    assert not stop.signalled
    stop.set(StopReason.SIGNAL)
    assert stop.signalled and stop.reason is StopReason.A1111_GONE and stop.exit_code == 1


async def test_waiters_and_wakes_are_told() -> None:
    stop = Stop()
    wake = asyncio.Event()
    stop.also_wake(wake)
    waiting = asyncio.create_task(stop.wait())
    aborted = asyncio.create_task(stop.wait_aborted())
    stop.set(StopReason.MAX_JOBS)
    await waiting
    assert wake.is_set() and not aborted.done()
    stop.abort(refused())
    await aborted
    late = asyncio.Event()
    stop.also_wake(late)  # added after the stop: set at once
    assert late.is_set()


async def test_guard_stops_at_once_on_a_refusal_and_raises_it() -> None:
    stop = Stop()
    error = refused()

    async def call() -> None:
        raise error

    with pytest.raises(StorageRefused):
        await stop.guard(call())
    assert (stop.reason, stop.error, stop.aborting) == (StopReason.STORAGE_REFUSED, error, True)


async def test_guard_lets_transient_errors_through_without_stopping() -> None:
    stop = Stop()

    async def call() -> None:
        raise StorageUnavailable("503 ServerBusy")

    with pytest.raises(StorageUnavailable):
        await stop.guard(call())
    assert not stop.is_set

    async def fine() -> int:
        return 5

    assert await stop.guard(fine()) == 5 and not stop.is_set


async def test_guard_stops_on_what_nobody_planned_for() -> None:
    stop = Stop()

    async def call() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await stop.guard(call())
    assert stop.reason is StopReason.UNEXPECTED and not stop.aborting
    assert str(stop.error) == "unexpected KeyError: 'boom'" and stop.exit_code == 1


def test_readiness_reads_the_stop() -> None:
    stop = Stop()
    health = Health(stop, storage_answering=lambda: True, a1111_warm=True)
    assert health.ready and health.reasons() == []
    stop.set(StopReason.SIGNAL)
    assert not health.ready and health.reasons() == ["draining"]

    stop = Stop()
    health = Health(stop, storage_answering=lambda: True, a1111_warm=True)
    error = refused()
    stop.abort(error)
    assert not health.ready
    assert health.reasons() == [f"stopping: {error}", "draining"]


def test_start_up_failures_are_not_shown_as_a_fault_being_stopped_on() -> None:
    stop = Stop()
    stop.set(StopReason.A1111_NOT_USABLE)
    health = Health(stop, storage_answering=lambda: False)
    assert health.reasons() == ["A1111 has not passed its warm-up", "storage does not answer", "draining"]
