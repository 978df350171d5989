"""``guestagent storage cp|ls|sync|rm``: OSS transfers from the command line.

Keys come from the agent's local credential server (its Unix socket); the endpoint from
``[storage]`` or the instance. Errors are one line; exit 0 ok, 1 no such object or bucket,
2 bad input, 3 the store or the credential service refused or could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from guestagent.cli import (
    EXIT_ABSENT,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    UsageError,
    fail,
    printable,
)

UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def size_arg(text: str) -> int:
    """``8M``, ``64MiB``, ``1g``, or bytes."""
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = raw[-1:] if raw[-1:] in UNITS else ""
    try:
        return int(float(raw[: len(raw) - len(unit)]) * UNITS[unit])
    except (ValueError, OverflowError):  # OverflowError: "inf"
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8M, 64MiB)") from None


def register(sub: Any) -> None:
    """Add cp, ls, sync and rm under the ``storage`` command's sub-parsers."""
    cp = sub.add_parser("cp", help="copy files to or from OSS (oss://bucket/key)")
    cp.add_argument("src")
    cp.add_argument("dst")
    cp.add_argument("-r", "--recursive", action="store_true", help="copy a directory tree")
    _transfer_args(cp)
    cp.set_defaults(handler=cmd_cp)

    ls = sub.add_parser("ls", help="list objects under oss://bucket/prefix")
    ls.add_argument("url")
    ls.add_argument("-r", "--recursive", action="store_true", help="every object, not one level")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(handler=cmd_ls)

    sync = sub.add_parser("sync", help="copy only what changed (size, MD5/ETag or mtime)")
    sync.add_argument("src")
    sync.add_argument("dst")
    sync.add_argument("--delete", action="store_true",
                      help="also delete what the destination has and the source does not")
    sync.add_argument("--dry-run", action="store_true", help="print what would be done")
    _transfer_args(sync)
    sync.set_defaults(handler=cmd_sync)

    rm = sub.add_parser("rm", help="delete an object (or with -r a whole prefix)")
    rm.add_argument("url")
    rm.add_argument("-r", "--recursive", action="store_true")
    rm.add_argument("--dry-run", action="store_true", help="print what would be deleted")
    rm.set_defaults(handler=cmd_rm)


def _transfer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="JSON progress lines on stdout")
    p.add_argument("--part-size", type=size_arg, help="multipart part size (default 8M)")
    p.add_argument("--concurrency", type=int, help="parts/files in flight (default 8)")


def guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from guestagent.storage.errors import BadInput, NotFound, StorageError

        try:
            return fn(args)
        except BadInput as exc:
            raise UsageError(str(exc)) from None
        except NotFound as exc:
            return fail(EXIT_ABSENT, str(exc))
        except StorageError as exc:
            return fail(EXIT_UNAVAILABLE, str(exc))

    return run


@contextmanager
def _session(args: argparse.Namespace) -> Iterator[Any]:
    from guestagent.cli import load_settings
    from guestagent.storage import progress
    from guestagent.storage.connect import client_for
    from guestagent.storage.transfer import Options, Transfers

    settings = load_settings(args)
    overrides = {"part_size": getattr(args, "part_size", None),
                 "concurrency": getattr(args, "concurrency", None)}
    try:
        options = Options.from_settings(settings, **overrides)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    _check_flags(options)
    client = client_for(settings)
    sink = progress.choose(bool(getattr(args, "json", False)))
    transfers = Transfers(client, options, sink)
    try:
        yield transfers
    finally:
        transfers.close()
        client.close()
        sink.close()


def _check_flags(options: Any) -> None:
    """The flags within what ``[storage]`` accepts: OSS refuses parts over 5 GiB only
    after the first one is sent, and thousands of threads would exhaust the machine."""
    from guestagent.storage.settings import MAX_CONCURRENCY, MAX_PART, MIN_PART

    if not MIN_PART <= options.part_size <= MAX_PART:
        raise UsageError(f"--part-size: must be 5M..5G, got {options.part_size} bytes")
    if not 1 <= options.concurrency <= MAX_CONCURRENCY:
        raise UsageError(f"--concurrency: must be 1..{MAX_CONCURRENCY}, "
                         f"got {options.concurrency}")


def _kind(text: str) -> str:
    from guestagent.storage.ossurl import OssUrl

    return "oss" if OssUrl.is_oss(text) else "local"


def cmd_cp(args: argparse.Namespace) -> int:
    return guarded(_cp)(args)


def _cp(args: argparse.Namespace) -> int:
    from guestagent.storage.errors import BadInput

    kinds = (_kind(args.src), _kind(args.dst))
    if kinds in (("oss", "oss"), ("local", "local")):
        raise BadInput("cp: one side must be oss://bucket/... and the other a local path")
    start = time.monotonic()
    with _session(args) as t:
        count = _cp_up(t, args) if kinds == ("local", "oss") else _cp_down(t, args)
    _summary(args, count, time.monotonic() - start)
    return EXIT_OK


def _cp_up(t: Any, args: argparse.Namespace) -> int:
    from guestagent.storage.errors import BadInput
    from guestagent.storage.ossurl import OssUrl

    dest = OssUrl.parse(args.dst, "cp: destination")
    src = Path(args.src)
    if args.recursive:
        if not src.is_dir():
            raise BadInput(f"cp -r: {src} is not a directory")
        return len(t.upload_tree(src, OssUrl(dest.bucket, dest.prefix)))
    if src.is_dir():
        raise BadInput(f"cp: {src} is a directory; use -r")
    t.upload_file(src, dest)
    return 1


def _cp_down(t: Any, args: argparse.Namespace) -> int:
    from guestagent.storage.ossurl import OssUrl

    source = OssUrl.parse(args.src, "cp: source")
    local = Path(args.dst)
    if args.recursive:
        return len(t.download_tree(OssUrl(source.bucket, source.prefix), local))
    if args.dst.endswith(("/", os.sep)) and not source.is_dir:
        # 'out/' names a directory, as for cp(1) and the AWS CLI: the object goes in it
        # (made if need be), never to a file called 'out'.
        local = local / source.name
    t.download_file(source, local)
    return 1


def _summary(args: argparse.Namespace, count: int, seconds: float) -> None:
    if not args.json:
        print(f"{count} file(s) copied in {seconds:.1f}s", file=sys.stderr)


def cmd_ls(args: argparse.Namespace) -> int:
    return guarded(_ls)(args)


def _ls(args: argparse.Namespace) -> int:
    from guestagent.cli import load_settings
    from guestagent.storage.connect import client_for
    from guestagent.storage.ossurl import OssUrl
    from guestagent.storage.s3 import ObjectInfo

    url = OssUrl.parse(args.url, "ls")
    client = client_for(load_settings(args))
    try:
        client.head_bucket(url.bucket)
        prefix = url.key
        for item in client.list_objects(url.bucket, prefix, "" if args.recursive else "/"):
            _print_item(args, url.bucket, item if isinstance(item, ObjectInfo) else str(item))
    finally:
        client.close()
    return EXIT_OK


def _print_item(args: argparse.Namespace, bucket: str, item: Any) -> None:
    from guestagent.storage.s3 import ObjectInfo

    if isinstance(item, ObjectInfo):
        if args.json:
            print(json.dumps({"url": f"oss://{bucket}/{item.key}", "size": item.size,
                              "etag": item.etag, "mtime": item.mtime}))
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(item.mtime))
            # A key is anyone's text: escaped, it cannot drive the terminal.
            print(printable(f"{item.size:>12}  {when}  oss://{bucket}/{item.key}"))
    elif args.json:
        print(json.dumps({"url": f"oss://{bucket}/{item}", "dir": True}))
    else:
        print(printable(f"{'DIR':>12}  {'':19}  oss://{bucket}/{item}"))


def cmd_sync(args: argparse.Namespace) -> int:
    return guarded(_sync)(args)


def _sync(args: argparse.Namespace) -> int:
    from guestagent.storage import trees
    from guestagent.storage.errors import BadInput
    from guestagent.storage.ossurl import OssUrl

    kinds = (_kind(args.src), _kind(args.dst))
    if kinds not in (("local", "oss"), ("oss", "local")):
        raise BadInput("sync: one side must be oss://bucket/dir/ and the other a local directory")
    flags = {"only_changed": True, "delete": args.delete, "dry_run": args.dry_run}
    with _session(args) as t:
        if kinds == ("local", "oss"):
            dest = OssUrl.parse(args.dst, "sync: destination")
            summary = trees.upload_tree(t, Path(args.src), OssUrl(dest.bucket, dest.prefix),
                                        **flags)
        else:
            src = OssUrl.parse(args.src, "sync: source")
            summary = trees.download_tree(t, OssUrl(src.bucket, src.prefix), Path(args.dst),
                                          **flags)
    verb = "would copy" if args.dry_run else "copied"
    if args.dry_run:
        for rel in summary.copied:
            print(printable(f"copy {rel}"))
        for name in summary.deleted:
            print(printable(f"delete {name}"))
    if args.json:
        print(json.dumps({"event": "summary", "copied": len(summary.copied),
                          "skipped": len(summary.skipped), "deleted": len(summary.deleted),
                          "bytes": summary.nbytes, "dry_run": args.dry_run}))
    else:
        gone = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {len(summary.copied)}, unchanged {len(summary.skipped)}, "
              f"{gone} {len(summary.deleted)}", file=sys.stderr)
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    return guarded(_rm)(args)


def _rm(args: argparse.Namespace) -> int:
    from guestagent.cli import load_settings
    from guestagent.storage import trees
    from guestagent.storage.connect import client_for
    from guestagent.storage.ossurl import OssUrl

    url = OssUrl.parse(args.url, "rm")
    client = client_for(load_settings(args))
    try:
        keys = trees.remove(client, url, recursive=args.recursive, dry_run=args.dry_run)
    finally:
        client.close()
    for key in keys:
        print(printable(f"{'would delete' if args.dry_run else 'deleted'} oss://{url.bucket}/{key}"))
    return EXIT_OK


__all__ = ["EXIT_USAGE", "register"]
