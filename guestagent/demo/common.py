"""What every act of the demo shares: headings, checks, and the agent's own CLI."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from guestagent import process

BUCKET = "guestagent-demo"


class DemoFailed(Exception):
    """A step did not do what it says; the message is the one-line reason."""


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def check(ok: bool, what: str, why: str = "") -> None:
    """Print a verified fact, or stop the demo with the reason."""
    if not ok:
        raise DemoFailed(f"{what}: {why}" if why else what)
    print(f"   ok: {what}", flush=True)


def cli(config: Path, *args: str, timeout: float = 300.0, show: bool = True,
        env: dict[str, str] | None = None) -> process.Result:
    """``guestagent --config CONFIG ARGS`` exactly as a user types it; output echoed."""
    root = str(Path(__file__).resolve().parents[2])
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTAGENT_")}
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH"))
                                              if p)
    child_env.update(env or {})
    print(f"$ guestagent {' '.join(args)}", flush=True)
    res = process.run([sys.executable, "-m", "guestagent", "--config", str(config), *args],
                      timeout=timeout, env=child_env)
    if show:
        _echo(res.stdout)
    if not res.ok:
        err = res.stderr.decode(errors="replace").strip().splitlines()
        raise DemoFailed(f"`guestagent {' '.join(args[:2])}` exited {res.returncode}"
                         f"{': ' + err[-1] if err else ''}")
    return res


def _echo(data: bytes, limit: int = 25) -> None:
    lines = data.decode(errors="replace").splitlines()
    for line in lines[:limit]:
        print("  " + line)
    if len(lines) > limit:
        print(f"  ... ({len(lines) - limit} more lines)")


def log_lines(text: str, needles: Sequence[str]) -> list[str]:
    """The daemon log's lines about ``needles``, without their timestamps."""
    return ["  " + line.split(" ", 2)[-1] for line in text.splitlines()
            if any(n in line for n in needles)]
