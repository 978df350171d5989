"""Settings of storage: section ``[storage]`` (transfers first; mounts add their keys here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from guestagent.checks import check_url

MiB = 1024 * 1024
# S3/OSS multipart limits: parts of 100 KiB (OSS) / 5 MiB (S3) to 5 GiB, at most 10,000.
MIN_PART = 5 * MiB
MAX_PART = 5 * 1024 * MiB
MAX_PARTS = 10_000
MAX_CONCURRENCY = 256  # parts/files in flight: threads, each with a connection


@dataclass(frozen=True)
class StorageSettings:
    # The daemon's storage service (mounts of [storage] mounts, output flush on a drain).
    enabled: bool = True
    # S3-compatible endpoint URL; empty: derived from the instance's region-id and
    # network-type (or BATCH_COMPUTE_OSS_HOST). Set it for the local cloud.
    endpoint: str = ""
    # Path-style requests (http://host/bucket/key). OSS itself takes virtual-hosted style
    # only; a loopback stand-in (moto, rclone serve s3) needs path style.
    path_style: bool = False
    # Region for the endpoint and signatures; empty: the instance's region-id.
    region: str = ""
    # auto: the -internal endpoint inside a VPC (network-type "vpc"), else public.
    network: Literal["auto", "internal", "public"] = "auto"

    # Transfers.
    part_size: int = 8 * MiB
    multipart_threshold: int = 32 * MiB
    concurrency: int = 8
    timeout: float = 60.0  # per request (connect and each read)
    retries: int = 8  # per request, with exponential backoff
    backoff_base: float = 0.2
    backoff_max: float = 10.0
    # Where resumable transfers keep their state; empty: <daemon.state_dir>/storage.
    state_dir: Path | None = None

    # Mounts made by the daemon's storage service and kept healthy, "SOURCE:/local/dir"
    # each as `bcs sub -r` writes them: oss://bucket/dir/:/mnt/in (read-only, rclone) or
    # nas://<id>.<region>.nas.aliyuncs.com:/path/:/mnt/nas (a systemd mount unit).
    mounts: list[str] = field(default_factory=list)
    # Empty: the rclone beside the agent's Python (guestagent[mounts]), else PATH's.
    rclone: str = ""
    mount_check_interval: float = 2.0  # health check (stat with a timeout) of each mount
    mount_stat_timeout: float = 2.0
    mount_ready_timeout: float = 30.0
    # Directories whose files the storage service uploads, "/local/dir/:oss://bucket/dir/"
    # each: what changed is flushed on a drain or stop (within its deadline), and with
    # output_streaming each file as soon as its writer closes it.
    outputs: list[str] = field(default_factory=list)
    output_streaming: bool = True
    # NAS: NFS version ("3" or "4.0"), locks (Lock: true drops nolock), mount on first use.
    nas_version: Literal["3", "4.0"] = "3"
    nas_lock: bool = False
    nas_automount: bool = False
    # The NFS server's ports: 2049, and 0 = MOUNT found through the portmapper (the local
    # cloud's ganesha listens elsewhere).
    nas_port: int = 2049
    nas_mount_port: int = 0

    def validate(self) -> None:
        self._check_mounts()
        self._check_endpoint()
        self._check_transfers()
        self._check_places()

    def _check_places(self) -> None:
        if self.state_dir is not None and not self.state_dir.is_absolute():
            # relative to wherever the CLI happens to run: a resume would not find it
            raise ValueError(f"state_dir: must be an absolute path, got {str(self.state_dir)!r}")
        for name, low in (("nas_port", 1), ("nas_mount_port", 0)):
            if not low <= getattr(self, name) <= 65535:
                raise ValueError(f"{name}: must be {low}..65535, got {getattr(self, name)}")

    def _check_mounts(self) -> None:
        for name in ("mount_check_interval", "mount_stat_timeout", "mount_ready_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.mounts or self.outputs:
            self._check_specs()

    def _check_specs(self) -> None:
        """Each declared mount and output parsed (the parser is imported only then)."""
        from guestagent.storage.errors import BadInput
        from guestagent.storage.mappings import (
            Mappings,
            check,
            parse_mount_spec,
            parse_output_spec,
        )

        try:
            mounts = tuple(parse_mount_spec(spec, "mounts") for spec in self.mounts)
            outputs = tuple(parse_output_spec(spec, "outputs") for spec in self.outputs)
        except BadInput as exc:
            raise ValueError(str(exc)) from None
        try:  # two mounts on one directory, or one inside another: one hides the other
            check(Mappings(mounts=mounts, outputs=outputs))
        except BadInput as exc:
            raise ValueError(f"mounts: {exc}") from None

    def _check_endpoint(self) -> None:
        if self.endpoint:
            _check_endpoint_text(self.endpoint)
            check_url(self.endpoint, "endpoint")
        if self.region and not all(p.isalnum() for p in self.region.split("-")):
            raise ValueError(f"region: not a region id: {self.region!r}")

    def _check_transfers(self) -> None:
        if not MIN_PART <= self.part_size <= MAX_PART:
            raise ValueError(
                f"part_size: must be {MIN_PART}..{MAX_PART} bytes, got {self.part_size}"
            )
        if self.multipart_threshold < self.part_size:
            raise ValueError("multipart_threshold: must be >= part_size")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(
                f"concurrency: must be 1..{MAX_CONCURRENCY}, got {self.concurrency}"
            )
        if self.timeout <= 0:
            raise ValueError(f"timeout: must be > 0, got {self.timeout}")
        if self.retries < 0:
            raise ValueError(f"retries: must be >= 0, got {self.retries}")
        if self.backoff_base <= 0 or self.backoff_max < self.backoff_base:
            raise ValueError("backoff_base: want 0 < backoff_base <= backoff_max")


def _check_endpoint_text(url: str) -> None:
    """Only ``scheme://host[:port]``: a path, query or ``user:password@`` would be dropped
    without a word (requests go to the host's root, keys come from the credential
    service), and a password written here would show in logs and ``config show``."""
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError(f"endpoint: {url!r} contains whitespace or a control character")
    try:
        parts = urlsplit(url)
    except ValueError:
        return  # check_url names it
    if "@" in parts.netloc:  # the URL is not echoed: it may hold a password
        raise ValueError("endpoint: must not carry a user or password; keys come from "
                         "the agent's credential service")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"endpoint: {url!r}: want scheme://host[:port], without a path "
                         "or query")
