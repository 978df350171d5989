"""Raw HTTP against the emulator (not the project's client: these tests pin the service)."""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

TOKEN = "X-aliyun-ecs-metadata-token"
TTL = "X-aliyun-ecs-metadata-token-ttl-seconds"


def request(
    url: str,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get(url: str, path: str, **kw: Any) -> tuple[int, str]:
    status, body = request(url, path, **kw)
    return status, body.decode()


def token(url: str, ttl: int = 60) -> str:
    status, body = request(url, "/latest/api/token", "PUT", {TTL: str(ttl)})
    assert status == 200, status
    return body.decode()


def control(
    emu: Any, method: str, path: str, payload: Any = None, raw: bytes | None = None
) -> tuple[int, Any]:
    body = (
        raw if raw is not None else (json.dumps(payload).encode() if payload is not None else None)
    )
    status, data = request(emu.control_url, path, method, body=body)
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data
