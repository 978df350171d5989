"""The host programs an image build needs, each with the Debian package that provides it."""

from __future__ import annotations

import shutil

# program -> Debian package that provides it
PACKAGES = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "tar": "tar",
    "nsenter": "util-linux",
    "mount": "mount",
}


class MissingTool(Exception):
    """A program the build needs is not installed; the message names its Debian package."""


def require(*programs: str) -> dict[str, str]:
    """Paths of ``programs``; MissingTool naming the first absent one and its package."""
    found: dict[str, str] = {}
    for name in programs:
        path = shutil.which(name)
        if path is None:
            package = PACKAGES.get(name, name)
            raise MissingTool(
                f"{name} is not installed: apt-get install {package} (Debian package {package})"
            )
        found[name] = path
    return found
