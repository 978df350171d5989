"""``guestagent run`` (the daemon) and ``guestagent status`` (``guestagent demo`` is its own
module, so the daemon never imports it).

``status`` exits 0 when every service is healthy, 1 when something is not, 3 when no
daemon answers.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from guestagent.cli import EXIT_ABSENT, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, fail, load_settings


def register(sub: Any) -> None:
    run = sub.add_parser("run", help="run the agent daemon (what the image's unit starts)")
    _config_arg(run)
    run.add_argument("--once", metavar="SERVICE", action="append",
                     help="run only this one-shot service to completion and exit "
                          "(e.g. userdata: both first-boot stages at once)")
    run.add_argument("--in-daemon", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(handler=_run)

    status = sub.add_parser("status", help="ask the running daemon how it is")
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    status.add_argument("--socket", help="control socket (default: <run_dir>/control.sock)")
    status.set_defaults(handler=_status)


def _config_arg(parser: argparse.ArgumentParser) -> None:
    # Also accepted after the sub-command; SUPPRESS keeps a top-level --config intact.
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="settings file (default /etc/guestagent/agent.toml)")


def _run(args: argparse.Namespace) -> int:
    from guestagent.daemon.agent import run_daemon, run_once
    from guestagent.daemon.lock import AlreadyRunning

    settings = load_settings(args)
    try:
        if args.once:
            return run_once(settings, args.once, args.verbose,
                            getattr(args, "in_daemon", False))
        return run_daemon(settings, getattr(args, "config", None), args.verbose)
    except AlreadyRunning as exc:
        return fail(EXIT_USAGE, str(exc))
    except (ValueError, OSError) as exc:
        # Bad extra_services entry, unwritable state dir, socket in use: one line, no trace.
        return fail(EXIT_USAGE, f"cannot start the daemon: {exc}")


def _status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from guestagent.daemon import control

    if args.socket:
        path = Path(args.socket)
    else:
        path = load_settings(args).daemon.run_dir / control.SOCKET_NAME
    try:
        reply = control.ask(path, "status")
    except control.ControlError as exc:
        return fail(EXIT_UNAVAILABLE, str(exc))
    if args.json:
        json.dump(reply, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from guestagent.daemon.render import render

        sys.stdout.write(render(reply))
    return EXIT_OK if reply.get("healthy") else EXIT_ABSENT
