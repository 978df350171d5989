"""``guestagent image build`` (``images/build``): a Debian 12 root file system with the agent
baked in, deprovisioned, as a tarball for ``docker import`` and ``systemd-nspawn``.

Steps: the cached debootstrap tree (``rootfs.ensure``) → an overlay over it → the agent
installed by ``images/install-agent`` (the same script Packer runs on a VM) → deprovision
→ tar. Only the first build of a recipe runs debootstrap.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from guestagent import config, process
from guestagent.images import agent, deprovision, nspawn, rootfs, tools


class ImageError(Exception):
    """The build cannot run (``usage``: a missing tool or bad argument) or a step failed."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def build(output: Path, *, cache: Path, mirror: str | None = None,
          keep_tree: Path | None = None) -> dict[str, str]:
    try:
        tools.require("debootstrap", "systemd-nspawn", "tar", "mount")
    except tools.MissingTool as exc:
        raise ImageError(str(exc), usage=True) from None
    if not output.parent.is_dir():
        raise ImageError(f"{output.parent}: no such directory for the tarball", usage=True)
    recipe = rootfs.Recipe(mirror=mirror) if mirror else rootfs.Recipe()
    start = time.monotonic()
    was_cached = rootfs.cached(recipe, cache) is not None
    try:
        base = rootfs.ensure(recipe, cache)
        t_base = time.monotonic() - start
        with tempfile.TemporaryDirectory(prefix="guestagent-image.", dir="/var/tmp") as tmp:
            work = Path(tmp)
            wheels = agent.wheelhouse(agent.checkout_root(), cache, work / "wheels")
            with nspawn.overlay([base], work / "upper", work / "root") as root:
                agent.install(root, wheels, agent.checkout_root())
                _deprovision(root)
                if keep_tree is not None:
                    _copy_tree(root, keep_tree)
                _tar(root, output)
    except (RuntimeError, agent.BuildError, nspawn.BootError, process.ProcessError) as exc:
        raise ImageError(str(exc)) from None
    return {
        "image": str(output),
        "size_mb": f"{output.stat().st_size / 1e6:.1f}",
        "base_tree": f"{'cached' if was_cached else 'built'} in {t_base:.1f}s ({base})",
        "total_seconds": f"{time.monotonic() - start:.1f}",
    }


def _deprovision(root: Path) -> None:
    settings = config.from_mapping({}, {})
    plan = deprovision.plan(root, users=True, state_dir=str(settings.daemon.state_dir),
                            run_dir=str(settings.daemon.run_dir), credential_files=())
    deprovision.check_writable(plan)
    failed = deprovision.execute(plan)
    if failed:
        raise RuntimeError(f"deprovision of the image: {failed[0][0].guest}: {failed[0][1]}")


def _copy_tree(root: Path, dest: Path) -> None:
    if dest.exists() and any(dest.iterdir()):
        raise RuntimeError(f"{dest}: not empty; give --keep-tree a new directory")
    dest.mkdir(parents=True, exist_ok=True)
    result = process.run(["cp", "-a", "--reflink=auto", f"{root}/.", str(dest)], timeout=900)
    if not result.ok:
        raise RuntimeError(f"copying the tree to {dest} failed: {result.stderr.decode()[-200:]}")


def _tar(root: Path, output: Path) -> None:
    partial = output.with_name(output.name + ".part")
    result = process.run(
        ["tar", "--numeric-owner", "--xattrs", "--acls", "-C", str(root),
         f"--exclude=./{rootfs.COMPLETE}", "-czf", str(partial), "."],
        timeout=1800,
    )
    if not result.ok:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"tar failed: {result.stderr.decode(errors='replace')[-200:]}")
    partial.rename(output)
