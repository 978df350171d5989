"""The account behind the local ECS API, from a scenario: who may call, and what the cloud
will refuse. Each field produces one of the migration guide's FAQ errors on purpose:

- ``keys[].ram_user`` + ``ecs_allowed = false`` → ``Forbidden.RAM``
- ``whitelisted = false`` → ``OperationDenied`` (not approved for the migration tool)
- ``balance`` below ``instance_price`` → ``InvalidAccountStatus.NotEnoughBalance``
- ``images`` (existing names) → ``InvalidImageName.Duplicated``
- ``clock_offset`` (the cloud's clock minus ours, seconds) → ``InvalidTimeStamp.Expired``
- a ``Platform`` that is not the received tree's OS → ``UnknownError`` ("Unknown Error")
"""

from __future__ import annotations

import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AccessKey:
    id: str
    secret: str = field(repr=False)
    ram_user: bool = False
    ecs_allowed: bool = True


@dataclass
class Account:
    keys: dict[str, AccessKey] = field(default_factory=dict)
    whitelisted: bool = True
    balance: float = 100.0
    instance_price: float = 1.0
    images: list[str] = field(default_factory=list)
    clock_offset: float = 0.0
    max_skew: float = 900.0
    region: str = "cn-hangzhou"

    @classmethod
    def with_key(cls, **kwargs: Any) -> tuple[Account, AccessKey]:
        key = AccessKey("LTAI5t" + secrets.token_hex(8), secrets.token_urlsafe(24))
        account = cls(**kwargs)
        account.keys[key.id] = key
        return account, key

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> Account:
        known = set(cls.__dataclass_fields__) - {"keys"}
        unknown = set(raw) - known - {"keys"}
        if unknown:
            raise ValueError(f"ecs account: unknown field(s) {', '.join(sorted(unknown))}")
        keys = {}
        for entry in raw.get("keys", []):
            key = AccessKey(str(entry["id"]), str(entry["secret"]),
                            bool(entry.get("ram_user", False)),
                            bool(entry.get("ecs_allowed", True)))
            keys[key.id] = key
        return cls(keys=keys, **{k: v for k, v in raw.items() if k in known})


def load_account(path: str | Path) -> Account:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the ECS account scenario: {exc}") from None
    return Account.from_mapping(raw.get("ecs", raw))
