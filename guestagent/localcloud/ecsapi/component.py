"""The ECS API as a ``localcloud up --with ecs`` component.

The account comes from ``GUESTAGENT_LOCALCLOUD_ECS_ACCOUNT`` (a TOML scenario, see
:mod:`account`) or is made up with one fresh key, written 0600 to ``<workdir>/access_key``
(the environment names the file, never the secret).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from pathlib import Path

from guestagent.files import atomic_write
from guestagent.localcloud.ecsapi.account import Account, load_account
from guestagent.localcloud.ecsapi.server import EcsApi


class EcsComponent:
    name = "ecs"

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self.workdir = workdir
        scenario = env.get("GUESTAGENT_LOCALCLOUD_ECS_ACCOUNT")
        if scenario:
            self.account = load_account(scenario)
        else:
            self.account, _ = Account.with_key()
        # A /24 for this cloud's instances: random, so two local clouds rarely meet (and a
        # collision only costs a retry: hosts pick free /30s under a lock).
        subnet = env.get("GUESTAGENT_LOCALCLOUD_ECS_SUBNET") or \
            f"10.213.{secrets.randbelow(256)}.0/24"
        self.api = EcsApi(self.account, workdir, subnet)

    def start(self) -> dict[str, str]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.api.start()
        keys = [{"access_id": k.id, "secret_key": k.secret} for k in self.account.keys.values()]
        key_file = atomic_write(self.workdir / "access_key", json.dumps(keys, indent=2),
                                mode=0o600)
        return {"GUESTAGENT_MIGRATE_ENDPOINT": self.api.url,
                "GUESTAGENT_LOCALCLOUD_ECS_KEYS": str(key_file),
                "GUESTAGENT_LOCALCLOUD_ECS_SUBNET": str(self.api.cloud.subnet)}

    def stop(self) -> None:
        self.api.stop()
