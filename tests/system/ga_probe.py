"""A service the booted daemon tests plug into the guest's agent
(``daemon.extra_services = ["ga_probe:probe"]``): it mounts a tmpfs, keeps a long-lived
worker outside the agent's life, and deadlocks on request (``touch /run/ga-probe.hang``)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from guestagent import detached, process
from guestagent.files import atomic_write
from guestagent.service import Service

MOUNT = "/mnt/ga-probe"
HANG = Path("/run/ga-probe.hang")
REPORT = Path("/run/ga-probe.worker")


class Probe(Service):
    name = "probe"
    heartbeat_timeout = 3.0

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def run(self, stop: threading.Event) -> None:
        Path(MOUNT).mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(MOUNT):
            process.run(["mount", "-t", "tmpfs", "ga-probe", MOUNT], check=True)
        run_dir = self.ctx.run_dir
        worker = detached.adopt("probe-worker", run_dir=run_dir)
        how = "adopted"
        if worker is None:
            worker = detached.start("probe-worker", ["sleep", "infinity"], run_dir=run_dir)
            how = "started"
        atomic_write(REPORT, f"{how} {worker.pid} {worker.init}\n")
        while not self.wait(stop, 0.5):
            if HANG.exists():
                HANG.unlink()  # once: the restarted agent must not hang again
                threading.Event().wait()  # deadlock: never beats again


def probe(ctx: Any) -> Service:
    return Probe(ctx)
