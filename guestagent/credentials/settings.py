"""Settings of the credential service: section ``[credentials]``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CredentialSettings:
    enabled: bool = True
    # Role name; empty means "the one listed under ram/security-credentials/".
    role: str = ""

    def validate(self) -> None:
        pass
