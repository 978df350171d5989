"""Build an :class:`S3Client` (and :class:`Transfers`) from the agent's settings.

- CLI: ``client_for(settings)`` signs with keys from the local credential server's socket.
- Daemon: a service that declared ``requires=("credentials",)`` passes
  ``SourceKeys(ctx.service("credentials", CredentialAccess).source)``, so every request
  is signed with the rotator's current set and a rotation is never a failure.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from guestagent.storage import endpoint
from guestagent.storage.keys import KeyProvider, from_settings
from guestagent.storage.s3 import S3Client
from guestagent.storage.transfer import Options, Progress, Transfers


def client_for(
    settings: Any,
    keys: KeyProvider | None = None,
    environ: Mapping[str, str] | None = None,
) -> S3Client:
    """A client for the endpoint of ``[storage]`` (or the instance's region) signing with
    ``keys`` (default: the local credential server's socket, as the CLI does)."""
    st = settings.storage
    ep = endpoint.resolve(
        st,
        os.environ if environ is None else environ,
        lambda: endpoint.from_instance(settings.metadata),
    )
    return S3Client(
        ep,
        keys if keys is not None else from_settings(settings),
        timeout=st.timeout,
        retries=st.retries,
        backoff_base=st.backoff_base,
        backoff_max=st.backoff_max,
    )


def transfers_for(
    settings: Any,
    keys: KeyProvider | None = None,
    progress: Progress | None = None,
    environ: Mapping[str, str] | None = None,
) -> Transfers:
    """File and tree transfers with ``[storage]``'s part size, concurrency and state dir
    (what :class:`guestagent.storage.api.Storage` takes). Close it when done."""
    return Transfers(client_for(settings, keys, environ), Options.from_settings(settings),
                     progress)
