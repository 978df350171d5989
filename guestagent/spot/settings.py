"""Settings of the spot watcher and drain: section ``[spot]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class SpotSettings:
    enabled: bool = True
    poll_interval: float = 1.0
    # Drain deadline = termination time - margin (room for the final action and the kernel).
    deadline_margin: float = 30.0
    # Executables run in name order on a notice, with GUESTAGENT_TERMINATION_TIME set.
    hooks_dir: Path = Path("/etc/guestagent/spot.d")
    hook_timeout: float = 60.0
    # Hooks are cut this long before the deadline (at most a quarter of the drain's time) so
    # the services' own drain (tasks, uploads, mounts) still has time after them.
    services_reserve: float = 15.0
    # What to do once drained: "none" (just exit 0) or "poweroff" (run poweroff_command).
    final_action: Literal["none", "poweroff"] = "none"
    poweroff_command: list[str] = field(default_factory=lambda: ["systemctl", "poweroff"])
    # Exit the daemon once the drain is done (the instance is going away).
    exit_after_drain: bool = True
    # maintenance/active-system-events: polled this often; new events run these hooks.
    maintenance_enabled: bool = True
    maintenance_interval: float = 10.0
    maintenance_hooks_dir: Path = Path("/etc/guestagent/maintenance.d")

    def validate(self) -> None:
        if self.poll_interval <= 0:
            raise ValueError(f"poll_interval: must be > 0, got {self.poll_interval}")
        if self.deadline_margin < 0:
            raise ValueError(f"deadline_margin: must be >= 0, got {self.deadline_margin}")
        if self.hook_timeout <= 0:
            raise ValueError(f"hook_timeout: must be > 0, got {self.hook_timeout}")
        if self.services_reserve < 0:
            raise ValueError(f"services_reserve: must be >= 0, got {self.services_reserve}")
        if self.maintenance_interval <= 0:
            raise ValueError(
                f"maintenance_interval: must be > 0, got {self.maintenance_interval}"
            )
        if self.final_action == "poweroff" and not self.poweroff_command:
            raise ValueError("poweroff_command: must not be empty when final_action = poweroff")
