"""The agent as it goes into an image: wheels of this checkout and of its runtime
dependencies, installed by ``images/install-agent`` inside the image tree.

``install-agent`` is the one installer for every build path (Packer on a VM, the local
build, the test harness): its own venv under /opt/guestagent, /usr/local/bin/guestagent,
the units, tmpfiles/sysusers entries, and the units enabled.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

from guestagent import process
from guestagent.images import nspawn

# What a wheel is built from (the rest of a checkout — tests, caches — stays out).
SOURCES = ("pyproject.toml", "README.md", "guestagent", "userdata")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")


class BuildError(Exception):
    """A step of the build failed; the message says which and why."""


def checkout_root() -> Path:
    """The repository this module runs from (it holds pyproject.toml and units/)."""
    return Path(__file__).resolve().parents[2]


def _pip_env() -> dict[str, str]:
    # The test suite's network guard (sitecustomize on PYTHONPATH) is for tests, not for
    # pip fetching build inputs; nor must pip see a stray PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def runtime_requirements(checkout: Path) -> list[str]:
    """The runtime dependencies and the ``mounts`` extra (a current rclone) images get."""
    data = tomllib.loads((checkout / "pyproject.toml").read_text())
    project = data["project"]
    extra = project.get("optional-dependencies", {}).get("mounts", [])
    return [str(r) for r in [*project["dependencies"], *extra]]


def dependency_wheels(checkout: Path, cache: Path) -> Path:
    """Wheels of the runtime dependencies, cached per requirement list."""
    reqs = runtime_requirements(checkout)
    key = hashlib.sha256("\n".join([sys.version.split()[0][:4], *reqs]).encode()).hexdigest()
    target = cache / "wheels" / key[:16]
    if (target / ".complete").exists():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=".wheels.", dir=_mkdir(cache / "wheels")))
    result = process.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(tmp), *reqs],
        timeout=900, env=_pip_env(),
    )
    if not result.ok:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BuildError(f"pip wheel of {' '.join(reqs)} failed: {_last_line(result)}")
    (tmp / ".complete").touch()
    if target.exists():
        shutil.rmtree(tmp, ignore_errors=True)  # another builder won the race
    else:
        os.rename(tmp, target)
    return target


def agent_wheel(checkout: Path, dest: Path) -> Path:
    """A wheel of ``checkout`` in ``dest`` (built from a copy: the checkout stays clean)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="guestagent-src.") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in SOURCES:
            path = checkout / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=_IGNORE)
            else:
                shutil.copy2(path, src / name)
        result = process.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(dest),
             str(src)],
            timeout=600, env=_pip_env(),
        )
    if not result.ok:
        raise BuildError(f"pip wheel of the agent failed: {_last_line(result)}")
    wheels = sorted(dest.glob("guestagent-*.whl"))
    if not wheels:
        raise BuildError(f"pip wheel left no guestagent wheel in {dest}")
    return wheels[-1]


def wheelhouse(checkout: Path, cache: Path, dest: Path) -> Path:
    """``dest`` filled with the agent's wheel and its dependencies' wheels."""
    deps = dependency_wheels(checkout, cache)
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in deps.glob("*.whl"):
        shutil.copy2(wheel, dest / wheel.name)
    agent_wheel(checkout, dest)
    return dest


def install(root: Path, wheels: Path, checkout: Path) -> None:
    """Run ``images/install-agent`` inside the image tree ``root``."""
    result = nspawn.run_in_tree(
        root,
        ["/bin/sh", "/run/ga-install", "/run/ga-wheels", "/run/ga-units"],
        binds=[
            (checkout / "images" / "install-agent", "/run/ga-install"),
            (wheels, "/run/ga-wheels"),
            (checkout / "units", "/run/ga-units"),
        ],
    )
    if not result.ok:
        raise BuildError(f"install-agent in {root} failed: {_last_line(result)}")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _last_line(result: process.Result) -> str:
    lines = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
    why = "timed out" if result.timed_out else f"exit {result.returncode}"
    return f"{why}: {lines[-1]}" if lines else why
