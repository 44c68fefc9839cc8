"""``grant``: the credentials a node needs and nothing more, made by the operator with an admin key.

A node on a stranger's PC must not hold the account key: whoever owns the PC can read the container's
environment. ``grant`` signs two shared access signatures with the key, each in a connection string
of its own (a connection string holds one SAS, and no single SAS covers both queues and one
container only):

* ``SIDECAR_STORAGE_CONNECTION_STRING``: an account SAS for the queue service (resource types
  container and object: Azurite files Delete and Update Message under the queue), with exactly what
  the worker calls on messages: ``p`` (process: receive and delete), ``u`` (update: renew and
  release) and ``a`` (add: poison and result messages). No ``r``: it cannot peek or read queue
  metadata; no ``c``/``w``/``d``/``l``: it cannot create, delete, clear or list queues. An account SAS
  cannot name queues: use a storage account for the job queues alone.
* ``SIDECAR_BLOB_CONNECTION_STRING``: a service SAS for the one container, ``w`` only (Put Blob,
  which also overwrites a redelivered job's blobs). It cannot list, read or delete blobs, nor reach
  any other container.

Both expire after ``--days`` days: rotate them by running ``grant`` again and rolling the nodes.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas
from azure.storage.queue import (
    AccountSasPermissions,
    QueueServiceClient,
    ResourceTypes,
    Services,
    generate_account_sas,
)

from sidecar.config import Settings
from sidecar.errors import ConfigError

# What the worker calls, and the permission each needs (see the module docstring).
QUEUE_PERMISSIONS = {
    "p": "receive and delete messages",
    "u": "renew and release messages",
    "a": "add messages (poison, results)",
}
BLOB_PERMISSIONS = {"w": "write (create or overwrite) blobs in the container"}
CANNOT = [
    "peek, read, clear or list queues or their metadata",
    "create or delete queues or containers",
    "list, read or delete blobs",
    "write a blob in any other container",
    "anything at all after the expiry",
]


@dataclass(frozen=True)
class Grant:
    queue_connection: str
    blob_connection: str
    expires: datetime.datetime
    settings: dict[str, str]

    def lines(self) -> list[str]:
        return [f"{name}={value}" for name, value in self.settings.items()]

    def as_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "expires": self.expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "may": {"queues": list(QUEUE_PERMISSIONS.values()), "blobs": list(BLOB_PERMISSIONS.values())},
            "may_not": CANNOT,
        }


def make_grant(
    settings: Settings,
    days: float,
    *,
    queue_permissions: str = "".join(QUEUE_PERMISSIONS),
    blob_permissions: str = "".join(BLOB_PERMISSIONS),
    now: datetime.datetime | None = None,
) -> Grant:
    """The node settings for ``settings``' queues and container. The permission strings are there for
    the test that takes each one away; the defaults are the least the worker needs."""
    admin = settings.connection_string
    if not admin:
        raise ConfigError(
            "SIDECAR_STORAGE_CONNECTION_STRING: grant needs an admin connection string with the account key"
        )
    queues = QueueServiceClient.from_connection_string(admin)
    key = getattr(queues.credential, "account_key", None)
    account = str(queues.account_name or "")
    if not key:
        raise ConfigError(
            "SIDECAR_STORAGE_CONNECTION_STRING: grant needs the account key (AccountKey=...), not a SAS"
        )
    expires = (now or datetime.datetime.now(datetime.UTC)) + datetime.timedelta(days=days)
    queue_sas = generate_account_sas(
        account,
        key,
        ResourceTypes(container=True, object=True),
        AccountSasPermissions(
            process="p" in queue_permissions, update="u" in queue_permissions, add="a" in queue_permissions
        ),
        expiry=expires,
        services=Services(queue=True),
    )
    container = settings.container_name
    blob_sas = generate_container_sas(
        account,
        container,
        account_key=key,
        permission=ContainerSasPermissions(write="w" in blob_permissions),
        expiry=expires,
    )
    queue_endpoint = queues.url.split("?")[0].rstrip("/")
    blob_endpoint = BlobServiceClient.from_connection_string(admin).url.split("?")[0].rstrip("/")
    queue_connection = f"QueueEndpoint={queue_endpoint};SharedAccessSignature={queue_sas}"
    node: dict[str, str] = {
        "SIDECAR_STORAGE_CONNECTION_STRING": queue_connection,
        "SIDECAR_BLOB_CONNECTION_STRING": f"BlobEndpoint={blob_endpoint};SharedAccessSignature={blob_sas}",
        "SIDECAR_QUEUE_NAME": ",".join(settings.queue_name),
        "SIDECAR_CONTAINER_NAME": container,
    }
    if settings.poison_queue_name:
        node["SIDECAR_POISON_QUEUE_NAME"] = settings.poison_queue_name
    if settings.result_queue_name:
        node["SIDECAR_RESULT_QUEUE_NAME"] = settings.result_queue_name
    return Grant(
        node["SIDECAR_STORAGE_CONNECTION_STRING"], node["SIDECAR_BLOB_CONNECTION_STRING"], expires, node
    )


def print_grant(grant: Grant, as_json: bool) -> None:
    if as_json:
        print(json.dumps(grant.as_json(), indent=2))
    else:
        print("\n".join(grant.lines()))


def write_grant(grant: Grant, path: Path) -> None:
    """The NAME=value lines in ``path``, readable by its owner only, replaced in one step."""
    partial = path.with_name(f".{path.name}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write("\n".join(grant.lines()) + "\n")
    os.replace(partial, path)
