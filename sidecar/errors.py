"""The worker's errors, as one small tree.

Every failure the worker acts on is a ``SidecarError``; the branch decides what happens to the job::

    SidecarError
    ├── TransientError        retried with backoff, then the message is released with a delay;
    │   │                     at SIDECAR_MAX_DEQUEUE_COUNT dequeues it goes to the poison queue
    │   ├── A1111Unavailable  connection refused or reset, A1111 not up or gone
    │   ├── A1111Timeout      a generation ran past its deadline (A1111 was interrupted)
    │   ├── A1111ServerError  5xx from A1111 (CUDA out of memory is a 500)
    │   └── StorageUnavailable  connection errors, timeouts, 5xx and 429 (throttling) from Azure Storage
    ├── PermanentError        straight to the poison queue, never retried
    │   ├── InvalidJob        the message is not a valid job (names the field and the reason)
    │   └── A1111Rejected     4xx from A1111 (unknown sampler, validation error)
    ├── LeaseLost             another consumer owns the message now (404 or pop-receipt mismatch):
    │                         the worker stops caring for that job and never deletes the message
    └── ConfigError           a bad setting; the worker does not start
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the worker raises on purpose."""

    @property
    def kind(self) -> str:
        return type(self).__name__


class TransientError(SidecarError):
    """Worth trying again: the job itself is fine."""


class PermanentError(SidecarError):
    """Trying again cannot help: the job goes to the poison queue."""


class A1111Unavailable(TransientError):
    pass


class A1111Timeout(TransientError):
    pass


class A1111ServerError(TransientError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"A1111 answered {status}: {detail}")
        self.status = status
        self.detail = detail


class StorageUnavailable(TransientError):
    pass


class InvalidJob(PermanentError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


class A1111Rejected(PermanentError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"A1111 rejected the job ({status}): {detail}")
        self.status = status
        self.detail = detail


class LeaseLost(SidecarError):
    """The message's pop receipt is no longer ours."""


class ConfigError(SidecarError):
    """A setting is missing or wrong; the message names the variable."""
