"""Settings of the daemon (supervisor, state, status socket): section ``[daemon]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: Path = Path("/var/lib/guestagent")
    run_dir: Path = Path("/run/guestagent")
    log_level: str = "INFO"
    # SIGTERM: drain and stop every service within this many seconds (keep it below the
    # unit's TimeoutStopSec so systemd never has to SIGKILL us).
    stop_timeout: float = 20.0
    # Restart of a failed service: base * 2**(failures-1), capped; a service that stayed up
    # for restart_reset seconds starts again from base.
    restart_backoff: float = 1.0
    restart_backoff_max: float = 60.0
    restart_reset: float = 300.0
    # The same error of one service is logged at most once per this many seconds.
    error_log_period: float = 300.0
    # Extra services, "module:factory" each, started after the built-in ones in list order.
    # factory(context) returns a Service or None (disabled).
    extra_services: list[str] = field(default_factory=list)
    # Built-in services to leave out (by name: userdata, metadata, credentials, spot,
    # maintenance).
    disabled_services: list[str] = field(default_factory=list)
    # Seconds between metadata reachability checks of the "metadata" service.
    metadata_check_interval: float = 60.0

    def validate(self) -> None:
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(
                f"log_level: must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}"
            )
        for name in ("stop_timeout", "restart_backoff", "restart_backoff_max",
                     "metadata_check_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.restart_backoff_max < self.restart_backoff:
            raise ValueError("restart_backoff_max: must be >= restart_backoff")
        if self.error_log_period < 0 or self.restart_reset < 0:
            raise ValueError("error_log_period/restart_reset: must be >= 0")
        for spec in self.extra_services:
            module, sep, attr = spec.partition(":")
            if not sep or not module or not attr:
                raise ValueError(f"extra_services: want 'module:factory', got {spec!r}")
