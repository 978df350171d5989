"""Settings of first-boot user-data handling: section ``[userdata]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FREQUENCIES = ("once", "per-instance", "always")


@dataclass(frozen=True)
class UserdataSettings:
    enabled: bool = True
    # A user-data shell script (or runcmd) is killed after this many seconds.
    script_timeout: float = 600.0
    # The service accepts at most 32 KB of user-data (raw, before the console's base64).
    max_size: int = 32768
    # gzip'd user-data may not expand beyond this (a gzip bomb is refused, not unpacked).
    max_decoded_size: int = 1048576
    # The first-boot units (apply --stage) wait this long for the metadata service while
    # the network comes up, retrying with backoff, before they give up (exit 3).
    metadata_wait: float = 120.0
    # Defaults taken from metadata when the user-data says nothing about them.
    default_dns: bool = True
    default_ntp: bool = True
    # Off by default: it adds a package source to every new instance.
    default_mirror: bool = False
    # When cloud-init is installed and enabled in the target, leave the user-data to it
    # (it runs the scripts as well; running both would run them twice).
    defer_to_cloud_init: bool = True
    # users/groups may name root, uids outside login.defs' UID_MIN..UID_MAX or system: true
    # only when this is set: locking root's password or giving a daemon account a sudo rule
    # is rarely what a user-data author meant.
    allow_system_accounts: bool = False
    # Handler frequency overrides, e.g. ["runcmd=always", "dns=once"].
    frequencies: list[str] = field(default_factory=list)
    # Where the templates live; None finds them beside the package or in share/.
    templates_dir: Path | None = None
    cloud_init: str = "cloud-init"
    visudo: str = "visudo"

    def validate(self) -> None:
        if self.metadata_wait < 0:
            raise ValueError(f"metadata_wait: must be >= 0, got {self.metadata_wait}")
        if self.script_timeout <= 0:
            raise ValueError(f"script_timeout: must be > 0, got {self.script_timeout}")
        if not 1 <= self.max_size <= 16 * 1048576:
            raise ValueError(f"max_size: must be 1..16777216 bytes, got {self.max_size}")
        if self.max_decoded_size < self.max_size:
            raise ValueError(
                f"max_decoded_size: must be >= max_size ({self.max_size}), "
                f"got {self.max_decoded_size}"
            )
        for item in self.frequencies:
            name, sep, freq = item.partition("=")
            if not sep or not name.strip() or freq.strip() not in FREQUENCIES:
                raise ValueError(f"frequencies: {item!r} must be HANDLER=once|per-instance|always")

    def frequency_overrides(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.frequencies:
            name, _, freq = item.partition("=")
            out[name.strip()] = freq.strip()
        return out
