"""``guestagent run`` (the daemon), ``guestagent status`` and ``guestagent demo``.

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

    from guestagent.daemon import demo

    demo.register(sub)


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
        sys.stdout.write(render(reply))
    return EXIT_OK if reply.get("healthy") else EXIT_ABSENT


def render(reply: dict[str, Any]) -> str:
    """The human form of a status answer."""
    health = "healthy" if reply.get("healthy") else "UNHEALTHY"
    lines = [
        f"guestagent {reply.get('version')} pid {reply.get('pid')}: {reply.get('phase')}, "
        f"{health}, up {_duration(float(reply.get('uptime', 0)))}",
        "",
        f"{'SERVICE':<14}{'STATE':<10}{'OK':<5}{'RESTARTS':<10}LAST ERROR",
    ]
    for svc in reply.get("services", []):
        error = svc.get("last_error") or "-"
        if svc.get("last_error_at"):
            error += f" (at {svc['last_error_at']})"
        lines.append(
            f"{svc['name']:<14}{svc['state']:<10}{'yes' if svc['healthy'] else 'NO':<5}"
            f"{svc['restarts']:<10}{error}"
        )
    creds = reply.get("credentials", {})
    lines.append("")
    if creds.get("state") == "disabled":
        lines.append("credentials: not served")
    else:
        lines.append(f"credentials: last refresh {creds.get('last_refresh') or 'never'}"
                     + (f", expires {creds['expiration']}" if creds.get("expiration") else ""))
    spot = reply.get("spot", {})
    text = f"spot: {spot.get('state', 'unknown')}"
    if spot.get("termination_time"):
        text += f", termination at {spot['termination_time']} (seen {spot.get('seen_at')})"
    elif spot.get("last_poll"):
        text += f", last poll {spot['last_poll']}"
    if spot.get("failing"):
        text += f", POLL FAILING: {spot.get('last_error')}"
    lines.append(text)
    drain = spot.get("drain")
    if drain:
        state = "completed" if drain.get("completed") else f"at {drain.get('current_step')}"
        held = {True: "deadline held", False: "DEADLINE MISSED", None: "deadline pending"}
        lines.append(f"drain: {state}, {held[drain.get('deadline_held')]} "
                     f"(deadline {drain.get('deadline')})")
        for step in drain.get("steps", []):
            lines.append(f"  {step['step']:<14}{step['seconds']:>8.2f}s  "
                         f"{'ok' if step['ok'] else step['error']}")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
