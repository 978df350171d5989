"""``guestagent deprovision`` and ``guestagent image build``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from guestagent.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, UsageError, fail


def register(subparsers: Any) -> None:
    d = subparsers.add_parser(
        "deprovision",
        help="remove this instance's state before the disk is captured as an image",
        description="Remove what belongs to one instance (agent state, credential files, "
        "SSH host keys, machine id, cloud-init instance state, DHCP leases, shell histories, "
        "logs) so an image made from this disk starts fresh. See images/README.md.",
    )
    d.add_argument("--root", default="/", help="the image's root file system (default /)")
    d.add_argument("--dry-run", action="store_true", help="print what would go; remove nothing")
    d.add_argument("--user", action="store_true",
                   help="also remove the accounts that user-data created")
    d.add_argument("-y", "--yes", action="store_true",
                   help="do not ask (needed on the running system's own root)")
    d.set_defaults(handler=_deprovision)

    img = subparsers.add_parser("image", help="build a local image (root file system tarball)")
    sub = img.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="Debian 12 root file system with the agent baked in")
    b.add_argument("-o", "--output", default="guestagent-debian12.tar.gz",
                   help="the tarball to write (default %(default)s)")
    b.add_argument("--cache", default="/var/cache/guestagent-image",
                   help="where the debootstrap tree and wheels are cached")
    b.add_argument("--mirror", help="Debian mirror (default deb.debian.org)")
    b.add_argument("--keep-tree", metavar="DIR",
                   help="also leave the finished tree in DIR (for systemd-nspawn -D)")
    b.set_defaults(handler=_build)
    demo = sub.add_parser("demo", help="boot the baked agent under systemd-nspawn on the "
                          "local cloud: first boot, credentials, spot poweroff")
    demo.add_argument("--cache", default="/var/cache/guestagent-image",
                      help="where the debootstrap tree and wheels are cached")
    demo.set_defaults(handler=_demo)


def _settings_for(root: Path) -> Any:
    from guestagent import config

    if root.resolve() == Path("/"):
        return config.load(None)
    # An image tree: its own settings file, none of this shell's GUESTAGENT_* overrides.
    own = root / "etc/guestagent/agent.toml"
    return config.load(own, environ={}) if own.is_file() else config.from_mapping({}, {})


def _deprovision(args: argparse.Namespace) -> int:
    from guestagent.images import deprovision as dp

    root = Path(args.root)
    try:
        dp.check_root(root)
        settings = _settings_for(root)
        creds = settings.credentials
        plan = dp.plan(
            root,
            users=args.user,
            state_dir=str(settings.daemon.state_dir),
            run_dir=str(settings.daemon.run_dir),
            credential_files=[str(f) for f in (creds.profile_file, creds.env_file,
                                               creds.token_file) if f],
        )
        if plan.running_root and not (args.yes or args.dry_run):
            raise dp.Refused("this is the running system's own root: add --yes to deprovision "
                             "it (do it last, just before the disk is captured)")
        if not args.dry_run:
            dp.check_writable(plan)
    except dp.Refused as exc:
        return fail(EXIT_USAGE, f"deprovision: {exc}")
    head = "would remove" if args.dry_run else "will remove"
    print(f"deprovision {root}: {head} {len(plan.items)} item(s)")
    for item in plan.items:
        print(item.line())
    if args.dry_run or not plan.items:
        return EXIT_OK
    if not args.yes and not _confirm():
        return fail(EXIT_USAGE, "deprovision: not confirmed; nothing was removed")
    failed = dp.execute(plan)
    for item, why in failed:
        print(f"guestagent: deprovision: {item.guest}: {why}", file=sys.stderr)
    if failed:
        return EXIT_PARTIAL
    print(f"deprovision {root}: done")
    return EXIT_OK


def _confirm() -> bool:
    if not sys.stdin.isatty():
        raise UsageError("deprovision: no terminal to ask on: add --yes (or --dry-run)")
    try:
        return input("Remove these? [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _build(args: argparse.Namespace) -> int:
    from guestagent.images import build

    try:
        report = build.build(
            Path(args.output), cache=Path(args.cache), mirror=args.mirror,
            keep_tree=Path(args.keep_tree) if args.keep_tree else None,
        )
    except build.ImageError as exc:
        return fail(EXIT_USAGE if exc.usage else 1, f"image build: {exc}")
    for key, value in report.items():
        print(f"{key}: {value}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from guestagent.images import demo
    from guestagent.userdata.cli import combine, render_template

    why = demo.unsupported()
    if why:
        return fail(EXIT_USAGE, f"image demo: cannot boot systemd in a container here: {why}")
    key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    parts = [
        render_template("dns", {"nameservers": "10.0.0.2"}, "cloud-config"),
        render_template("ntp", {"servers": "ntp1.aliyun.com"}, "cloud-config"),
        render_template("sudo-account", {"user": "ops", "ssh_keys": key}, "cloud-config"),
    ]
    data = combine([(f"part{i}.yaml", p.encode()) for i, p in enumerate(parts)])
    return demo.run_demo(Path(args.cache), data)
