"""``guestagent localcloud up [--with …]``: start the local cloud and print its environment."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

EXIT_OK, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 2, 3


def register(subparsers: Any) -> None:
    from guestagent.localcloud.components import COMPONENTS

    parser = subparsers.add_parser("localcloud", help="the local cloud (emulator + stand-ins)",
                                   description=__doc__)
    sub = parser.add_subparsers(dest="localcloud_command", metavar="COMMAND")
    up = sub.add_parser(
        "up", help="start the local cloud until SIGINT/SIGTERM",
        description="Start the metadata emulator and the stand-ins asked for, print the "
        "environment to use them (shell `export` lines), and run until interrupted.",
    )
    up.add_argument("--with", dest="components", default="", metavar="NAMES",
                    help=f"comma-separated extra components: {', '.join(COMPONENTS)}")
    up.add_argument("--scenario", help="the emulated instance (scenario file)")
    up.add_argument("--workdir", help="keep state here (default: a temporary directory)")
    up.add_argument("--buckets", metavar="NAMES",
                    default=os.environ.get("GUESTAGENT_LOCALCLOUD_BUCKETS", "guestagent"),
                    help="comma-separated buckets the OSS stand-in starts with (default: "
                    "$GUESTAGENT_LOCALCLOUD_BUCKETS, else 'guestagent')")
    up.set_defaults(handler=up_command)
    parser.set_defaults(handler=lambda args: _help(parser))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _fail(code: int, message: str) -> int:
    from guestagent.cli import fail  # one line, control characters escaped, long values cut

    return fail(code, message)


def _buckets(raw: str) -> str | int:
    """The bucket list checked by OSS's naming rule, or the exit code after saying why."""
    from guestagent.storage.errors import BadInput
    from guestagent.storage.ossurl import check_bucket

    names = [b.strip() for b in raw.split(",") if b.strip()]
    try:
        for name in names:
            check_bucket(name, "--buckets")
    except BadInput as exc:
        return _fail(EXIT_USAGE, f"localcloud: {exc}")
    return ",".join(names)


def _initial_env(args: argparse.Namespace, chosen: list[str]) -> dict[str, str] | int:
    """What the components start from, or the exit code after saying why not."""
    env: dict[str, str] = {}
    if {"oss", "oss-rclone"} & set(chosen):
        buckets = _buckets(args.buckets)
        if isinstance(buckets, int):
            return buckets
        # Printed with the exports: which buckets a new user can write to.
        env["GUESTAGENT_LOCALCLOUD_BUCKETS"] = buckets
    if args.scenario:
        from guestagent.localcloud.emulator.scenario import ScenarioError, load_scenario

        try:  # checked before the work directory or any component exists
            load_scenario(args.scenario)
        except ScenarioError as exc:
            return _fail(EXIT_USAGE, f"localcloud: --scenario {exc}")
        env["GUESTAGENT_LOCALCLOUD_SCENARIO"] = str(Path(args.scenario).resolve())
    return env


def up_command(args: argparse.Namespace) -> int:
    from guestagent.localcloud.components import Component, factory, ordered

    names = [n.strip() for n in args.components.split(",") if n.strip()]
    try:
        chosen = ordered(names)
    except ValueError as exc:
        return _fail(EXIT_USAGE, str(exc))
    env = _initial_env(args, chosen)
    if isinstance(env, int):
        return env
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="guestagent-localcloud-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started: list[Component] = []
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name in chosen:
            component = factory(name)(workdir / name, dict(env))
            try:
                env.update(component.start())
            except (OSError, RuntimeError, ValueError) as exc:
                return _fail(EXIT_UNAVAILABLE, f"localcloud: {name} did not start: {exc}")
            started.append(component)
        env.pop("GUESTAGENT_LOCALCLOUD_SCENARIO", None)
        for key, value in env.items():
            print(f"export {key}={shlex.quote(value)}", flush=True)
        print(f"# local cloud up ({', '.join(chosen)}); state in {workdir}", flush=True)
        while not done.wait(0.5):
            pass
        return EXIT_OK
    finally:
        for component in reversed(started):
            with contextlib.suppress(Exception):
                component.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
