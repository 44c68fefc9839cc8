"""Credential expiry: a SAS says when it stops working (``se=``); the worker says so before it bites.

A warning from a day before, ``sidecar_credential_expiry_seconds`` on ``/metrics``, and shortly before
the expiry (a tenth of the time left at start, at most a minute, for clock skew) a clean stop with one
line and exit 1, so that the orchestrator restarts the node with the rotated secret instead of the node
failing request by request.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

from sidecar.config import Settings
from sidecar.errors import CredentialExpired

log = logging.getLogger(__name__)

WARN_BEFORE = datetime.timedelta(days=1)
MAX_MARGIN = 60.0


@dataclass(frozen=True)
class Expiry:
    setting: str
    at: datetime.datetime

    def seconds_left(self) -> float:
        return (self.at - datetime.datetime.now(datetime.UTC)).total_seconds()


def sas_expiry(connection_string: str | None) -> datetime.datetime | None:
    """The ``se`` of a connection string's SharedAccessSignature, if it has one."""
    if not connection_string:
        return None
    for part in connection_string.split(";"):
        name, _, value = part.partition("=")
        if name.strip().lower() == "sharedaccesssignature":
            found = parse_qs(value.lstrip("?")).get("se")
            if found:
                text = found[0].replace("Z", "+00:00")
                try:
                    moment = datetime.datetime.fromisoformat(text)
                except ValueError:
                    return None
                return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)
    return None


def earliest_expiry(settings: Settings) -> Expiry | None:
    found = [
        Expiry(setting, at)
        for setting, value in (
            ("SIDECAR_STORAGE_CONNECTION_STRING", settings.connection_string),
            ("SIDECAR_BLOB_CONNECTION_STRING", settings.blob_connection),
        )
        if (at := sas_expiry(value)) is not None
    ]
    return min(found, key=lambda e: e.at) if found else None


async def watch(expiry: Expiry, on_expired: Callable[[CredentialExpired], None]) -> None:
    """Warn a day before, then stop the worker shortly before the credential expires."""
    left = expiry.seconds_left()
    margin = min(MAX_MARGIN, max(0.0, left) / 10)
    when = expiry.at.strftime("%Y-%m-%dT%H:%M:%SZ")
    extra = {"stage": "credentials", "setting": expiry.setting, "expires": when}
    warn_in = left - WARN_BEFORE.total_seconds()
    if warn_in > 0:
        await asyncio.sleep(warn_in)
    log.warning(
        "the SAS in %s expires at %s (in %.1f hours): run grant again and roll the nodes",
        expiry.setting,
        when,
        max(0.0, expiry.seconds_left()) / 3600,
        extra=extra,
    )
    await asyncio.sleep(max(0.0, expiry.seconds_left() - margin))
    on_expired(
        CredentialExpired(
            f"the SAS in {expiry.setting} expires at {when}: stopping before it does; "
            "run grant again and restart the node with the new settings"
        )
    )
