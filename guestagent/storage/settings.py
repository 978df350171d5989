"""Settings of storage: section ``[storage]`` (transfers first; mounts add their keys here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from guestagent.checks import check_url

MiB = 1024 * 1024
# S3/OSS multipart limits: parts of 100 KiB (OSS) / 5 MiB (S3) to 5 GiB, at most 10,000.
MIN_PART = 5 * MiB
MAX_PART = 5 * 1024 * MiB
MAX_PARTS = 10_000


@dataclass(frozen=True)
class StorageSettings:
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

    def validate(self) -> None:
        if self.endpoint:
            check_url(self.endpoint, "endpoint")
        if self.region and not all(p.isalnum() for p in self.region.split("-")):
            raise ValueError(f"region: not a region id: {self.region!r}")
        if not MIN_PART <= self.part_size <= MAX_PART:
            raise ValueError(
                f"part_size: must be {MIN_PART}..{MAX_PART} bytes, got {self.part_size}"
            )
        if self.multipart_threshold < self.part_size:
            raise ValueError("multipart_threshold: must be >= part_size")
        if not 1 <= self.concurrency <= 256:
            raise ValueError(f"concurrency: must be 1..256, got {self.concurrency}")
        if self.timeout <= 0:
            raise ValueError(f"timeout: must be > 0, got {self.timeout}")
        if self.retries < 0:
            raise ValueError(f"retries: must be >= 0, got {self.retries}")
        if self.backoff_base <= 0 or self.backoff_max < self.backoff_base:
            raise ValueError("backoff_base: want 0 < backoff_base <= backoff_max")
