"""A one-shot service run as a child process (``python -m guestagent run --once NAME``).

First boot imports a lot (templates, YAML, crypt, MIME) and runs once: in a child, none of
it stays resident in a daemon that lives for months.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from datetime import UTC, datetime
from typing import Any

from guestagent import process
from guestagent.service import Service

log = logging.getLogger(__name__)

# Exit codes of ``run --once`` (see guestagent.cli): 3 = metadata unreachable, worth a
# retry; 4 = ran, but part of the work failed (the user's to fix, not retried).
RETRY_CODES = frozenset({3})
PARTIAL = 4
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class ChildOneshot(Service):
    oneshot = True

    def __init__(self, name: str, config_path: str | None, timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        self.argv = [sys.executable, "-m", "guestagent", "run", "--once", name, "--in-daemon"]
        if config_path:
            self.argv += ["--config", config_path]
        self.returncode: int | None = None
        self.finished_at: datetime | None = None
        self.seconds: float | None = None

    def run(self, stop: threading.Event) -> None:
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
        group = f"oneshot:{self.name}"
        done: list[process.Result] = []
        worker = threading.Thread(
            target=lambda: done.append(process.run(self.argv, timeout=self.timeout, env=env,
                                                   group=group)),
            name=f"{self.name}-child", daemon=True)
        worker.start()
        while worker.is_alive():
            if self.wait(stop, 0.5):  # the daemon stops: so does the child, now
                process.end_group(group)
                worker.join()
                log.warning("%s interrupted by the daemon's stop; it runs again next start",
                            self.name)
                return
        if not done:
            raise RuntimeError(f"{self.name}: the child could not be started")
        res = done[0]
        for line in res.stderr.decode(errors="replace").splitlines():
            log.info("%s: %s", self.name, line)
        self.returncode, self.seconds = res.returncode, res.seconds
        self.finished_at = datetime.now(UTC)
        if res.timed_out:
            log.error("%s killed after %.0fs", self.name, self.timeout)
        elif res.returncode in RETRY_CODES:
            raise RuntimeError(f"{self.name} could not reach the metadata service (will retry)")
        elif res.returncode not in (0, PARTIAL):
            raise RuntimeError(f"{self.name} exited {res.returncode}")

    def status(self) -> dict[str, Any]:
        if self.finished_at is None:
            return {}
        return {"exit": self.returncode, "seconds": round(self.seconds or 0.0, 2),
                "finished_at": self.finished_at.strftime("%Y-%m-%dT%H:%M:%SZ")}

    def healthy(self) -> bool:
        return self.returncode in (None, 0)
