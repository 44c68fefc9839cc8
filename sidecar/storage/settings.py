"""The slice of the worker's settings that storage uses: where it is, what it is named, how long a
call may take and retry."""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.config import Settings, lease_request_timeout


@dataclass(frozen=True)
class StorageSettings:
    """What ``Storage`` needs of the settings (``from_settings``); the connection strings never show
    in its repr."""

    connection_string: str | None = field(default=None, repr=False)
    blob_connection: str | None = field(default=None, repr=False)  # SIDECAR_BLOB_CONNECTION_STRING
    storage_account_url: str | None = None  # Azure AD sign-in, without a connection string
    queue_name: tuple[str, ...] = ("jobs",)
    poison_queue_name: str | None = None
    result_queue_name: str | None = None
    container_name: str = "images"
    create_queues: bool = False  # ensure() creates what is missing, instead of naming it
    worker_id: str = ""  # names the container probe blob
    visibility_timeout: int = 60
    retry_base_delay: float = 0.5
    retry_max_delay: float = 30.0
    retry_budget: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> StorageSettings:
        return cls(
            connection_string=settings.connection_string,
            blob_connection=settings.blob_connection,
            storage_account_url=settings.storage_account_url,
            queue_name=tuple(settings.queue_name),
            poison_queue_name=settings.poison_queue_name,
            result_queue_name=settings.result_queue_name,
            container_name=settings.container_name,
            create_queues=settings.create_queues,
            worker_id=settings.worker_id,
            visibility_timeout=settings.visibility_timeout,
            retry_base_delay=settings.retry_base_delay,
            retry_max_delay=settings.retry_max_delay,
            retry_budget=settings.retry_budget,
        )

    def poison_queue_for(self, queue: str) -> str:
        return self.poison_queue_name or f"{queue}-poison"

    def all_queues(self) -> list[str]:
        """Every queue the worker uses: the job queues, their poison queues, the results queue."""
        names = list(self.queue_name)
        names += [self.poison_queue_for(queue) for queue in self.queue_name]
        if self.result_queue_name:
            names.append(self.result_queue_name)
        return names

    @property
    def lease_timeout(self) -> float:
        """Seconds one try of a renew, release or delete may take."""
        return lease_request_timeout(self.visibility_timeout)
