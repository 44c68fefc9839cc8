"""What a failed storage call means: the worker's error tree for SDK and transport errors.

Transient failures (connection errors, timeouts, 5xx, 429) are ``StorageUnavailable``; a 404
MessageNotFound or a pop-receipt mismatch on a message is ``LeaseLost``; everything else storage
refuses (credentials, a deleted queue or container, RBAC, an API version) is ``StorageRefused``, with
what an operator should do about it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import aiohttp
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

from sidecar.errors import LeaseLost, SidecarError, StorageRefused, StorageUnavailable

# Refusals of a create that mean "this credential may not", not "this credential is wrong".
MAY_NOT_CREATE = {
    "AuthorizationPermissionMismatch",
    "AuthorizationFailure",
    "AuthorizationResourceTypeMismatch",
}
# What an operator should do about a refusal, by Azure's error code.
HINTS = {
    "AuthenticationFailed": "the account key or SAS is wrong or has expired",
    "InvalidAuthenticationInfo": "the credential is not valid for this account",
    "AuthorizationFailure": "the credential was refused (an expired or too narrow SAS, a firewall, or RBAC)",
    "AuthorizationPermissionMismatch": "the SAS or role does not grant this permission",
    "AuthorizationResourceTypeMismatch": "the SAS does not cover this kind of resource",
    "AuthorizationServiceMismatch": "the SAS does not cover this service",
    "QueueNotFound": "the queue was deleted or never created",
    "ContainerNotFound": "the container was deleted or never created",
    "AccountIsDisabled": "the storage account is disabled",
    "ClientAuthenticationError": "Azure AD sign-in failed: check the identity and its role assignments",
}


# sidecar_storage_errors_total{code}: the codes classify() tells apart, and what a try that got no
# answer (unreachable, timeout) or was turned away for load (throttled) met; any other code is "other".
ERROR_CODES = (
    *sorted({*HINTS, *MAY_NOT_CREATE, "PopReceiptMismatch", "MessageNotFound", "InvalidHeaderValue"}),
    "unreachable",
    "timeout",
    "throttled",
    "other",
)
_THROTTLED = {"ServerBusy"}


def error_label(error: BaseException, mapped: BaseException | None = None) -> str:
    """The ``code`` label of a failed storage try: Azure's error code when it is one of
    ``ERROR_CODES``, else what happened (throttled: 429 or 503 ServerBusy; timeout: 408, 500
    OperationTimedOut or no answer in time; unreachable: no answer), else ``other``."""
    mapped = classify(error) if mapped is None else mapped
    if isinstance(mapped, StorageRefused):
        code = mapped.code
    elif isinstance(error, HttpResponseError) and error.status_code:
        code = error_code(error)
        if code == "OperationTimedOut" or error.status_code == 408:
            return "timeout"
        if code in _THROTTLED or error.status_code in (429, 503):
            return "throttled"
    elif isinstance(mapped, StorageUnavailable):
        return "timeout" if transport_reason(error) == "no answer before the timeout" else "unreachable"
    else:
        return "other"
    return code if code in ERROR_CODES else "other"


def classify(
    error: BaseException, *, message_op: bool = False, account: str = "", operation: str = "a request"
) -> BaseException:
    """Map SDK and transport errors onto the worker's error tree."""
    if isinstance(error, SidecarError):
        return error
    if isinstance(error, ClientAuthenticationError) and not isinstance(error.status_code, int):
        # Azure AD: no token could be had (CredentialUnavailableError is one of these).
        first = (str(error.message or error).strip().splitlines() or [""])[0][:300]
        return StorageRefused(
            account, operation, 0, "ClientAuthenticationError", HINTS["ClientAuthenticationError"], first
        )
    if isinstance(error, HttpResponseError) and error.status_code:
        status = error.status_code
        code = error_code(error)
        if message_op and code in {"PopReceiptMismatch", "MessageNotFound"}:
            return LeaseLost(f"message no longer ours ({status} {code})")
        if status >= 500 or status in (408, 429):
            return StorageUnavailable(f"storage answered {status} {code}".strip())
        return StorageRefused(account, operation, status, code or "no error code", *_hint(error, code))
    if isinstance(error, ServiceRequestError | ServiceResponseError | aiohttp.ClientError | OSError):
        return StorageUnavailable(f"storage unreachable: {transport_reason(error)}")
    if isinstance(error, HttpResponseError):  # no status: the answer never came whole
        return StorageUnavailable(f"storage unreachable: {transport_reason(error)}")
    return error


def error_code(error: HttpResponseError) -> str:
    """Azure's error code of a refusal ("PopReceiptMismatch"), or ""."""
    # error_code is a str enum (StorageErrorCode.POP_RECEIPT_MISMATCH == "PopReceiptMismatch").
    raw = getattr(error, "error_code", None) or ""
    if not raw:  # the hot path's own requests: the code is in a header (the body is XML)
        raw = getattr(error.response, "headers", {}).get("x-ms-error-code") or ""
    return str(getattr(raw, "value", raw))


def _hint(error: HttpResponseError, code: str) -> tuple[str, str]:
    """(what to do, a detail) for a refusal: the API version gets its own words."""
    response: Any = error.response
    if code == "InvalidHeaderValue" and response is not None:
        body = body_text(response)
        sent = response.request.headers.get("x-ms-version", "") if response.request is not None else ""
        if "x-ms-version" in body or "API version" in body:
            served = response.headers.get("x-ms-version", "")
            detail = f"API version {sent} is not served by this endpoint" + (
                f" (it answers with {served})" if served else ""
            )
            return (
                "point the worker at Azure or a current emulator; Azurite needs --skipApiVersionCheck "
                "or a release that knows this version",
                detail,
            )
    return HINTS.get(code, ""), ""


def body_text(response: Any) -> str:
    """A response's body as text, or "" when it cannot be read."""
    with contextlib.suppress(Exception):
        return str(response.text())
    return ""


def transport_reason(error: BaseException) -> str:
    """``host:port`` and the OS's words for a request that never got an answer."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, aiohttp.ClientConnectorDNSError):
            return f"{current.host}:{current.port} name does not resolve"
        if isinstance(current, aiohttp.ClientConnectorError):
            os_error = current.os_error
            reason = os.strerror(os_error.errno) if os_error.errno else (os_error.strerror or str(os_error))
            return f"{current.host}:{current.port} {reason.lower()}"
        if isinstance(current, socket.gaierror):
            return "name does not resolve"
        if isinstance(current, aiohttp.ServerTimeoutError | TimeoutError):
            return "no answer before the timeout"
        if isinstance(current, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
            return "the connection was closed before the answer came"
        inner = getattr(current, "inner_exception", None)
        current = inner if isinstance(inner, BaseException) else (current.__cause__ or current.__context__)
    return type(error).__name__


def may_have_landed(error: BaseException) -> bool:
    """Could the server have carried out a request that got no answer? Only a failed connect (or an
    answer) says for sure that it did not."""
    if isinstance(error, HttpResponseError) and error.status_code:
        return error.status_code >= 500  # the server may have done it before failing to answer
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, aiohttp.ClientConnectorError):
            return False
        inner = getattr(current, "inner_exception", None)
        nxt = inner if isinstance(inner, BaseException) else current.__cause__
        current = nxt if nxt is not current else None
    return True
