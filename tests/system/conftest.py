"""Booted-system harness: a Debian 12 guest under a real systemd 252, against the local cloud.

- The base tree (``debootstrap --variant=minbase`` + systemd, python3, sudo, chrony) is
  built once and cached under ``/var/cache/guestagent-test/rootfs/<key>`` (key = hash of
  the recipe; ``GUESTAGENT_TEST_CACHE`` moves the cache).
- Once per session, the agent of THIS checkout is installed as on an image
  (``images/install-agent``: wheel into the /opt/guestagent venv, units enabled) into an
  overlay layer over that tree.
- Per test, ``guest_factory(emulator)`` lays a private writable layer over both, points the
  agent at the emulator (``/etc/guestagent/agent.toml``), and returns an unbooted
  :class:`~guestagent.images.nspawn.Machine`: write files through ``guest.path(...)``, then
  ``guest.boot()``; ``guest.run([...])``, ``guest.systemctl(...)``, ``guest.wait_unit(...)``,
  ``guest.journal(...)`` work inside it; teardown powers it off and unmounts.

Where this machine cannot boot systemd in a container (not root, no systemd-nspawn, no
overlayfs, nspawn refuses), every booted test skips with the exact reason.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from system_harness import CACHE, RECIPE, SHARED_HOST_NETWORK, agent_toml

from guestagent.images import agent, nspawn, rootfs, tools

_names = itertools.count(1)


def _unsupported() -> str | None:
    if os.geteuid() != 0:
        return "booting a guest needs root (systemd-nspawn, overlay mounts)"
    try:
        tools.require("systemd-nspawn", "nsenter", "debootstrap")
    except tools.MissingTool as exc:
        return str(exc)
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlay file system (per-guest layers need it)"
    return None


@pytest.fixture(scope="session")
def system_layers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """[agent layer, base tree]: lower layers of every guest (topmost first)."""
    reason = _unsupported()
    if reason:
        pytest.skip(f"cannot boot systemd in a container here: {reason}")
    base = rootfs.ensure(RECIPE, CACHE)
    _probe_boot(base, tmp_path_factory.mktemp("probe"))
    work = tmp_path_factory.mktemp("agent-layer")
    wheels = agent.wheelhouse(agent.checkout_root(), CACHE, work / "wheels")
    layer = work / "layer"
    with nspawn.overlay([base], layer, work / "merged") as merged:
        agent.install(merged, wheels, agent.checkout_root())
    return [layer, base]


def _probe_boot(base: Path, work: Path) -> None:
    """Boot the bare base tree once: a machine that cannot is skipped with nspawn's reason."""
    with nspawn.overlay([base], work / "upper", work / "root") as root:
        machine = nspawn.Machine(root, f"ga-probe-{os.getpid()}", work / "boot.log")
        try:
            machine.boot(timeout=120)
            machine.wait_booted(timeout=120)
        except nspawn.BootError as exc:
            pytest.skip(f"cannot boot systemd in a container here: {exc}")
        finally:
            machine.poweroff()


@pytest.fixture
def guest_factory(system_layers: list[Path]) -> Iterator[Callable[..., nspawn.Machine]]:
    """``make(emulator, config="", files={guest path: text}, nspawn_args=())`` → an unbooted
    guest (``nspawn_args``: more systemd-nspawn options, e.g. ``--bind=/dev/fuse``)."""
    made: list[nspawn.Machine] = []
    with contextlib.ExitStack() as stack:

        def make(
            emulator: Any, config: str = "", files: dict[str, str] | None = None,
            nspawn_args: tuple[str, ...] = (),
        ) -> nspawn.Machine:
            # Under /var/tmp (disk), not a tmpfs: the guest writes its journal and state there.
            work = Path(tempfile.mkdtemp(prefix="guestagent-guest.", dir="/var/tmp"))
            stack.callback(rootfs.remove_tree, work)
            root = stack.enter_context(nspawn.overlay(system_layers, work / "upper", work / "root"))
            machine = nspawn.Machine(root, f"ga-{os.getpid()}-{next(_names)}", work / "boot.log",
                                     extra=nspawn_args)
            stack.callback(machine.poweroff)
            made.append(machine)
            conf = {"/etc/guestagent/agent.toml": agent_toml(emulator, config),
                    **SHARED_HOST_NETWORK, **(files or {})}
            for inside, text in conf.items():
                path = machine.path(inside)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            return machine

        yield make
