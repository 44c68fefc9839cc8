"""The SDK's queue and blob service clients for a connection string or an Azure AD sign-in.

The SDK's own retries are turned off (``sidecar.storage.core`` retries), and proxies are read from
the environment once, here, instead of on every request.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from azure.storage.blob.aio import BlobServiceClient
from azure.storage.queue.aio import QueueServiceClient

from sidecar.errors import ConfigError
from sidecar.storage.settings import StorageSettings

CONNECTION_TIMEOUT = 10
READ_TIMEOUT = 60


def open_clients(settings: StorageSettings) -> tuple[QueueServiceClient, BlobServiceClient]:
    """The queue and blob service clients; ConfigError names the variable that is wrong."""
    options: dict[str, Any] = {
        "retry_total": 0,
        "connection_timeout": CONNECTION_TIMEOUT,
        "read_timeout": READ_TIMEOUT,
        # With env settings on, aiohttp looks up ~/.netrc and the proxy variables in a thread for
        # every request (a sixth of the worker's CPU). Read the proxies once instead (below).
        "use_env_settings": False,
    }
    conn = settings.connection_string
    if conn:
        blob_conn = settings.blob_connection or conn
        blob_variable = "BLOB" if settings.blob_connection else "STORAGE"
        try:
            queues = QueueServiceClient.from_connection_string(conn, **options)
        except ValueError:
            raise ConfigError("SIDECAR_STORAGE_CONNECTION_STRING: not a valid connection string") from None
        try:
            blobs = BlobServiceClient.from_connection_string(blob_conn, **options)
        except ValueError:
            raise ConfigError(
                f"SIDECAR_{blob_variable}_CONNECTION_STRING: not a valid connection string"
            ) from None
        queue_proxies, blob_proxies = _proxies_for(queues.url), _proxies_for(blobs.url)
        if queue_proxies:
            queues = QueueServiceClient.from_connection_string(conn, proxies=queue_proxies, **options)
        if blob_proxies:
            blobs = BlobServiceClient.from_connection_string(blob_conn, proxies=blob_proxies, **options)
        return queues, blobs
    assert settings.storage_account_url is not None
    credential = _default_credential()
    base = settings.storage_account_url
    queue_url = base.replace(".blob.", ".queue.")
    blob_url = base.replace(".queue.", ".blob.")
    try:
        queues = QueueServiceClient(queue_url, credential=credential, **_with_proxies(options, queue_url))
        blobs = BlobServiceClient(blob_url, credential=credential, **_with_proxies(options, blob_url))
    except ValueError as error:
        raise ConfigError(f"SIDECAR_STORAGE_ACCOUNT_URL: {error}") from None
    return queues, blobs


def _proxies_for(url: str) -> dict[str, str]:
    """The proxies from the environment (read once) for requests to ``url``, honouring NO_PROXY."""
    found = urllib.request.getproxies()
    host = urlsplit(url).hostname or ""
    bypass: Callable[[str, dict[str, str]], bool] = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if host and bypass(host, found):
        return {}
    return {scheme: proxy for scheme, proxy in found.items() if scheme in ("http", "https")}


def _with_proxies(options: dict[str, Any], url: str) -> dict[str, Any]:
    proxies = _proxies_for(url)
    return {**options, "proxies": proxies} if proxies else options


def _default_credential() -> Any:
    try:
        from azure.identity.aio import DefaultAzureCredential
    except ImportError:
        raise ConfigError(
            "SIDECAR_STORAGE_ACCOUNT_URL: Azure AD sign-in needs the azure-ad extra "
            "(pip install 'a1111-sidecar[azure-ad]')"
        ) from None
    return DefaultAzureCredential()
