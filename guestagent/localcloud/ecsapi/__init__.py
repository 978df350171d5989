"""The local cloud's ECS API: signed RPC requests, intermediate instances as real test
hosts (network namespace + sshd), images recorded from what arrived."""

from guestagent.localcloud.ecsapi.account import AccessKey, Account, load_account
from guestagent.localcloud.ecsapi.server import EcsApi

__all__ = ["AccessKey", "Account", "EcsApi", "load_account"]
