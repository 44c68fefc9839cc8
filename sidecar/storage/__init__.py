"""Azure Queue and Blob Storage: receive, renew, release, delete, poison and idempotent uploads.

The SDK's own retries are turned off; transient failures (connection errors, timeouts, 5xx, 429)
become ``StorageUnavailable`` and are retried here with exponential backoff and jitter, bounded in
time. A 404 MessageNotFound or a pop-receipt mismatch on a message means another consumer owns it:
``LeaseLost``. Everything else storage refuses (credentials, a deleted queue or container, RBAC, an API
version) is ``StorageRefused``, which stops the worker: no retry can fix it.

Every hand-built request percent-encodes its query values as the SDK's request builders do: Azure
form-decodes query strings, and a real pop receipt (base64 of binary data) often holds ``+``.

The modules: ``settings`` (what storage needs of the settings), ``connection`` (the SDK clients),
``refusals`` (``classify``: errors onto the worker's error tree), ``rest`` (the hand-built requests),
``core`` (retries and the deadline), ``queues``, ``blobs``, ``provisioning`` (``ensure``) and
``client`` (``Storage``, which has them all, and the poison queue).
"""

from sidecar.storage.client import Storage
from sidecar.storage.connection import CONNECTION_TIMEOUT, READ_TIMEOUT
from sidecar.storage.core import JSON, LAST_TRY_TIMEOUT, PNG, TEXT, Message
from sidecar.storage.queues import MAX_QUEUE_MESSAGE_BYTES, NEVER_EXPIRES
from sidecar.storage.refusals import classify, transport_reason
from sidecar.storage.rest import child_url as _child_url
from sidecar.storage.settings import StorageSettings

__all__ = [
    "CONNECTION_TIMEOUT",
    "JSON",
    "LAST_TRY_TIMEOUT",
    "MAX_QUEUE_MESSAGE_BYTES",
    "NEVER_EXPIRES",
    "PNG",
    "READ_TIMEOUT",
    "TEXT",
    "Message",
    "Storage",
    "StorageSettings",
    "_child_url",
    "classify",
    "transport_reason",
]
