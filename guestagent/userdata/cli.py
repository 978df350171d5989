"""``guestagent userdata list|render|combine|validate|apply``."""

from __future__ import annotations

import argparse
import base64
import gzip
import sys
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guestagent.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, fail
from guestagent.files import read_input
from guestagent.userdata import cloudconfig, parts, shell, templates
from guestagent.userdata.errors import UserdataError, one_line

if TYPE_CHECKING:
    from guestagent.config import Settings
    from guestagent.userdata.apply import Applier, Defaults, Report

# Refused user-data is bad input: exit 2, like any usage error; nothing was changed.
EXIT_REFUSED = EXIT_USAGE


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("userdata", help="user-data templates and first-boot apply")
    sub = p.add_subparsers(dest="userdata_command", metavar="ACTION", required=True)

    ls = sub.add_parser("list", help="list the templates and their parameters")
    ls.set_defaults(handler=_list)

    r = sub.add_parser("render", help="render a template to user-data")
    r.add_argument("template")
    r.add_argument(
        "--param",
        "-p",
        action="append",
        default=[],
        metavar="K=V",
        help="parameter (repeat; lists comma-separated; K=@FILE reads a file)",
    )
    r.add_argument("--format", choices=("shell", "cloud-config"), default="cloud-config")
    r.add_argument("--base64", action="store_true", help="base64-encode the output")
    r.add_argument("-o", "--output", help="write here instead of stdout")
    r.set_defaults(handler=_render)

    c = sub.add_parser("combine", help="combine rendered parts into one user-data")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("--gzip", action="store_true", help="gzip the result (cloud-init reads it)")
    c.add_argument("--base64", action="store_true", help="base64-encode the result")
    c.add_argument("-o", "--output", help="write here instead of stdout")
    c.set_defaults(handler=_combine)

    v = sub.add_parser("validate", help="check a user-data file ('-' for stdin)")
    v.add_argument("file")
    v.set_defaults(handler=_validate)

    a = sub.add_parser("apply", help="apply user-data (first boot)")
    a.add_argument("--root", default="/", help="apply into this image tree instead of /")
    a.add_argument("--dry-run", action="store_true", help="print the diff; change nothing")
    a.add_argument("--file", help="apply this user-data file instead of the metadata's")
    a.add_argument("--instance-id", help="instance id for the semaphores (default: metadata)")
    a.add_argument("--no-scripts", action="store_true", help="do not run shell parts or runcmd")
    a.add_argument(
        "--stage",
        choices=("local", "final"),
        help="first-boot stage: local (configuration, before sshd and the network) or final "
        "(scripts, runcmd); default both. Stages wait for the metadata service "
        "([userdata] metadata_wait) and for each other",
    )
    a.add_argument(
        "--no-defaults",
        action="store_true",
        help="no DNS/NTP/mirror defaults from metadata (implied by --file with --instance-id: "
        "offline, the metadata service is never asked)",
    )
    a.set_defaults(handler=_apply)


def _settings(args: argparse.Namespace) -> Any:
    from guestagent.cli import load_settings

    return load_settings(args)


def _fail(message: str, code: int = EXIT_REFUSED) -> int:
    return fail(code, one_line(message))


def _emit(data: bytes, output: str | None) -> None:
    if output:
        from guestagent.files import atomic_write

        atomic_write(output, data, mode=0o600)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def _list(args: argparse.Namespace) -> int:
    try:
        directory = _settings(args).userdata.templates_dir
        for name in templates.names(directory):
            tpl = templates.load(name, directory)
            print(f"{name}: {tpl.description}")
            for p in tpl.params.values():
                need = "required" if p.required else f"default {p.default!r}"
                print(f"  {p.name} ({p.type}, {need}): {p.help}")
    except UserdataError as exc:
        return _fail(str(exc))
    return EXIT_OK


def render_template(
    name: str, values: dict[str, Any] | list[str], fmt: str, directory: Path | None = None
) -> str:
    tpl = templates.load(name, directory)
    typed = templates.parse_params(tpl, values) if isinstance(values, list) else values
    doc = templates.render(tpl, typed)
    if fmt == "shell":
        return shell.render(doc, name)
    return cloudconfig.dump(doc, f"guestagent template: {name}")


def _render(args: argparse.Namespace) -> int:
    settings = _settings(args).userdata
    try:
        text = render_template(args.template, args.param, args.format, settings.templates_dir)
    except UserdataError as exc:
        return _fail(str(exc))
    data = text.encode()
    if len(data) > settings.max_size:
        return _fail(
            f"rendered user-data is {len(data)} bytes, over the {settings.max_size}-byte limit"
        )
    _emit(base64.b64encode(data) + b"\n" if args.base64 else data, args.output)
    return EXIT_OK


def combine(items: list[tuple[str, bytes]], *, compress: bool = False) -> bytes:
    """One user-data from several parts: a single part as is, cloud-config parts merged
    (lists appended), otherwise MIME multipart."""
    split = [(name, parts.classify(data, name)) for name, data in items]
    if len(split) == 1:
        out = split[0][1].content
    elif all(p.kind == parts.CLOUD_CONFIG for _, p in split):
        merged: dict[str, Any] = {}
        for name, p in split:
            merged = merge_strict(merged, cloudconfig.load(p.content, name), name)
        out = cloudconfig.dump(merged, "combined by guestagent").encode()
    else:
        msg = MIMEMultipart()
        for name, p in split:
            if p.kind == parts.WINDOWS:
                raise UserdataError(
                    f"{name}: Windows user-data cannot be combined with Linux parts"
                )
            subtype = "x-shellscript" if p.kind == parts.SHELL else "cloud-config"
            text = p.content.decode("utf-8")
            # ASCII parts stay readable (7bit); others go base64 as utf-8.
            sub = MIMEText(text, subtype, "us-ascii" if text.isascii() else "utf-8")
            sub.add_header("Content-Disposition", "attachment", filename=Path(name).name)
            msg.attach(sub)
        out = msg.as_bytes()
    return gzip.compress(out, mtime=0) if compress else out


def merge_strict(base: dict[str, Any], extra: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        old = out.get(key)
        if key not in out:
            out[key] = value
        elif isinstance(old, dict) and isinstance(value, dict):
            out[key] = merge_strict(old, value, f"{where}: {key}")
        elif isinstance(old, list) and isinstance(value, list):
            out[key] = old + [v for v in value if v not in old]
        elif old != value:
            raise UserdataError(f"{where}: {key} conflicts with an earlier part")
    return out


def _combine(args: argparse.Namespace) -> int:
    settings = _settings(args).userdata
    items = []
    for f in args.files:
        try:
            items.append((f, read_input(f)))
        except OSError as exc:
            return _fail(f"{f}: cannot read: {exc.strerror}")
    try:
        data = combine(items, compress=args.gzip)
    except UserdataError as exc:
        return _fail(str(exc))
    if len(data) > settings.max_size:
        hint = "" if args.gzip else "; try --gzip"
        size, limit = len(data), settings.max_size
        return _fail(f"combined user-data is {size} bytes, over the {limit}-byte limit{hint}")
    _emit(base64.b64encode(data) + b"\n" if args.base64 else data, args.output)
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    from guestagent.userdata.validate import validate

    settings = _settings(args).userdata
    try:
        data = read_input(args.file)
    except OSError as exc:
        return _fail(f"{args.file}: cannot read: {exc.strerror}")
    try:
        summary, warnings = validate(data, settings)
    except UserdataError as exc:
        return _fail(f"{args.file}: {exc}")
    for w in warnings:
        print(f"guestagent: warning: {one_line(w)}", file=sys.stderr)
    print(one_line(f"{args.file}: valid ({summary})"))
    return EXIT_OK


def _apply(args: argparse.Namespace) -> int:
    from guestagent.userdata.stages import Busy

    settings = _settings(args)
    root = Path(args.root)
    if not root.is_dir():
        return _fail(f"--root {args.root}: not a directory")
    data: bytes | None = None
    if args.file:
        try:
            data = read_input(args.file)
        except OSError as exc:
            return _fail(f"{args.file}: cannot read: {exc.strerror}")
    fetched, instance_id, defaults = _from_metadata(args, settings)
    try:
        report = _applier(args, settings, root).apply(
            data if args.file else fetched, instance_id, defaults)
    except Busy as exc:
        return _fail(str(exc))
    except UserdataError as exc:
        return _fail(f"user-data refused, nothing changed: {exc}")
    return _print_report(args, report)


def _from_metadata(args: argparse.Namespace, settings: Settings
                   ) -> tuple[bytes | None, str, Defaults]:
    """(user-data, instance id, defaults) from the metadata service, the command line's
    ``--instance-id`` and ``--no-defaults`` winning. Offline image preparation (a file
    and an instance id given) never touches the network."""
    from guestagent.userdata.apply import Defaults
    from guestagent.userdata.service import fetch_waiting

    fetched: bytes | None = None
    instance_id: str = args.instance_id or ""
    defaults = Defaults()
    if not args.file or not args.instance_id:
        from guestagent.metadata.client import MetadataClient

        us = settings.userdata
        client = MetadataClient(settings.metadata)
        try:
            # The first-boot units start while the network comes up: bounded retries.
            fetched, instance_id, defaults = fetch_waiting(
                client, us, us.metadata_wait if args.stage else 0.0
            )
        finally:
            client.close()
    if args.instance_id:
        instance_id = args.instance_id
    if args.no_defaults:
        defaults = Defaults()
    return fetched, instance_id, defaults


def _applier(args: argparse.Namespace, settings: Settings, root: Path) -> Applier:
    from guestagent.userdata.apply import Applier
    from guestagent.userdata.service import state_dir_for

    us = settings.userdata
    return Applier(
        us,
        root=root,
        state_dir=state_dir_for(root.resolve(), settings.daemon.state_dir),
        dry_run=args.dry_run,
        run_scripts=not args.no_scripts,
        stage=args.stage,
        # A unit waits for the other stage (or a hand-run apply) to finish; by hand, say
        # at once that another apply holds the lock.
        lock_wait=3 * us.script_timeout + 60 if args.stage else 0.0,
    )


def _print_report(args: argparse.Namespace, report: Report) -> int:
    for w in report.warnings:
        print(f"guestagent: warning: {one_line(w)}", file=sys.stderr)
    if args.dry_run:
        sys.stdout.write(report.diff or "# no changes\n")
    else:
        for o in report.outcomes:
            extra = f" ({o.detail})" if o.detail else ""
            print(one_line(f"{o.kind} {o.name}: {o.status}{extra}"))
    for o in report.failed:
        print(one_line(f"guestagent: {o.name} failed: {o.detail}"), file=sys.stderr)
    return EXIT_PARTIAL if report.failed else EXIT_OK
