"""Boot a root file system under its own systemd with ``systemd-nspawn``, and work inside it.

The host needs no systemd: the container runs with ``--keep-unit --register=no`` (no
machined, no D-Bus on the host), shares the host's network (so a local cloud on
127.0.0.1 is reachable from the guest), and is entered with ``nsenter`` into its init's
namespaces — ``machinectl``/``systemd-run -M`` need machined, which such a host has not.
Per guest, an overlay file system lays a private writable layer over shared, cached
read-only layers, so a boot costs no copy of the tree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from guestagent import process
from guestagent.images import tools

log = logging.getLogger(__name__)

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NSPAWN_BASE = ("systemd-nspawn", "--quiet", "--register=no", "--keep-unit")


class BootError(Exception):
    """The container did not boot (or not in time); the message carries nspawn's last words."""


def run_in_tree(
    root: Path, argv: Sequence[str], *, binds: Sequence[tuple[Path, str]] = (), timeout: float = 600
) -> process.Result:
    """Run one command inside ``root`` (not booted): for installing into an image tree."""
    tools.require("systemd-nspawn")
    bind_args = [f"--bind-ro={src.resolve()}:{dst}" for src, dst in binds]
    return process.run(
        [*NSPAWN_BASE, f"--directory={root}", *bind_args, "--", *argv], timeout=timeout
    )


@contextlib.contextmanager
def overlay(lowers: Sequence[Path], upper: Path, mountpoint: Path) -> Iterator[Path]:
    """Mount ``upper`` (writable) over ``lowers`` (first is topmost) at ``mountpoint``."""
    work = upper.parent / f"{upper.name}.work"
    for path in (upper, work, mountpoint):
        path.mkdir(parents=True, exist_ok=True)
    lower = ":".join(str(p.resolve()) for p in lowers)
    options = f"lowerdir={lower},upperdir={upper.resolve()},workdir={work.resolve()}"
    result = process.run(["mount", "-t", "overlay", "overlay", "-o", options, str(mountpoint)])
    if not result.ok:
        why = result.stderr.decode(errors="replace").strip()
        raise BootError(f"cannot mount an overlay at {mountpoint}: {why}")
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def unmount(mountpoint: Path) -> None:
    result = process.run(["umount", str(mountpoint)], timeout=60)
    if not result.ok:
        # Busy (a straggler inside still holds it): detach now, the kernel frees it later.
        process.run(["umount", "--lazy", str(mountpoint)], timeout=60)


class Machine:
    """One booted container. ``boot()`` then ``run()``/``systemctl()``; ``poweroff()``."""

    def __init__(self, root: Path, name: str, log_path: Path, extra: Sequence[str] = ()) -> None:
        self.root = root
        self.name = name
        self.log_path = log_path
        self.extra = tuple(extra)
        self.child: process.Child | None = None
        self.leader: int | None = None
        self.booted_at: float | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def boot(self, timeout: float = 180.0) -> Machine:
        tools.require("systemd-nspawn", "nsenter")
        argv = [
            *NSPAWN_BASE,
            "--boot",
            f"--directory={self.root}",
            f"--machine={self.name}",
            "--console=passive",
            # The image's own resolv.conf, timezone and journal: first boot writes them.
            "--resolv-conf=off",
            "--timezone=off",
            "--link-journal=no",
            *self.extra,
        ]
        self.booted_at = time.monotonic()
        self.leader = None
        self.child = process.spawn(argv, name=f"nspawn-{self.name}", log_path=self.log_path)
        end = time.monotonic() + timeout
        while self.leader is None:
            self._check_alive()
            self.leader = self._find_leader()
            if time.monotonic() > end:
                raise BootError(f"{self.name}: no init after {timeout}s; {self.last_words()}")
            time.sleep(0.05)
        return self

    def wait_booted(self, timeout: float = 180.0) -> str:
        """Wait until systemd finished starting up; its verdict (running, degraded)."""
        end = time.monotonic() + timeout
        while True:
            self._check_alive()
            state = self.run(["systemctl", "is-system-running"], timeout=30).text().strip()
            if state in ("running", "degraded"):
                return state
            if time.monotonic() > end:
                raise BootError(f"{self.name}: still {state!r} after {timeout}s")
            time.sleep(0.1)

    def poweroff(self, timeout: float = 120.0) -> int | None:
        """Orderly shutdown (SIGTERM to nspawn halts the container); the exit code."""
        if self.child is None:
            return None
        if self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child.pid, signal.SIGTERM)
        code = self.wait_exit(timeout)
        if code is None:
            log.warning("%s: no orderly halt in %ss; killing it", self.name, timeout)
            code = self.child.stop(grace=10)
        return code

    def wait_exit(self, timeout: float) -> int | None:
        """The container's exit code once it stopped by itself (e.g. powered off), or None."""
        return None if self.child is None else self.child.wait(timeout)

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.poll() is None

    # -- inside the guest ---------------------------------------------------------------------

    def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, input: bytes | None = None
    ) -> process.Result:
        """Run ``argv`` inside the guest (all its namespaces, a clean environment)."""
        if self.leader is None:
            raise BootError(f"{self.name}: not booted")
        wrapped = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={GUEST_PATH}",
                   "LANG=C.UTF-8", *argv]
        return process.run(wrapped, timeout=timeout, input=input)

    def systemctl(self, *args: str, timeout: float = 60.0) -> process.Result:
        return self.run(["systemctl", "--no-pager", *args], timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of ``unit`` as a dict."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).text()
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        return self.run(["journalctl", "--no-pager", "-o", "cat", *args]).text()

    def wait_unit(self, unit: str, state: str = "active", timeout: float = 120.0) -> dict[str, str]:
        """Wait until ``unit`` is in ``state`` (ActiveState); its properties then."""
        end = time.monotonic() + timeout
        while True:
            self._check_alive()
            props = self.show(unit, "ActiveState", "SubState", "Result", "NRestarts")
            if props.get("ActiveState") == state:
                return props
            if time.monotonic() > end:
                raise BootError(f"{self.name}: {unit} is {props} after {timeout}s, not {state}")
            time.sleep(0.1)

    def path(self, inside: str) -> Path:
        """The host path of a guest path (through the mounted root)."""
        return self.root / inside.lstrip("/")

    def last_words(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no output"
        return " | ".join(text[-lines:]) or "no output"

    # -- internals ----------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.child is not None and self.child.poll() is not None:
            raise BootError(
                f"{self.name}: systemd-nspawn exited {self.child.returncode}: {self.last_words()}"
            )

    def _find_leader(self) -> int | None:
        """The container's init: the child of systemd-nspawn that runs systemd."""
        assert self.child is not None
        parent = str(self.child.pid)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
                ppid = stat.rsplit(")", 1)[1].split()[1]
                comm = stat.split("(", 1)[1].rsplit(")", 1)[0]
                if ppid == parent and comm in ("systemd", "init"):
                    return int(entry.name)
        return None
