"""The worker's errors, as one small tree.

Every failure the worker acts on is a ``SidecarError``; the branch decides what happens to the job.
What retrying cannot fix has two branches: ``PermanentError`` (this job can never succeed: poison it)
and ``FatalError`` (no job can succeed on this node: stop it). No other module defines an error class
of the worker's::

    SidecarError
    ├── TransientError        retried with backoff, then the message is released with a delay;
    │   │                     at SIDECAR_MAX_DEQUEUE_COUNT dequeues it goes to the poison queue
    │   ├── A1111Unavailable  connection refused or reset, A1111 not up or gone
    │   ├── A1111Timeout      a generation ran past its deadline (A1111 was interrupted)
    │   ├── A1111CutShort     an interrupt was sent while this generation may have been running (the
    │   │                     one queued behind a timed-out one): its answer may be a partly denoised
    │   │                     image with a full-length infotext, so it is thrown away and generated
    │   │                     again at once; no failure is counted against the job
    │   ├── A1111ServerError  5xx from A1111 (CUDA out of memory is a 500)
    │   └── StorageUnavailable  connection errors, timeouts, 5xx and 429 (throttling) from Azure Storage
    ├── PermanentError        straight to the poison queue, never retried
    │   ├── InvalidJob        the message is not a valid job (names the field and the reason)
    │   ├── A1111Rejected     4xx from A1111 (unknown sampler, validation error)
    │   ├── UnknownAsset      names a sampler or scheduler no A1111 has (A1111 would silently run
    │   │                     another one)
    │   ├── TooManyTries      received more than SIDECAR_MAX_DEQUEUE_COUNT times (say, a worker died
    │   │                     on it each time): poisoned on receipt, before anything else is done
    │   └── Unexpected        any other exception while handling one message: that message is
    │                         poisoned with the exception's type and text, the worker goes on
    ├── AssetMissing          names a LoRA, checkpoint, VAE, upscaler or style this node lacks (A1111
    │                         would silently run without it): handed back for another node with a
    │                         delay, counted apart from failures; poisoned at SIDECAR_MAX_DEQUEUE_COUNT
    ├── LeaseLost             another consumer owns the message now (404 or pop-receipt mismatch):
    │                         the worker stops caring for that job and never deletes the message
    ├── CatalogError          A1111's asset lists could not be read (unreachable, an error status, an
    │                         unexpected shape): a job it meets is handed back (AssetMissing); at
    │                         start A1111 counts as not usable
    ├── FatalError            retrying cannot fix it and no job can succeed on this node: the worker
    │   │                     stops at once (nothing more is deleted, held messages are released where
    │   │                     storage still allows it, /readyz turns 503) and exits 1
    │   ├── StorageRefused    credentials refused or expired, queue or container deleted, account gone,
    │   │                     403 from a firewall or RBAC, an API version the endpoint does not serve
    │   ├── CredentialExpired the SAS is about to expire: stop before it does (restart with a new one)
    │   └── A1111AuthRefused  A1111 (with --api-auth) refused the sidecar's credentials
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


class A1111CutShort(TransientError):
    pass


class A1111WrongFormat(TransientError):
    """A1111 kept sending images in another format than the one the worker set (its global
    ``samples_format`` changed behind the worker's back, and setting it again did not hold): nothing
    of the generation is stored; the job is not at fault."""


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


class TooManyTries(PermanentError):
    pass


class UnknownAsset(PermanentError):
    pass


class AssetMissing(SidecarError):
    pass


class Unexpected(PermanentError):
    """An exception nobody planned for, met while handling one message; ``kind`` is its type."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}"[:2000])
        self.error = error

    @property
    def kind(self) -> str:
        return type(self.error).__name__


class LeaseLost(SidecarError):
    """The message's pop receipt is no longer ours."""


class CatalogError(SidecarError):
    """A1111's lists could not be read (unreachable, an error status, an unexpected shape)."""


class FatalError(SidecarError):
    """This node can do nothing useful until someone fixes what the message names."""


class StorageRefused(FatalError):
    """Storage refused a request for a reason that retrying cannot fix.

    The text names the account, the operation and Azure's error code, so that the one line the
    worker exits with tells an operator what to fix.
    """

    def __init__(
        self, account: str, operation: str, status: int, code: str, hint: str = "", detail: str = ""
    ) -> None:
        what = f"{status} {code}".strip() if status else code
        text = f"storage account {account or '?'} refused {operation}: {what}"
        if detail:
            text += f" ({detail})"
        if hint:
            text += f"; {hint}"
        super().__init__(text)
        self.account = account
        self.operation = operation
        self.status = status
        self.code = code


class CredentialExpired(FatalError):
    pass


class A1111AuthRefused(FatalError):
    """A1111 (started with --api-auth) refused the sidecar's credentials: no job is at fault, and none
    can run until SIDECAR_A1111_API_AUTH matches."""


class ConfigError(SidecarError):
    """A setting is missing or wrong; the message names the variable."""
