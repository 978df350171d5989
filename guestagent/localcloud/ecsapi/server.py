"""An ECS-style RPC endpoint on loopback: signed requests, the actions a migration needs.

Requests are checked as the cloud checks them (common parameters, ``Timestamp`` against
the cloud's clock, nonce reuse, the access key, the HMAC-SHA1 signature, RAM permission)
and answered in the cloud's JSON shape (``{"RequestId", ...}`` or ``{"Code", "Message",
"RequestId"}`` with an HTTP error status). An intermediate instance is a real
:class:`~guestagent.localcloud.hosts.TestHost`; ``CreateImage`` records what arrived.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from guestagent.localcloud.ecsapi.account import Account
from guestagent.localcloud.ecsapi.cloud import Cloud, RpcError
from guestagent.migrate import signing

log = logging.getLogger(__name__)

COMMON = ("Action", "AccessKeyId", "Signature", "SignatureMethod", "SignatureVersion",
          "SignatureNonce", "Timestamp", "Version", "Format")


class EcsApi:
    """The endpoint: ``start()`` serves on 127.0.0.1 (free port); ``url`` to call it."""

    def __init__(self, account: Account, workdir: Path, subnet: str) -> None:
        self.account = account
        self.cloud = Cloud(account, workdir, subnet)
        self._nonces: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.calls: list[str] = []

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> EcsApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                query = urlsplit(self.path).query
                if urlsplit(self.path).path == "/_control/images":
                    self._send(200, {"Images": api.cloud.image_records()})
                    return
                self._send(*api.handle("GET", dict(parse_qsl(query, keep_blank_values=True))))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode(errors="replace")
                self._send(*api.handle("POST", dict(parse_qsl(body, keep_blank_values=True))))

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json;charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def date_time_string(self, timestamp: float | None = None) -> str:
                return format_datetime(api.now(), usegmt=True)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("ecsapi: " + format, *args)

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # clients open a connection per call

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ecsapi",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.cloud.release_all()

    def __enter__(self) -> EcsApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.account.clock_offset)

    # -- one request -----------------------------------------------------------------------
    def handle(self, method: str, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        request_id = str(uuid.uuid4()).upper()
        try:
            self._authenticate(method, params)
            action = params["Action"]
            with self._lock:
                self.calls.append(action)
            result = self.cloud.dispatch(action, params)
            return 200, {"RequestId": request_id, **result}
        except RpcError as exc:
            log.info("ecsapi %s: %s %s", params.get("Action"), exc.code, exc.message)
            return exc.status, {"Code": exc.code, "Message": exc.message,
                                "RequestId": request_id, "HostId": "ecs.aliyuncs.com"}
        except Exception:
            log.exception("ecsapi %s failed", params.get("Action"))
            return 500, {"Code": "InternalError", "Message": "The request processing has "
                         "failed due to some unknown error.", "RequestId": request_id}

    def _authenticate(self, method: str, params: dict[str, str]) -> None:
        missing = [p for p in COMMON if not params.get(p)]
        if missing:
            raise RpcError(400, "MissingParameter", f"The input parameter \"{missing[0]}\" "
                           "that is mandatory for processing this request is not supplied.")
        if params["SignatureMethod"] != "HMAC-SHA1" or params["SignatureVersion"] != "1.0":
            raise RpcError(400, "InvalidParameter", "Unsupported signature method or version.")
        self._check_timestamp(params["Timestamp"])
        key = self.account.keys.get(params["AccessKeyId"])
        if key is None:
            raise RpcError(404, "InvalidAccessKeyId.NotFound", "Specified access key is not "
                           "found.")
        if not signing.verify(key.secret, method, params):
            raise RpcError(400, "SignatureDoesNotMatch", "Specified signature is not matched "
                           "with our calculation.")
        with self._lock:
            if params["SignatureNonce"] in self._nonces:
                raise RpcError(400, "SignatureNonceUsed", "Specified signature nonce was used "
                               "already.")
            self._nonces.add(params["SignatureNonce"])
        if key.ram_user and not key.ecs_allowed:
            raise RpcError(403, "Forbidden.RAM", "User not authorized to operate on the "
                           "specified resource, or this API doesn't support RAM.")

    def _check_timestamp(self, text: str) -> None:
        try:
            stamp = datetime.strptime(text, signing.TIMESTAMP_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            raise RpcError(400, "InvalidTimeStamp.Format", "Specified time stamp or date value "
                           "is not well formatted.") from None
        if abs((self.now() - stamp).total_seconds()) > self.account.max_skew:
            raise RpcError(400, "InvalidTimeStamp.Expired", "Specified time stamp or date value "
                           "is expired.")
