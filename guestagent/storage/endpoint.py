"""Which host serves OSS's S3-compatible API, and how requests name a bucket there.

In order: ``[storage] endpoint`` (any URL; the local cloud sets it, with ``path_style``);
``BATCH_COMPUTE_OSS_HOST`` (BatchCompute's task environment; a native OSS host such as
``oss-cn-hangzhou-internal.aliyuncs.com`` becomes its ``s3.`` twin); else the instance's
``region-id`` from the metadata service: ``s3.oss-{region}[-internal].aliyuncs.com``, the
internal one inside a VPC (``network-type`` ``vpc``). OSS takes virtual-hosted style only
(``bucket.host/key``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from guestagent.storage.errors import StorageError
from guestagent.storage.settings import StorageSettings

OSS_HOST_ENV = "BATCH_COMPUTE_OSS_HOST"
# s3.oss-cn-hangzhou.aliyuncs.com / oss-cn-hangzhou-internal.aliyuncs.com -> cn-hangzhou
_OSS_HOST = re.compile(r"^(?:s3\.)?oss-([a-z0-9-]+?)(-internal)?\.aliyuncs\.com$")
DEFAULT_SIGNING_REGION = "us-east-1"  # what loopback stand-ins expect when none is known


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str  # without port
    port: int | None
    region: str  # signing region
    path_style: bool = False

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}" if self.port else self.host

    def host_for(self, bucket: str) -> str:
        """The ``Host`` header (and connection target) for requests on ``bucket``."""
        if self.path_style or not bucket:
            return self.netloc
        return f"{bucket}.{self.netloc}"

    def path_for(self, bucket: str, key: str = "") -> str:
        """The request path, key URI-encoded as SigV4 wants it (``/`` kept)."""
        encoded = quote(key, safe="/~")
        if self.path_style and bucket:
            return f"/{bucket}/{encoded}"
        return f"/{encoded}"

    def __str__(self) -> str:
        style = "path-style" if self.path_style else "virtual-hosted"
        return f"{self.scheme}://{self.netloc} ({style}, region {self.region})"


def oss_host(region: str, internal: bool) -> str:
    return f"s3.oss-{region}{'-internal' if internal else ''}.aliyuncs.com"


def region_of(host: str) -> str | None:
    match = _OSS_HOST.fullmatch(host)
    return match.group(1) if match else None


def from_url(url: str, *, region: str = "", path_style: bool = False) -> Endpoint:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError(f"endpoint: bad URL {url!r}: want http(s)://host[:port]")
    host = parts.hostname
    native = region_of(host)
    if native and not host.startswith("s3."):
        host = "s3." + host  # the native OSS API is not S3-compatible; its twin is
    signing = region or native or DEFAULT_SIGNING_REGION
    return Endpoint(parts.scheme, host, parts.port, signing, path_style)


def resolve(
    settings: StorageSettings,
    environ: Mapping[str, str],
    metadata: Callable[[], tuple[str, str]] | None = None,
) -> Endpoint:
    """The endpoint per the order above; ``metadata()`` gives (region-id, network-type)."""
    if settings.endpoint:
        return from_url(settings.endpoint, region=settings.region, path_style=settings.path_style)
    host = environ.get(OSS_HOST_ENV, "").strip()
    if host:
        return from_url(host, region=settings.region, path_style=settings.path_style)
    region, network = settings.region, ""
    if not region or settings.network == "auto":
        if metadata is None:
            raise StorageError(
                "no OSS endpoint: set [storage] endpoint or region, or run on an instance"
            )
        meta_region, network = metadata()
        region = region or meta_region
    internal = settings.network == "internal" or (
        settings.network == "auto" and network.strip().lower() == "vpc"
    )
    return Endpoint("https", oss_host(region, internal), None, region, settings.path_style)


def from_instance(metadata_settings: object) -> tuple[str, str]:
    """(region-id, network-type) of this instance, through the metadata client."""
    from guestagent.metadata.client import MetadataClient
    from guestagent.metadata.errors import MetadataError

    client = MetadataClient(metadata_settings)  # type: ignore[arg-type]
    try:
        region = client.region_id()
        network = client.get("meta-data/network-type") or ""
    except MetadataError as exc:
        raise StorageError(
            f"no OSS endpoint: the instance's region-id is unknown ({exc}); "
            "set [storage] endpoint or region"
        ) from None
    finally:
        client.close()
    return region, network
