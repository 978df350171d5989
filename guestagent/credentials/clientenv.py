"""The exact environment each client needs to read the local credential server unchanged.

``guestagent credentials env --for CLIENT`` prints these lines from the running server's
own answer to ``GET /v1/endpoints`` (over the Unix socket: the answer names the capability
path), so they always match what is really listening.

- ``alibaba``: the Alibaba Cloud credentials SDKs and the aliyun CLI read
  ``ALIBABA_CLOUD_CREDENTIALS_URI`` (the metadata JSON). They cannot send a header, so the
  URL carries the capability path. Their default chain asks the ECS metadata service
  *before* that URI, and would never reach us on an instance with a role (or would hang
  where there is no metadata service): ``ALIBABA_CLOUD_ECS_METADATA_DISABLED=true``.
- ``oss2``: ``EcsRamRoleCredentialsProvider(url)`` takes the URL in code; the line names
  it in a variable and the comment says how to pass it.
- ``aws``: boto3, the AWS CLI and the Go/Java SDKs read
  ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` with ``AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE``
  (re-read at every refresh); ``AWS_EC2_METADATA_DISABLED=true`` so they never fall back
  to 169.254.169.254.
- ``rclone``: its S3 backend with ``env_auth`` uses the AWS SDK chain: the ``aws`` lines
  plus ``RCLONE_S3_ENV_AUTH=true``.
"""

from __future__ import annotations

from collections.abc import Mapping

CLIENTS = ("alibaba", "oss2", "aws", "rclone")


class NoEndpoint(Exception):
    """The server does not serve what that client needs (TCP off, say)."""


def lines_for(client: str, endpoints: Mapping[str, str]) -> list[str]:
    """``KEY=value`` lines (and ``#`` comments) for one client, or every one (``all``)."""
    if client == "all":
        out: list[str] = []
        seen: set[str] = set()
        for name in CLIENTS:
            out.append(f"# {name}")
            for line in lines_for(name, endpoints):
                if line not in seen or line.startswith("#"):
                    out.append(line)
                    seen.add(line)
        return out
    if client in ("alibaba", "oss2"):
        url = _need(endpoints, "alibaba", client)
        if client == "oss2":
            return [
                "# auth = oss2.ProviderAuth(oss2.credentials.EcsRamRoleCredentialsProvider("
                'os.environ["GUESTAGENT_CREDENTIALS_URI"]))',
                f"GUESTAGENT_CREDENTIALS_URI={url}",
            ]
        return [f"ALIBABA_CLOUD_CREDENTIALS_URI={url}", "ALIBABA_CLOUD_ECS_METADATA_DISABLED=true"]
    if client in ("aws", "rclone"):
        url = _need(endpoints, "aws", client)
        token = _need(endpoints, "token_file", client)
        out = [
            f"AWS_CONTAINER_CREDENTIALS_FULL_URI={url}",
            f"AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={token}",
            "AWS_EC2_METADATA_DISABLED=true",
        ]
        return [*out, "RCLONE_S3_ENV_AUTH=true"] if client == "rclone" else out
    raise ValueError(f"unknown client {client!r}; one of {', '.join(CLIENTS)}, all")


def _need(endpoints: Mapping[str, str], key: str, client: str) -> str:
    value = endpoints.get(key)
    if not value:
        raise NoEndpoint(
            f"the credential server has no TCP endpoint for {client} (is "
            "credentials.tcp_enabled off, or the port taken? see `guestagent status`)"
        )
    return value
