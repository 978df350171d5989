"""``guestagent credentials show|env|serve|check``."""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from guestagent.cli import (
    EXIT_ABSENT,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    UsageError,
    fail,
    load_settings,
)
from guestagent.credentials.clientenv import CLIENTS
from guestagent.credentials.local import LocalError, UnixHTTPConnection, local_get
from guestagent.metadata.models import RoleCredentials, mask, parse_time


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "credentials", help="the RAM role's STS credentials, served locally",
        description="The instance RAM role's credentials: rotation, local server, files.",
    )
    sub = parser.add_subparsers(dest="credentials_command", metavar="ACTION")
    parser.set_defaults(handler=lambda _a: _usage(parser))

    show = sub.add_parser("show", help="the current set, secrets masked")
    _source_args(show)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=cmd_show)

    env = sub.add_parser(
        "env", help="print the lines a client needs (--for), or static secrets (warns)",
        description="With --for: the environment lines that point a client at the local "
        "server (asked of the running server). Without: the current set as export lines "
        "(live secrets that expire; prefer --for).",
    )
    env.add_argument("--for", dest="client", choices=(*CLIENTS, "all"),
                     help="alibaba (SDKs, aliyun CLI), oss2, aws (boto3, AWS CLI, SDKs), "
                     "rclone, or all")
    env.add_argument("--export", action="store_true", help="prefix lines with 'export '")
    _source_args(env)
    env.set_defaults(handler=cmd_env)

    serve = sub.add_parser("serve", help="run rotation and the local server in the foreground")
    serve.set_defaults(handler=cmd_serve)

    check = sub.add_parser("check", help="end-to-end probe: metadata service, socket, TCP")
    check.set_defaults(handler=cmd_check)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from", dest="source", choices=("auto", "socket", "metadata"), default="auto",
        help="read from the agent's socket or straight from the metadata service "
        "(auto: the socket when it exists)",
    )


def _prefix(settings: Any) -> str:
    return f"/{settings.path_secret}" if settings.path_secret else ""


def _token(settings: Any) -> str | None:
    if settings.token_file is None:
        return None
    try:
        return str(settings.token_file.read_text().strip())
    except OSError as exc:
        raise UsageError(f"{settings.token_file}: cannot read token: {exc.strerror}") from None


def _fetch(args: argparse.Namespace) -> tuple[RoleCredentials, str, str]:
    """(credentials, role, where from) per ``--from``."""
    settings = load_settings(args)
    cs = settings.credentials
    use_socket = args.source == "socket" or (args.source == "auto" and cs.socket_path.exists())
    if use_socket:
        conn = UnixHTTPConnection(str(cs.socket_path), 5.0)
        try:
            doc = local_get(conn, _prefix(cs) + "/v1/credentials/alibaba", _token(cs))
            health = local_get(
                UnixHTTPConnection(str(cs.socket_path), 5.0), _prefix(cs) + "/v1/health"
            )
        except LocalError as exc:
            if exc.status == 404:
                raise Absent(str(exc)) from None
            raise Unavailable(str(exc)) from None
        creds = RoleCredentials.parse(json.dumps(doc), str(cs.socket_path))
        return creds, str(health.get("role", "")), str(cs.socket_path)
    from guestagent.metadata.client import MetadataClient

    client = MetadataClient(settings.metadata)
    try:
        role = cs.role or next(iter(sorted(client.ram_role_names())), "")
        if not role:
            raise Absent("no RAM role is attached to this instance")
        found = client.ram_credentials(role)
        if found is None:
            raise Absent(f"RAM role {role!r} is not attached to this instance")
        return found, role, "metadata service"
    finally:
        client.close()


class Absent(Exception):
    pass


class Unavailable(Exception):
    pass


def _guard(fn: Any, args: argparse.Namespace) -> int:
    try:
        return int(fn(args))
    except Absent as exc:
        return fail(EXIT_ABSENT, str(exc))
    except Unavailable as exc:
        return fail(EXIT_UNAVAILABLE, str(exc))


def cmd_show(args: argparse.Namespace) -> int:
    return _guard(_show, args)


def _show(args: argparse.Namespace) -> int:
    creds, role, where = _fetch(args)
    left = int((creds.expiration - datetime.now(UTC)).total_seconds())
    doc = {
        "role": role,
        "access_key_id": creds.masked_key_id(),
        "access_key_secret": "********",
        "security_token": f"******** ({len(creds.security_token)} characters)",
        "expiration": creds.expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "last_updated": creds.last_updated.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expires_in": left,
        "from": where,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        width = max(map(len, doc))
        for key, value in doc.items():
            print(f"{key:<{width}}  {value}")
    return EXIT_OK


def cmd_env(args: argparse.Namespace) -> int:
    return _guard(_env, args)


def endpoints(cs: Any) -> dict[str, str]:
    """The running server's own account of where each format is served."""
    try:
        doc = local_get(UnixHTTPConnection(str(cs.socket_path), 5.0), "/v1/endpoints")
    except LocalError as exc:
        raise Unavailable(f"{exc} (is the agent running? socket {cs.socket_path})") from None
    return {str(k): str(v) for k, v in doc.items()}


def _env(args: argparse.Namespace) -> int:
    from guestagent.credentials.credfiles import env_lines

    if args.client:
        from guestagent.credentials.clientenv import NoEndpoint, lines_for

        try:
            lines = lines_for(args.client, endpoints(load_settings(args).credentials))
        except NoEndpoint as exc:
            raise Unavailable(str(exc)) from None
        prefix = "export " if args.export else ""
        for line in lines:
            print(line if line.startswith("#") else prefix + line)
        return EXIT_OK

    creds, _role, _where = _fetch(args)
    print(
        "guestagent: warning: these lines hold live secrets; they expire at "
        f"{creds.expiration:%Y-%m-%dT%H:%M:%SZ} and are not refreshed. Prefer "
        "ALIBABA_CLOUD_CREDENTIALS_URI or AWS_CONTAINER_CREDENTIALS_FULL_URI.",
        file=sys.stderr,
    )
    sys.stdout.write(env_lines(creds, export=True))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from guestagent.credentials.service import CredentialService
    from guestagent.metadata.client import MetadataClient

    settings = load_settings(args)
    client = MetadataClient(settings.metadata)
    try:
        service = CredentialService(settings, client)
    except ValueError as exc:
        raise UsageError(f"credentials: {exc}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service.start(stop)
    except (OSError, ValueError) as exc:
        raise UsageError(f"credentials: cannot listen: {exc}") from None
    where = str(settings.credentials.socket_path)
    if service.server is not None and service.server.tcp_address:
        host, port = service.server.tcp_address
        where += f" and http://{host}:{port}"
    print(f"guestagent: serving credentials on {where} (Ctrl-C stops)", file=sys.stderr)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        service.close()
        client.close()
    return EXIT_OK


def _check_targets(cs: Any) -> list[tuple[str, http.client.HTTPConnection, str, str | None]]:
    """The socket, then each TCP endpoint as its clients reach it (from the server itself)."""
    sock = str(cs.socket_path)
    out: list[tuple[str, http.client.HTTPConnection, str, str | None]] = [
        (f"socket {sock}", UnixHTTPConnection(sock, 5.0), "/v1/credentials/aws", None)
    ]
    try:
        where = endpoints(cs)
    except Unavailable:
        return out  # the socket probe reports why
    token = None
    if where.get("token_file"):
        try:
            token = Path(where["token_file"]).read_text().strip()
        except OSError:
            token = None  # the probe then shows the 401 this user would get
    for fmt, key in (("aws", "aws"), ("alibaba, capability path", "alibaba")):
        url = urlsplit(where.get(key, ""))
        if url.hostname and url.port:
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5.0)
            out.append((f"tcp {url.hostname}:{url.port} ({fmt})", conn, url.path,
                        token if key == "aws" else None))
    return out


def cmd_check(args: argparse.Namespace) -> int:
    """Probe each hop and print one verdict line per hop, then an overall verdict."""
    from guestagent.metadata.client import MetadataClient
    from guestagent.metadata.errors import MetadataError

    settings = load_settings(args)
    cs = settings.credentials
    results: list[tuple[str, bool, str]] = []
    worst = EXIT_OK
    key_id = None
    client = MetadataClient(settings.metadata)
    try:
        role = cs.role or next(iter(sorted(client.ram_role_names())), "")
        creds = client.ram_credentials(role) if role else None
        if creds is None:
            results.append(("metadata", False, "no RAM role attached"))
            worst = EXIT_ABSENT
        else:
            key_id = creds.access_key_id
            left = (creds.expiration - datetime.now(UTC)).total_seconds()
            results.append(("metadata", True, f"role {role}, {creds.masked_key_id()}, "
                                                f"expires in {int(left)}s"))
    except MetadataError as exc:
        results.append(("metadata", False, str(exc)))
        worst = EXIT_UNAVAILABLE
    finally:
        client.close()

    for name, conn, path, token in _check_targets(cs):
        started = time.monotonic()
        try:
            doc = local_get(conn, path, token)
            expires = parse_time(str(doc.get("Expiration")), name)
            left = (expires - datetime.now(UTC)).total_seconds()
            same = key_id is None or doc.get("AccessKeyId") == key_id
            ms = (time.monotonic() - started) * 1000
            ok = left > cs.safety_margin
            detail = f"{mask(str(doc.get('AccessKeyId')))}, expires in {int(left)}s, {ms:.1f} ms"
            if not same:
                detail += " (differs from the service's current set: rotation in progress?)"
            results.append((name, ok, detail))
            if not ok:
                worst = max(worst, EXIT_UNAVAILABLE)
        except (LocalError, ValueError) as exc:
            results.append((name, False, str(exc)))
            absent = getattr(exc, "status", 0) == 404
            worst = max(worst, EXIT_ABSENT if absent else EXIT_UNAVAILABLE)
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'}  {name}: {detail}")
    print("verdict: " + ("credentials are served and fresh" if worst == EXIT_OK
                         else "credentials are NOT served correctly"))
    return worst
