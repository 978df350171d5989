"""``guestagent migrate run|check|status|start``.

Exit codes: 0 finished / all checks pass, 1 a pre-check failed, 2 bad user_config.json or
arguments, 3 no daemon to hand the run to, 4 the run stopped (``Goto Aliyun Not Finished!``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from guestagent.cli import (
    EXIT_ABSENT,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    fail,
    load_settings,
)

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    parser = sub.add_parser("migrate", help="migrate this server to an ECS image (go2aliyun)",
                            description=__doc__)
    cmds = parser.add_subparsers(dest="migrate_command", metavar="COMMAND")
    run = cmds.add_parser("run", help="run (or resume) the migration in the foreground")
    _common(run)
    run.set_defaults(handler=_run)
    check = cmds.add_parser("check", help="check user_config.json and this server; "
                            "contacts nothing")
    _common(check)
    check.set_defaults(handler=_check)
    status = cmds.add_parser("status", help="how far the migration got")
    _config(status)
    status.add_argument("--json", action="store_true", help="the whole client_data as JSON")
    status.set_defaults(handler=_status)
    start = cmds.add_parser("start", help="hand the run to the agent daemon (survives logout "
                            "and reboot); follow it with `migrate status`")
    _common(start)
    start.set_defaults(handler=_start)
    parser.set_defaults(handler=lambda args: _help(parser))


def _config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", dest="user_config", default="user_config.json",
                   help="user_config.json (client_data and Logs/ are kept beside it)")


def _common(p: argparse.ArgumentParser) -> None:
    _config(p)
    p.add_argument("--excludes", help="rsync exclude patterns, e.g. rsync_excludes_linux.txt")
    p.add_argument("--root", default="/", help="the tree to migrate (default /)")


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _load(args: argparse.Namespace) -> Any:
    """The config, checked against the tree (sizes included); None after printing why not."""
    from guestagent.migrate import prechecks, userconfig
    from guestagent.migrate.errors import ConfigInvalid

    root = Path(args.root)
    if not root.is_dir():
        print(f"guestagent: --root {root}: not a directory", file=sys.stderr)
        return None
    if args.excludes and not Path(args.excludes).is_file():
        print(f"guestagent: --excludes {args.excludes}: file not found", file=sys.stderr)
        return None
    try:
        return userconfig.load(Path(args.user_config), root, prechecks.used_space)
    except ConfigInvalid as exc:
        for line in exc.lines():
            fail(EXIT_USAGE, line)  # escaped: a value may carry control characters
        return None


def _check(args: argparse.Namespace) -> int:
    from guestagent.migrate import prechecks

    config = _load(args)
    if config is None:
        return EXIT_USAGE
    findings = prechecks.run_all(Path(args.root), config, config.directory)
    for finding in findings:
        for line in finding.lines():
            print(line)
    bad = [f for f in findings if not f.ok and f.fatal]
    print("check: " + ("FAILED" if bad else "passed") + " (nothing was contacted)")
    return EXIT_ABSENT if bad else EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from guestagent.migrate.steps import Migration

    config = _load(args)
    if config is None:
        return EXIT_USAGE
    settings = load_settings(args).migrate
    handler = _log_to(config.directory / "Logs")
    try:
        migration = Migration(config, Path(args.root).resolve(),
                              Path(args.excludes).resolve() if args.excludes else None, settings)
        migration.state.log_file = handler.baseFilename
        ok = migration.run()
    except ValueError as exc:  # unreadable client_data or excludes file
        return fail(EXIT_USAGE, str(exc))
    finally:
        logging.getLogger("guestagent").removeHandler(handler)
        handler.close()
    return EXIT_OK if ok else EXIT_PARTIAL


def _log_to(directory: Path) -> logging.FileHandler:
    directory.mkdir(mode=0o700, exist_ok=True)
    name = datetime.now().strftime("go2aliyun_%Y%m%d-%H%M%S.log")
    handler = logging.FileHandler(directory / name)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    top = logging.getLogger("guestagent")
    previous = top.getEffectiveLevel()
    if previous > logging.INFO:
        # The file gets INFO; the terminal keeps the level it had.
        for other in logging.getLogger().handlers:
            if other.level == logging.NOTSET:
                other.setLevel(previous)
        top.setLevel(logging.INFO)
    top.addHandler(handler)
    return handler


def _status(args: argparse.Namespace) -> int:
    from guestagent.migrate.state import State

    directory = Path(args.user_config).resolve().parent
    job = _daemon_job(args, Path(args.user_config).resolve())
    try:
        state = State.load(directory)
    except ValueError as exc:
        return fail(EXIT_USAGE, str(exc))
    if not state.path.exists():
        if job is not None:
            print(f"migration {job.get('state')} for the agent daemon (`migrate start` at "
                  f"{job.get('submitted_at')}); nothing done yet")
            return EXIT_OK
        print(f"guestagent: no migration has started here ({state.path} not found)",
              file=sys.stderr)
        return EXIT_ABSENT
    if args.json:
        json.dump(state.as_dict() | ({"daemon": job} if job else {}), sys.stdout, indent=2,
                  sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(state.as_dict()))
        if job is not None:
            print(f"daemon: {job.get('state')}" + (f" as {job['unit']}" if job.get("unit")
                                                   else "")
                  + (f", started {job['launches']} time(s) this boot" if job.get("launches")
                     else ""))
    return EXIT_OK if state.result == "finished" else EXIT_ABSENT if not state.result else (
        EXIT_PARTIAL if state.result == "not finished" else EXIT_OK)


def _daemon_job(args: argparse.Namespace, config: Path) -> dict[str, Any] | None:
    """The daemon's job for this config (``migrate start``), if there is one."""
    from guestagent.config import ConfigError
    from guestagent.migrate.jobs import jobs_dir, read_job

    try:
        job = read_job(jobs_dir(load_settings(args).daemon.state_dir))
    except (OSError, ValueError, ConfigError):
        return None
    return job if job and job.get("config") == str(config) else None


def render(s: dict[str, Any]) -> str:
    lines = [f"migration of image {s.get('image_name') or '?'}: {s.get('result') or 'not run'}"
             + (f" (updated {s['updated_at']})" if s.get("updated_at") else "")]
    if s.get("instance_id"):
        lines.append(f"intermediate instance: {s['instance_id']}")
    lines.append("done: " + (", ".join(s.get("done", [])) or "nothing yet"))
    if s.get("current"):
        lines.append(f"current: {s['current']}")
    p = s.get("progress") or {}
    if p and s.get("result") == "running":
        lines.append(f"progress: {p.get('step')} {p.get('percent')}% "
                     f"{int(p.get('bytes', 0)) / 2**20:.1f} MB at {p.get('rate')} "
                     f"ETA {p.get('eta')}")
    for name, t in (s.get("transfers") or {}).items():
        lines.append(f"{name}: sent {t.get('literal', 0)} B of data, matched "
                     f"{t.get('matched', 0)} B already there, {t.get('attempts', 0)} attempt(s)")
    if s.get("image_id"):
        lines.append(f"image: {s['image_id']}")
    lines += list(s.get("last_error") or [])
    if s.get("log_file"):
        lines.append(f"log: {s['log_file']}")
    return "\n".join(lines) + "\n"


def _start(args: argparse.Namespace) -> int:
    from guestagent.migrate.jobs import jobs_dir, submit

    config = _load(args)
    if config is None:
        return EXIT_USAGE
    settings = load_settings(args)
    code = submit(args, config, jobs_dir(settings.daemon.state_dir))
    if code != EXIT_OK:
        return code
    why = _no_runner(settings.daemon.run_dir)
    if why:
        print(f"guestagent: {why}: the migration starts when the agent daemon runs with its "
              "migrate service (`systemctl start guestagent`)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK


def _no_runner(run_dir: Path) -> str | None:
    """Why no daemon will pick the job up now, or None when its migrate service runs."""
    from guestagent import jsonsocket

    path = run_dir / jsonsocket.CONTROL_SOCKET
    try:
        reply = jsonsocket.ask(path, {"command": "status"}, timeout=5.0)
    except jsonsocket.NotListening:
        return f"no guestagent daemon is running (nothing listens on {path})"
    except jsonsocket.SocketError as exc:
        return str(exc)
    if "error" in reply:
        return f"the daemon refused 'status': {reply['error']}"
    service = reply.get("migrate")
    if isinstance(service, dict) and service.get("state") == "disabled":
        return "the daemon's migrate service is disabled (daemon.disabled_services)"
    return None
