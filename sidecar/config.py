"""Settings: the only module that reads the environment.

Every variable has the prefix ``SIDECAR_``. A bad value stops the start with one line that names the
variable; secret values (connection strings, keys) are never echoed.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sidecar.errors import ConfigError

# Azure queue names: 3-63 characters, lowercase letters, digits and single hyphens.
_QUEUE_NAME = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")
# Azure blob container names follow the same rule.
_CONTAINER_NAME = _QUEUE_NAME

_SECRET_FIELDS = {"storage_connection_string", "blob_connection_string", "a1111_api_auth"}

# Each try of a request that keeps a lease (renew, release, delete) ends within this many seconds
# at most: a renewal can then be retried before the message becomes visible again, instead of
# waiting on one dead connection for the whole read timeout.
LEASE_REQUEST_TIMEOUT = 10.0


def lease_request_timeout(visibility: float) -> float:
    """Seconds one try of a lease request may take: a sixth of the visibility timeout, at most 10 s,
    so that a renewal begun at half-life has room for a second try before the visibility runs out."""
    return min(LEASE_REQUEST_TIMEOUT, visibility / 6)


def _check_queue_name(name: str) -> str:
    if not _QUEUE_NAME.match(name):
        raise ValueError(
            f"{name!r} is not a valid queue name (3-63 lowercase letters, digits and single hyphens)"
        )
    return name


class Settings(BaseSettings):
    """The worker's configuration (see the README's table)."""

    model_config = SettingsConfigDict(env_prefix="SIDECAR_", extra="ignore", populate_by_name=True)

    a1111_url: str = "http://127.0.0.1:7860"
    a1111_command: str | None = None
    # A1111's --api-auth credential ("user:password"), sent as HTTP Basic; never logged.
    a1111_api_auth: SecretStr | None = None
    storage_connection_string: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "SIDECAR_STORAGE_CONNECTION_STRING",
            "AZURE_STORAGE_CONNECTION_STRING",
            "storage_connection_string",
        ),
    )
    storage_account_url: str | None = None
    # A second credential for the blobs alone (a container SAS from `grant`): one connection string
    # holds one SAS, and no SAS covers both a set of queues and one container only.
    blob_connection_string: SecretStr | None = None
    queue_name: Annotated[list[str], NoDecode] = ["jobs"]
    poison_queue_name: str | None = None
    result_queue_name: str | None = None
    container_name: str = "images"
    # Create missing queues and the container at start (an admin credential): off, so that a typo in
    # a queue's name is an error instead of a new queue no worker reads.
    create_queues: bool = False
    max_dequeue_count: int = Field(default=5, ge=1, le=1000)
    visibility_timeout: int = Field(default=60, ge=2, le=7 * 24 * 3600)
    prefetch: int = Field(default=1, ge=0, le=256)
    # Seconds a held job may be passed over for jobs that keep A1111's checkpoint and LoRAs (0: no
    # reordering); see sidecar.pipeline.affinity.
    affinity_max_wait: float = Field(default=30.0, ge=0, le=3600)
    http_port: int = Field(default=8000, ge=0, le=65535)
    shutdown_grace: float = Field(default=30.0, ge=0)
    # The format A1111 encodes its images in (its global samples_format, set at start) and the blobs
    # are stored in; the quality is A1111's jpeg_quality (JPEG and WEBP; default as A1111's).
    image_format: Literal["png", "webp", "jpeg"] = "png"
    image_quality: int = Field(default=80, ge=1, le=100)

    # Beyond the contract: knobs an operator may need, with production defaults.
    worker_id: str = Field(default_factory=socket.gethostname)
    a1111_start_timeout: float = Field(default=900.0, gt=0)
    generation_timeout: float = Field(default=600.0, gt=0)
    a1111_queue_ahead: bool = True
    upload_concurrency: int = Field(default=4, ge=1, le=64)
    retry_base_delay: float = Field(default=0.5, ge=0)
    retry_max_delay: float = Field(default=30.0, ge=0)
    retry_budget: float = Field(default=60.0, ge=0)
    release_delay: int = Field(default=10, ge=0, le=3600)
    poll_interval_min: float = Field(default=0.1, ge=0)
    poll_interval_max: float = Field(default=10.0, ge=0)
    max_width: int = Field(default=2048, ge=64)
    max_height: int = Field(default=2048, ge=64)
    max_steps: int = Field(default=150, ge=1)
    max_images: int = Field(default=8, ge=1)
    # What the node's A1111 has is checked before each job (LoRAs, checkpoints, VAEs, ...); a miss
    # makes A1111 rescan its folders at most this often, so a file copied onto the node is found.
    asset_refresh_interval: float = Field(default=30.0, ge=0)
    # restore_faces needs CodeFormer/GFPGAN weights, which A1111 downloads on first use; set this when
    # the image has them baked in, otherwise such jobs are handed back for a node that has them.
    face_restoration_available: bool = False
    log_format: str = Field(default="auto", pattern="^(auto|json|text)$")
    summary_interval: float = Field(default=60.0, gt=0)

    @field_validator("image_format", mode="before")
    @classmethod
    def _image_format_name(cls, value: object) -> object:
        # "JPEG" and A1111's own "jpg" mean jpeg too
        if isinstance(value, str):
            value = value.strip().lower()
            return "jpeg" if value == "jpg" else value
        return value

    @field_validator("queue_name", mode="before")
    @classmethod
    def _split_queues(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("queue_name")
    @classmethod
    def _check_queues(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one queue name is needed")
        if len(set(value)) != len(value):
            raise ValueError("a queue is listed twice")
        return [_check_queue_name(name) for name in value]

    @field_validator("poison_queue_name", "result_queue_name")
    @classmethod
    def _check_optional_queue(cls, value: str | None) -> str | None:
        return None if value is None else _check_queue_name(value)

    @field_validator("container_name")
    @classmethod
    def _check_container(cls, value: str) -> str:
        if not _CONTAINER_NAME.match(value):
            raise ValueError(f"{value!r} is not a valid blob container name")
        return value

    @field_validator("a1111_api_auth")
    @classmethod
    def _check_api_auth(cls, value: SecretStr | None) -> SecretStr | None:
        # A1111 splits its --api-auth on "," (pairs) and ":" (user, password): one pair, one colon.
        if value is None:
            return None
        user, colon, password = value.get_secret_value().partition(":")
        if not colon or not user or not password or ":" in password or "," in value.get_secret_value():
            raise ValueError(
                "must be user:password as given to A1111's --api-auth (one pair; A1111 allows no ':' "
                "or ',' inside either part)"
            )
        return value

    @field_validator("a1111_url", "storage_account_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _check_storage(self) -> Settings:
        if self.storage_connection_string is None and self.storage_account_url is None:
            raise ValueError(
                "SIDECAR_STORAGE_CONNECTION_STRING (or AZURE_STORAGE_CONNECTION_STRING) "
                "or SIDECAR_STORAGE_ACCOUNT_URL must be set"
            )
        if self.poison_queue_name and len(self.queue_name) > 1:
            raise ValueError(
                "SIDECAR_POISON_QUEUE_NAME: set it only with a single queue; shards get <queue>-poison"
            )
        if self.poll_interval_max < self.poll_interval_min:
            raise ValueError("SIDECAR_POLL_INTERVAL_MAX must not be below SIDECAR_POLL_INTERVAL_MIN")
        if self.storage_connection_string is None and self.storage_account_url is not None:
            if not self.storage_account_url.startswith("https://"):
                raise ValueError(
                    "SIDECAR_STORAGE_ACCOUNT_URL: Azure AD sign-in sends tokens only over https:// "
                    f"(got {self.storage_account_url!r})"
                )
        for queue in self.queue_name:
            poison = self.poison_queue_for(queue)
            if not _QUEUE_NAME.match(poison):
                raise ValueError(
                    f"SIDECAR_QUEUE_NAME: its poison queue {poison!r} is not a valid queue name "
                    "(at most 63 characters): shorten the queue name or set SIDECAR_POISON_QUEUE_NAME"
                )
        self._check_lease_timing()
        return self

    def _check_lease_timing(self) -> None:
        """A renewal starts at half-life; two tries and the wait between them must fit before the
        message becomes visible again, or a single slow request loses the lease."""
        visibility = self.visibility_timeout
        window = visibility / 2
        wait = min(2 * self.retry_base_delay, self.retry_max_delay)  # the first backoff, jitter included
        if 2 * lease_request_timeout(visibility) + wait <= window:
            return
        needed = 6 * wait if 6 * wait <= 6 * LEASE_REQUEST_TIMEOUT else 2 * wait + 4 * LEASE_REQUEST_TIMEOUT
        raise ValueError(
            f"SIDECAR_VISIBILITY_TIMEOUT: {visibility}s leaves a renewal begun at half-life no room to "
            f"retry before the message becomes visible (two tries of "
            f"{lease_request_timeout(visibility):g}s and a backoff of up to {wait:g}s from "
            f"SIDECAR_RETRY_BASE_DELAY); raise it to at least {math.ceil(needed)} or lower "
            "SIDECAR_RETRY_BASE_DELAY"
        )

    def poison_queue_for(self, queue: str) -> str:
        return self.poison_queue_name or f"{queue}-poison"

    @property
    def connection_string(self) -> str | None:
        secret = self.storage_connection_string
        return secret.get_secret_value() if secret is not None else None

    @property
    def a1111_credentials(self) -> tuple[str, str] | None:
        """(user, password) for A1111's --api-auth, or None."""
        if self.a1111_api_auth is None:
            return None
        user, _, password = self.a1111_api_auth.get_secret_value().partition(":")
        return user, password

    @property
    def blob_connection(self) -> str | None:
        secret = self.blob_connection_string
        return secret.get_secret_value() if secret is not None else None


def _describe(error: ValidationError) -> str:
    """Every problem at once, on one line: ``SIDECAR_A: ...; SIDECAR_B: ...``."""
    return "; ".join(dict.fromkeys(_describe_one(problem) for problem in error.errors()))


def _describe_one(problem: Any) -> str:
    loc = [str(part) for part in problem.get("loc", ())]
    message = str(problem.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc:
        return message
    name = loc[0]
    variable = f"SIDECAR_{name.upper()}"
    if name in _SECRET_FIELDS:
        return f"{variable}: {message}"
    value = problem.get("input")
    shown = (
        f" (got {value!r})" if isinstance(value, str | int | float) and not isinstance(value, bool) else ""
    )
    return f"{variable}: {message}{shown}"


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``SIDECAR_*`` variable that is no setting (a typo is otherwise silently
    ignored), naming the closest known one."""
    known = {f"SIDECAR_{name.upper()}" for name in Settings.model_fields}
    warnings = []
    for name in sorted(os.environ if environ is None else environ):
        if not name.startswith("SIDECAR_") or name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hint = f": did you mean {close[0]}?" if close else " (see the README's Configuration table)"
        warnings.append(f"{name} is not a setting and is ignored{hint}")
    return warnings


def load_settings(overrides: Mapping[str, object] | None = None, env_file: str | None = None) -> Settings:
    """Read the environment (plus ``overrides``); a bad value raises ConfigError with one clear line.

    ``env_file``: ``NAME=value`` lines (what ``grant`` writes) read as well; a variable set in the
    environment wins over the file."""
    if env_file is not None and not os.path.isfile(env_file):
        raise ConfigError(f"--env-file {env_file}: no such file")
    try:
        if env_file is not None:
            return Settings(_env_file=env_file, **dict(overrides or {}))  # type: ignore[arg-type,call-arg]
        return Settings(**dict(overrides or {}))  # type: ignore[arg-type]
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
