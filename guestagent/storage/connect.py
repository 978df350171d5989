"""Build an :class:`S3Client` from the agent's settings (the CLI's and the daemon's way in)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from guestagent.storage import endpoint
from guestagent.storage.keys import KeyProvider, from_settings
from guestagent.storage.s3 import S3Client


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
