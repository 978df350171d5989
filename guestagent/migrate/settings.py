"""Settings of the migration client: section ``[migrate]``."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class MigrateSettings:
    # The ECS API; empty means the region's public endpoint https://ecs.<region>.aliyuncs.com.
    # The local cloud sets GUESTAGENT_MIGRATE_ENDPOINT to its own.
    endpoint: str = ""
    api_timeout: float = 30.0
    # A transfer cut short by the network is tried again this many times per run.
    transfer_retries: int = 3
    retry_backoff: float = 2.0
    # Requests are refused by the cloud beyond this clock difference (seconds).
    max_clock_skew: float = 900.0
    # `migrate start` leaves the run for the daemon's migrate service in
    # <daemon.state_dir>/migrate.
    job_poll_interval: float = 2.0

    def validate(self) -> None:
        if self.endpoint:
            parts = urlsplit(self.endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"endpoint: want an http(s) URL, got {self.endpoint!r}")
        if self.api_timeout <= 0 or self.retry_backoff < 0 or self.job_poll_interval <= 0:
            raise ValueError("api_timeout/retry_backoff/job_poll_interval: must be positive")
        if not 0 <= self.transfer_retries <= 100:
            raise ValueError(f"transfer_retries: must be 0 to 100, got {self.transfer_retries}")

    def endpoint_for(self, region: str) -> str:
        return self.endpoint.rstrip("/") or f"https://ecs.{region}.aliyuncs.com"
