"""``guestagent metadata ...``: read the instance metadata service from a shell.

Exit codes: 0 ok, 1 absent (404), 2 usage, 3 service unreachable or bad answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from guestagent.cli import EXIT_ABSENT, EXIT_OK, UsageError, fail, load_settings
from guestagent.metadata.client import MetadataClient
from guestagent.metadata.models import format_time, mask


def register(sub: Any) -> None:
    p = sub.add_parser("metadata", help="read the instance metadata service")
    msub = p.add_subparsers(dest="metadata_command", metavar="ACTION", required=True)

    g = msub.add_parser("get", help="print the value at PATH (e.g. meta-data/instance-id)")
    g.add_argument("path")
    g.set_defaults(handler=_get)

    ls = msub.add_parser("ls", help="list a directory (e.g. meta-data/)")
    ls.add_argument("path", nargs="?", default="")
    ls.set_defaults(handler=_ls)

    ident = msub.add_parser("identity", help="the instance identity document")
    ident.add_argument("--json", action="store_true", help="print JSON")
    ident.add_argument("--verify", action="store_true",
                       help="check its pkcs7 against ca_cert; says so in a last line "
                            "(on stderr with --json)")
    ident.add_argument("--ca", help="CA certificate (PEM) for --verify")
    ident.set_defaults(handler=_identity)

    cred = msub.add_parser("credentials", help="the RAM role's STS credentials")
    cred.add_argument("role", nargs="?", help="role name (default: the attached role)")
    cred.add_argument("--show-secret", action="store_true", help="print secrets unmasked")
    cred.add_argument("--json", action="store_true", help="print the service's JSON")
    cred.set_defaults(handler=_credentials)


def client_for(args: argparse.Namespace) -> MetadataClient:
    return MetadataClient(load_settings(args).metadata)


def _checked_path(path: str) -> str:
    from guestagent.metadata.client import _clean

    try:
        return _clean(path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _get(args: argparse.Namespace) -> int:
    path = _checked_path(args.path)
    data = client_for(args).get_bytes(path)
    if data is None:
        return fail(EXIT_ABSENT, f"{path}: not found")
    sys.stdout.buffer.write(data if data.endswith(b"\n") or not data else data + b"\n")
    return EXIT_OK


def _ls(args: argparse.Namespace) -> int:
    path = _checked_path(args.path)
    children = client_for(args).list(path)
    if children is None:
        return fail(EXIT_ABSENT, f"{path or '/'}: not found")
    print("\n".join(children))
    return EXIT_OK


def _ca(option: str | None, configured: Path | None) -> bytes:
    """The CA for ``--verify``; a missing or unreadable one is the user's to fix (exit 2),
    not a bad answer from the service (3)."""
    from cryptography import x509

    from guestagent.files import read_input

    where = f"--ca {option}" if option else f"[metadata] ca_cert {configured}"
    path = option or configured
    if path is None:
        raise UsageError("--verify needs the CA: --ca FILE or [metadata] ca_cert (the local "
                         "cloud's is at its control URL's /ca.pem)")
    try:
        pem = read_input(path)
        x509.load_pem_x509_certificate(pem)
    except OSError as exc:
        raise UsageError(f"{where}: {exc.strerror}") from None
    except ValueError:
        raise UsageError(f"{where}: not a PEM certificate") from None
    return pem


def _identity(args: argparse.Namespace) -> int:
    client = client_for(args)
    verified = ""
    if args.verify:
        pem = _ca(args.ca, client.settings.ca_cert)
        doc = client.verify_identity(pem)
        verified = (f"verified: the identity document of {doc.instance_id} is signed (pkcs7) "
                    f"by a key certified by {_subject(pem)}")
    else:
        doc = client.identity()
    data = doc.to_json()
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        width = max(map(len, data))
        for key, value in data.items():
            print(f"{key:<{width}}  {value}")
    if verified:
        # Said, not implied by silence; with --json on stderr, so stdout stays one document.
        print(verified if not args.json else f"guestagent: {verified}",
              file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def _subject(pem: bytes) -> str:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem).subject.rfc4514_string()


def _credentials(args: argparse.Namespace) -> int:
    client = client_for(args)
    role = args.role
    if not role:
        roles = client.ram_role_names()
        if not roles:
            return fail(EXIT_ABSENT, "no RAM role is attached to this instance")
        role = roles[0]
    try:
        creds = client.ram_credentials(role)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if creds is None:
        return fail(EXIT_ABSENT, f"RAM role {role!r} is not attached to this instance")
    doc = creds.to_metadata_json()
    if not args.show_secret:
        doc["AccessKeySecret"] = mask(creds.access_key_secret, 0)[:8]
        doc["SecurityToken"] = mask(creds.security_token, 0)[:8]
        doc["AccessKeyId"] = creds.masked_key_id()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"role         {role}")
        print(f"access key   {doc['AccessKeyId']}")
        print(f"secret       {doc['AccessKeySecret']}")
        print(f"token        {doc['SecurityToken']}")
        print(f"expires      {format_time(creds.expiration)}")
        print(f"last updated {format_time(creds.last_updated)}")
    return EXIT_OK
