"""The contract every long-running part of the agent honours, so one supervisor can run,
restart, drain and report on all of them (credentials, spot, first boot, mounts, tasks)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any


class Service(ABC):
    """A supervised service.

    ``run`` blocks until ``stop`` is set; returning early or raising counts as a failure and
    the supervisor restarts it with backoff (unless ``oneshot`` and it returned normally).
    ``drain`` is called on spot termination / shutdown in reverse start order, before
    ``stop`` is set, and must finish by ``deadline`` (a ``time.monotonic()`` value).
    """

    name: str = "service"
    oneshot: bool = False

    @abstractmethod
    def run(self, stop: threading.Event) -> None: ...

    def drain(self, deadline: float) -> None:  # noqa: B027 - optional hook
        """Finish or hand off in-flight work before ``deadline``; default: nothing to do."""

    def status(self) -> dict[str, Any]:
        """Service-specific facts for ``guestagent status`` (no secrets)."""
        return {}

    def healthy(self) -> bool:
        return True
