"""``guestagent storage mount/umount/mounts/nas``: read-only OSS mounts and NAS plans.

A mount made here keeps running after the command returns (rclone in its own session);
it is recorded under ``<run_dir>/storage/mounts/`` so ``storage mounts`` shows it with its
health, ``storage umount`` ends it and the daemon's storage service supervises it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from guestagent.storage.errors import BadInput, StorageError

EXIT_OK, EXIT_ABSENT, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
CLI_USER = "cli"  # the storage service's CLI_USER: the same user


def register(sub: Any) -> None:
    """Add the mount commands to ``storage``'s sub-command parsers."""
    p = sub.add_parser("mount", help="mount an OSS directory read-only (or a NAS export)")
    p.add_argument("source", help="oss://bucket/dir/ or nas://host:/path/")
    p.add_argument("dest", help="local directory (empty or new)")
    _nas_flags(p)
    p.add_argument("--json", action="store_true", help="print the mount as JSON")
    p.set_defaults(handler=_guard(cmd_mount))

    p = sub.add_parser("umount", help="unmount (lazily) a mount made by the agent")
    p.add_argument("dest")
    p.set_defaults(handler=_guard(cmd_umount))

    p = sub.add_parser("mounts", help="the agent's OSS mounts and their health")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_guard(cmd_mounts))

    nas = sub.add_parser("nas", help="NAS (NFS) mount plans, preflight and mounts")
    nsub = nas.add_subparsers(dest="nas_command", metavar="COMMAND")
    p = nsub.add_parser("plan", help="print the units, fstab line and mount command")
    p.add_argument("source", help="nas://<id>.<region>.nas.aliyuncs.com:/path/")
    p.add_argument("dest")
    _nas_flags(p)
    p.add_argument("--fstab", action="store_true", help="print only the fstab line")
    p.set_defaults(handler=_guard(cmd_nas_plan))
    p = nsub.add_parser("preflight", help="check name, TCP 2049 and the export")
    p.add_argument("source")
    p.add_argument("--port", type=int, default=2049)
    p.add_argument("--mount-port", type=int, default=None)
    p.set_defaults(handler=_guard(cmd_nas_preflight))
    p = nsub.add_parser("mount", help="preflight, write the units and start the mount")
    p.add_argument("source")
    p.add_argument("dest")
    _nas_flags(p)
    p.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"))
    p.set_defaults(handler=_guard(cmd_nas_mount))


def _nas_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", dest="nfs_version", choices=("3", "4.0"), default=None,
                   help="NFS version (default: [storage] nas_version)")
    p.add_argument("--lock", action="store_true", default=None, help="keep NFS locks")
    p.add_argument("--automount", action="store_true", default=None, help="mount on first use")
    p.add_argument("--read-only", action="store_true", help="mount read-only")


def _guard(fn: Any) -> Any:
    def handler(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except BadInput as exc:
            return _fail(EXIT_USAGE, str(exc))
        except StorageError as exc:
            return _fail(EXIT_UNAVAILABLE, str(exc))

    return handler


def _fail(code: int, message: str) -> int:
    from guestagent.cli import fail  # one line, control characters escaped, long values cut

    return fail(code, message)


def _settings(args: argparse.Namespace) -> Any:
    from guestagent.cli import load_settings

    return load_settings(args)


def _entry(source: str, dest: str, write: bool) -> Any:
    from guestagent.storage.mappings import mount_entry

    return mount_entry({"Source": source, "Destination": dest, "WriteSupport": write}, "mount")


# -- OSS -----------------------------------------------------------------------------------

def cmd_mount(args: argparse.Namespace) -> int:
    if args.source.startswith("nas://"):
        return cmd_nas_mount(args)
    from guestagent.storage.api import mount_options, rclone_remote
    from guestagent.storage.mounts import Mount, MountTable

    entry = _entry(args.source, args.dest, False)
    settings = _settings(args)
    # Counted in as "cli" until ``storage umount``: the mount outlives this command, and
    # another user (a task, the daemon) sharing the directory keeps it after the umount.
    mount = MountTable().add(Mount(entry.source, Path(entry.destination),
                                   rclone_remote(settings, os.environ),
                                   mount_options(settings), origin="cli"), CLI_USER)
    mount.let_go()  # the daemon's storage service supervises it from now on
    if args.json:
        print(json.dumps(mount.describe()))
    else:
        pid = mount.proc.pid if mount.proc else "?"
        print(f"mounted {mount.source} at {mount.dest} (read-only, pid {pid})")
    return EXIT_OK


def _recorded(settings: Any) -> list[Any]:
    """Mount objects for every record, adopted (health checked, nothing changed)."""
    from guestagent.storage.api import mount_options
    from guestagent.storage.mounts import Mount, RcloneRemote, records
    from guestagent.storage.ossurl import OssUrl

    options = mount_options(settings)
    out = []
    for record in records(options.run_dir):
        try:
            source = OssUrl.parse(str(record.get("source")))
        except BadInput:
            continue
        # Only the process is looked at: no remote is needed to check or stop it.
        mount = Mount(source, Path(str(record.get("dest"))), RcloneRemote("", ""), options,
                      origin=str(record.get("origin", "cli")))
        mount.adopt(record)
        out.append(mount)
    return out


def cmd_mounts(args: argparse.Namespace) -> int:
    mounts = _recorded(_settings(args))
    for m in mounts:
        m.check()
    rows = [m.describe() for m in mounts]
    if args.json:
        print(json.dumps({"mounts": rows}, indent=2))
        return EXIT_OK
    if not rows:
        print("no mounts")
        return EXIT_OK
    header = ("DEST", "SOURCE", "HEALTH", "PID", "REMOUNTS", "ORIGIN", "USERS")
    table = [header] + [(r["dest"], r["source"], r["health"], str(r["pid"] or "-"),
                         str(r["remounts"]), r["origin"], ",".join(r["users"]) or "-")
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK if all(r["health"] == "ok" for r in rows) else EXIT_ABSENT


def cmd_umount(args: argparse.Namespace) -> int:
    from guestagent.storage.mounts import lazy_unmount, mountinfo

    dest = Path(args.dest).absolute()
    for mount in _recorded(_settings(args)):
        if mount.dest == dest:
            return _count_out(mount)
    if mountinfo(dest) == "fuse.rclone":
        lazy_unmount(dest)
        print(f"unmounted {dest} (no record of it was kept)")
        return EXIT_OK
    return _fail(EXIT_ABSENT, f"{dest}: not a mount made by the agent")


def _count_out(mount: Any) -> int:
    """Count the CLI out of ``mount``; unmount only if no other user (a task, the
    daemon's settings, a process) still reads it."""
    where = str(mount.dest)
    done = mount.refs.release(where, CLI_USER, lambda _record: mount.stop())
    if done is None:  # a mount from before the counts: the CLI's alone
        mount.stop()
    elif not done:
        users = ", ".join(mount.refs.users(where))
        print(f"{where}: left mounted for its other users ({users})")
        return EXIT_OK
    print(f"unmounted {where}")
    return EXIT_OK


# -- NAS -----------------------------------------------------------------------------------

def _plan(args: argparse.Namespace) -> Any:
    from guestagent.storage import nas

    st = _settings(args).storage
    entry = _entry(args.source, args.dest, not args.read_only)
    return nas.plan(entry, version=args.nfs_version or st.nas_version,
                    lock=st.nas_lock if args.lock is None else args.lock,
                    automount=st.nas_automount if args.automount is None else args.automount)


def cmd_nas_plan(args: argparse.Namespace) -> int:
    plan = _plan(args)
    print(plan.fstab_line() if args.fstab else plan.describe(), end="\n" if args.fstab else "")
    return EXIT_OK


def cmd_nas_preflight(args: argparse.Namespace) -> int:
    from guestagent.storage import nas
    from guestagent.storage.mappings import NasSource

    source = NasSource.parse(args.source, "source")
    steps = nas.preflight(source, port=args.port, mount_port=args.mount_port)
    for step in steps:
        print(f"{'ok  ' if step.ok else 'FAIL'} {step.name:8} {step.detail}")
    nas.check_preflight(steps, source)
    return EXIT_OK


def cmd_nas_mount(args: argparse.Namespace) -> int:
    from guestagent.storage import nas

    plan = _plan(args)
    nas.check_preflight(nas.preflight(plan.source), plan.source)
    written = nas.install(plan, unit_dir=getattr(args, "unit_dir", nas.UNIT_DIR))
    print(f"mounted {plan.source} at {plan.where} ({plan.start_unit}; "
          f"{', '.join(str(w) for w in written)})")
    return EXIT_OK


__all__ = ["register"]
