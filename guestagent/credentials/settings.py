"""Settings of the credential service: section ``[credentials]``.

Durations are seconds. The windows are settings (not constants) so tests can run the
rotation against a time-scaled emulator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class CredentialSettings:
    enabled: bool = True
    # Role name; empty means "the one listed under ram/security-credentials/".
    role: str = ""

    # Rotation. Advisory: refresh when this little validity is left (or a newer set is
    # offered). Mandatory: below this, requests wait for a refresh or get 503.
    advisory_window: float = 1800.0
    mandatory_window: float = 600.0
    # Never serve a set closer than this to its Expiration, whatever happens.
    safety_margin: float = 120.0
    # Check the service this often while the set is fresh (catches detach and early rotation).
    poll_interval: float = 300.0
    # In the advisory window, until the service offers a newer set.
    refresh_interval: float = 60.0
    # After a failure, and while no role is attached.
    retry_interval: float = 5.0
    # Random spread applied to every scheduled check, as a fraction of its delay.
    jitter: float = 0.2
    # How long a request in the mandatory window waits for the refresh before 503.
    request_wait: float = 2.0

    # Unix socket listener.
    socket_path: Path = Path("/run/guestagent/credentials.sock")
    socket_mode: int = 0o660
    socket_group: str = ""  # group name or gid owning the socket; empty: root's
    # Who may read credentials besides root: user/group names or numeric ids.
    allow_users: list[str] = field(default_factory=list)
    allow_groups: list[str] = field(default_factory=list)

    # Loopback TCP listener (most SDKs only take an http:// URL). The port is privileged
    # (< 1024) so no unprivileged user can bind it while the agent is down; 977 is
    # unassigned by IANA. Under systemd, guestagent.socket holds it (keep both in step).
    tcp_enabled: bool = True
    tcp_host: str = "127.0.0.1"
    tcp_port: int = 977

    # HTTP limits (each closes only the offending connection): a request head must arrive
    # within header_timeout of its first byte; a connection idle this long is closed; caps
    # on open connections in total and per client (its uid; its address when it has none).
    header_timeout: float = 5.0
    idle_timeout: float = 30.0
    max_connections: int = 512
    max_connections_per_peer: int = 64

    # Secrets of the host endpoint on TCP (the Unix socket needs none: SO_PEERCRED).
    # A token file whose content clients send as ``Authorization``
    # (AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE), created if missing, readable by whoever
    # may open the socket; unset: credentials.token beside the socket.
    token_file: Path | None = None
    token_owner: str = ""  # user[:group] owning the token file; empty: root
    # A secret path prefix ("capability URL") for clients that cannot send a header (the
    # Alibaba SDKs, oss2); unset: a random one kept beside the socket (new at each boot).
    path_secret: str = field(default="", metadata={"secret": True})

    # Opt-in credential files, rewritten atomically (0600) on every rotation.
    profile_file: Path | None = None  # e.g. /home/app/.alibabacloud/credentials
    profile_name: str = "default"
    env_file: Path | None = None  # ALIBABA_CLOUD_* and OSS_* variables
    files_owner: str = ""  # user[:group] owning both files; empty: root

    @property
    def token_path(self) -> Path:
        """The host endpoint's token file: ``token_file``, or credentials.token beside the
        socket (what the server creates and clients read)."""
        return self.token_file or self.socket_path.parent / "credentials.token"

    def validate(self) -> None:
        self._check_timing()
        self._check_listeners()
        self._check_names()

    def _check_timing(self) -> None:
        for name in ("advisory_window", "mandatory_window", "safety_margin", "request_wait"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("poll_interval", "refresh_interval", "retry_interval", "header_timeout",
                     "idle_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not self.safety_margin <= self.mandatory_window <= self.advisory_window:
            raise ValueError(
                "mandatory_window: want safety_margin <= mandatory_window <= advisory_window, "
                f"got {self.safety_margin} / {self.mandatory_window} / {self.advisory_window}"
            )
        if not 1 <= self.max_connections_per_peer <= self.max_connections:
            raise ValueError(
                "max_connections_per_peer: want 1 <= max_connections_per_peer <= "
                f"max_connections, got {self.max_connections_per_peer} / {self.max_connections}"
            )
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter: must be in [0, 1), got {self.jitter}")

    def _check_listeners(self) -> None:
        if not 0 <= self.socket_mode <= 0o777:
            raise ValueError(f"socket_mode: want a mode like 0o660, got {self.socket_mode:o}")
        if self.socket_mode & 0o007:
            raise ValueError("socket_mode: must not grant access to others (use allow_groups)")
        if not 0 <= self.tcp_port <= 65535:
            raise ValueError(f"tcp_port: must be 0..65535 (0: any free port), got {self.tcp_port}")
        if self.tcp_enabled and not _is_loopback(self.tcp_host):
            raise ValueError(f"tcp_host: must be a loopback address, got {self.tcp_host!r}")

    def _check_names(self) -> None:
        if self.role and not _NAME.fullmatch(self.role):
            raise ValueError(f"role: not a RAM role name: {self.role!r}")
        if self.path_secret and not re.fullmatch(r"[A-Za-z0-9_-]{16,}", self.path_secret):
            raise ValueError("path_secret: want at least 16 characters of [A-Za-z0-9_-]")
        if not _NAME.fullmatch(self.profile_name):
            raise ValueError(f"profile_name: not a profile name: {self.profile_name!r}")
        for name in ("allow_users", "allow_groups"):
            for item in getattr(self, name):
                if not _NAME.fullmatch(item):
                    raise ValueError(f"{name}: not a user/group name or id: {item!r}")
        for name in ("token_owner", "files_owner"):
            value = getattr(self, name)
            if value and not all(_NAME.fullmatch(p) for p in value.split(":", 1)):
                raise ValueError(f"{name}: want user[:group], got {value!r}")


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
