"""Settings of the metadata client: section ``[metadata]``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from guestagent.checks import check_url

DEFAULT_URL = "http://100.100.100.200"


@dataclass(frozen=True)
class MetadataSettings:
    url: str = DEFAULT_URL
    version: Literal["latest", "2016-01-01"] = "latest"
    # Hardened mode: PUT a token first. With require_token, a refused PUT is an error
    # instead of a fall-back to token-less reads.
    use_token: bool = True
    require_token: bool = False
    token_ttl: int = 21600
    timeout: float = 1.0
    retries: int = 3
    backoff_base: float = 0.1
    backoff_max: float = 1.0
    # Static values (instance id, identity, network) are cached: the service is rate-limited.
    cache_ttl: float = 300.0
    # CA certificate (PEM) used to verify the identity document's pkcs7 signature.
    ca_cert: Path | None = None

    def validate(self) -> None:
        check_url(self.url, "url")
        if not 1 <= self.token_ttl <= 21600:
            raise ValueError(f"token_ttl: must be 1..21600 seconds, got {self.token_ttl}")
        if self.timeout <= 0:
            raise ValueError(f"timeout: must be > 0, got {self.timeout}")
        if self.retries < 0:
            raise ValueError(f"retries: must be >= 0, got {self.retries}")
        if self.cache_ttl < 0:
            raise ValueError(f"cache_ttl: must be >= 0, got {self.cache_ttl}")
