"""Opt-in credential files for tools that read only files, never a URL.

Trade-off (why these are off by default): a file holds the secret at rest, readable by its
owner for as long as it exists, and a tool that read it keeps using that copy until it
re-reads; the socket hands out the current set per request and checks who asks each
time. So the files are 0600 for one configured owner, rewritten atomically (a reader sees
the old set or the new, never a torn file) on every rotation, and deleted when the role is
detached. Tools that cache what they read must be restarted or must re-read within the
overlap (30 min on the real service) to keep working.

- profile: ``~/.alibabacloud/credentials`` INI, ``type = sts`` (read by the Alibaba Cloud
  Go/Java credential SDKs and the aliyun CLI's profile import; the Python SDK 1.x reads only
  ``access_key``/role types from it, so Python programs should use the socket).
- env file: ``KEY=value`` lines for ``systemd``'s ``EnvironmentFile=`` or ``set -a; .``.
"""

from __future__ import annotations

import contextlib
import logging
import pwd
from pathlib import Path

from guestagent.credentials.rotation import Snapshot
from guestagent.credentials.server import resolve_group
from guestagent.credentials.settings import CredentialSettings
from guestagent.files import atomic_write
from guestagent.metadata.models import RoleCredentials, format_time

log = logging.getLogger(__name__)


def profile_text(creds: RoleCredentials, name: str = "default") -> str:
    return (
        f"[{name}]\n"
        "type = sts\n"
        f"access_key_id = {creds.access_key_id}\n"
        f"access_key_secret = {creds.access_key_secret}\n"
        f"security_token = {creds.security_token}\n"
        f"# expires {format_time(creds.expiration)}; rewritten by guestagent on rotation\n"
    )


def env_lines(creds: RoleCredentials, *, export: bool = False) -> str:
    prefix = "export " if export else ""
    pairs = {
        "ALIBABA_CLOUD_ACCESS_KEY_ID": creds.access_key_id,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": creds.access_key_secret,
        "ALIBABA_CLOUD_SECURITY_TOKEN": creds.security_token,
        "OSS_ACCESS_KEY_ID": creds.access_key_id,
        "OSS_ACCESS_KEY_SECRET": creds.access_key_secret,
        "OSS_SESSION_TOKEN": creds.security_token,
    }
    # STS values are [A-Za-z0-9+/=._-]; quote anyway so a shell never splits them.
    return "".join(f"{prefix}{k}='{v}'\n" for k, v in pairs.items())


def resolve_owner(spec: str) -> tuple[int | None, int | None]:
    """``user[:group]`` (names or ids) to (uid, gid); empty means leave as root's."""
    if not spec:
        return None, None
    user, _, group = spec.partition(":")
    if user.isdigit():
        uid = int(user)
        gid = None
    else:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ValueError(f"unknown user {user!r}") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if group:
        gid = resolve_group(group)
    return uid, gid


class CredentialFiles:
    """Subscriber of the rotator: keeps the opt-in files in step with the served set."""

    def __init__(self, settings: CredentialSettings) -> None:
        self.settings = settings
        self.uid, self.gid = resolve_owner(settings.files_owner)
        self._written: tuple[str, str] | None = None  # (key id, expiration) on disk

    @property
    def enabled(self) -> bool:
        return self.settings.profile_file is not None or self.settings.env_file is not None

    def paths(self) -> list[Path]:
        return [p for p in (self.settings.profile_file, self.settings.env_file) if p is not None]

    def __call__(self, snap: Snapshot) -> None:
        if snap.state == "absent":
            self.remove()
            return
        creds = snap.credentials
        if creds is None:
            return
        key = (creds.access_key_id, format_time(creds.expiration))
        if key == self._written:
            return
        self.write(creds)
        self._written = key

    def write(self, creds: RoleCredentials) -> None:
        s = self.settings
        if s.profile_file is not None:
            atomic_write(s.profile_file, profile_text(creds, s.profile_name), mode=0o600,
                         uid=self.uid, gid=self.gid)
        if s.env_file is not None:
            atomic_write(s.env_file, env_lines(creds), mode=0o600, uid=self.uid, gid=self.gid)
        log.info("credential files rewritten for %s: %s", creds.masked_key_id(),
                 ", ".join(map(str, self.paths())))

    def remove(self) -> None:
        removed = False
        for path in self.paths():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed = True
        self._written = None
        if removed:
            log.info("credential files removed (no role attached)")
