"""Prepare the received system disk to boot as an ECS instance: fstab and boot loader.

On the instance the system disk is the first virtio disk (``/dev/vda1``), so the root
entry of fstab and the kernel's ``root=`` must name it; the data disks are left unmounted
(as the guide says: the user mounts them after the migration), their lines kept as comments.
"""

from __future__ import annotations

import re
from pathlib import Path

from guestagent.migrate import prechecks
from guestagent.migrate.errors import MigrateError

ROOT_DEVICE = "/dev/vda1"
_ROOT_ARG = re.compile(r"\broot=\S+")


def new_fstab(text: str, data_paths: list[str]) -> str:
    out = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#") or len(fields) < 3:
            out.append(line)
        elif fields[1] == "/":
            out.append("\t".join([ROOT_DEVICE, *fields[1:]]))
        elif fields[1] in data_paths or fields[2] == "swap":
            out.append(f"# go2aliyun: not mounted after migration, mount it yourself: {line}")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def new_grub_cfg(text: str) -> str:
    lines = []
    for line in text.splitlines():
        boot = line.lstrip().startswith(("linux", "kernel")) and "root=" in line
        lines.append(_ROOT_ARG.sub(f"root={ROOT_DEVICE}", line) if boot else line)
    return "\n".join(lines) + "\n"


def grub_config(root: Path) -> Path:
    """The GRUB 2 configuration to adapt; Do Grub Failed when there is none we can set up."""
    version = prechecks.grub_version(root)
    for rel in ("boot/grub/grub.cfg", "boot/grub2/grub.cfg"):
        if (root / rel).is_file() and version and version >= (1, 9):
            return root / rel
    found = "no GRUB" if version is None else f"GRUB {'.'.join(map(str, version))}"
    raise MigrateError(f"the boot loader cannot be set up on the target: {found} on the "
                       "server (GRUB 2, 1.9 or newer, with /boot/grub/grub.cfg is needed)",
                       keyword="Do Grub Failed")


def files_to_write(root: Path, data_paths: list[str]) -> dict[str, bytes]:
    """Relative path in the received tree -> new content."""
    cfg = grub_config(root)
    out = {str(cfg.relative_to(root)): new_grub_cfg(cfg.read_text(errors="replace")).encode()}
    fstab = root / "etc/fstab"
    if fstab.is_file():
        out["etc/fstab"] = new_fstab(fstab.read_text(errors="replace"), data_paths).encode()
    return out
