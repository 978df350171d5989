"""Control API of the emulator: JSON over HTTP on a loopback port, mirroring the in-process
control methods of :class:`~guestagent.localcloud.emulator.instance.Emulator`.

=======  ==================  ==========================================================
GET      /state              summary (no secrets)
GET      /credentials        every STS set issued so far (for the object-store stand-in)
GET      /ca.pem             the CA certificate that signs the identity pkcs7
POST     /faults             {path, kind, status?, latency?, count?, method?, body?} -> {id}
DELETE   /faults[/ID]        all rules, or one
POST     /spot               {in_seconds?, release_after?}
DELETE   /spot
PUT      /user-data          raw body
DELETE   /user-data
POST     /role               {name}
DELETE   /role
POST     /role/rotate
POST     /time-scale         {scale}
POST     /token              {required}
POST     /maintenance        {code, not_before_in?} -> {id}
DELETE   /maintenance
PUT      /value              {path, value}   (value null removes the leaf)
POST     /instance-id        {id}
=======  ==================  ==========================================================

Errors are ``{"code", "message"}``: 400 for bad JSON, unknown or mistyped fields.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from guestagent.localcloud.emulator.server import BaseHandler

Body = dict[str, Any]


class ControlError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _fields(body: Body, spec: dict[str, tuple[tuple[type, ...], bool]]) -> None:
    """Check ``body`` against ``{name: (types, required)}``; unknown fields are errors."""
    for name in body:
        if name not in spec:
            raise ControlError(400, "UnknownField", f"{name}: unknown field")
    for name, (types, required) in spec.items():
        value = body.get(name)
        if value is None:
            if required:
                raise ControlError(400, "MissingField", f"{name}: missing")
            continue
        # bool is an int in Python; JSON true is not a number here.
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise ControlError(400, "InvalidField", f"{name}: wrong type")


class ControlHandler(BaseHandler):
    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_PUT(self) -> None:
        self.dispatch("PUT")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    def dispatch(self, method: str) -> None:
        raw = self.read_body()
        path = self.path.partition("?")[0].rstrip("/") or "/"
        try:
            status, payload = self.route(method, path, raw)
        except ControlError as exc:
            status, payload = exc.status, {"code": exc.code, "message": str(exc)}
        except ValueError as exc:
            status, payload = 400, {"code": "InvalidValue", "message": str(exc)}
        if isinstance(payload, bytes):
            self.write(status, payload, "application/x-pem-file")
        else:
            self.write(status, json.dumps(payload).encode(), "application/json")

    def json_body(self, raw: bytes) -> Body:
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ControlError(400, "BadJson", f"body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ControlError(400, "BadJson", "body must be a JSON object")
        return body

    def route(self, method: str, path: str, raw: bytes) -> tuple[int, Body | bytes]:
        emu = self.server.emulator
        ok: Body = {"ok": True}
        simple: dict[tuple[str, str], Callable[[], Any]] = {
            ("GET", "/state"): emu.state,
            ("DELETE", "/faults"): emu.clear_faults,
            ("DELETE", "/spot"): emu.cancel_termination,
            ("DELETE", "/user-data"): lambda: emu.set_user_data(None),
            ("DELETE", "/role"): emu.detach_role,
            ("POST", "/role/rotate"): emu.rotate_credentials,
            ("DELETE", "/maintenance"): emu.clear_maintenance_events,
            ("DELETE", "/tokens"): emu.revoke_tokens,
        }
        if (method, path) in simple:
            if method != "GET":
                self.json_body(raw)  # ignored, but must not be garbage
            result = simple[(method, path)]()
            return 200, result if isinstance(result, dict) else ok
        if method == "GET" and path == "/credentials":
            return 200, {"credentials": emu.issued_credentials()}
        if method == "GET" and path == "/ca.pem":
            return 200, emu.ca_cert_pem
        if method == "PUT" and path == "/user-data":
            emu.set_user_data(raw)
            return 200, ok
        if method == "DELETE" and path.startswith("/faults/"):
            if not emu.remove_fault(path.removeprefix("/faults/")):
                raise ControlError(404, "NotFound", "no such fault rule")
            return 200, ok
        body = self.json_body(raw)
        number, text = (int, float), (str,)
        if method == "POST" and path == "/faults":
            _fields(
                body,
                {
                    "path": (text, True),
                    "kind": (text, True),
                    "status": ((int,), False),
                    "latency": (number, False),
                    "count": ((int,), False),
                    "method": (text, False),
                    "body": (text, False),
                },
            )
            args = {k: v for k, v in body.items() if v is not None and k not in ("path", "kind")}
            return 200, {"id": emu.add_fault(body["path"], body["kind"], **args)}
        if method == "POST" and path == "/spot":
            _fields(body, {"in_seconds": (number, False), "release_after": (number, False)})
            emu.schedule_termination(
                float(body.get("in_seconds") or 0.0), float(body.get("release_after", 300.0))
            )
            return 200, ok
        if method == "POST" and path == "/role":
            _fields(body, {"name": (text, True)})
            emu.attach_role(body["name"])
            return 200, ok
        if method == "POST" and path == "/time-scale":
            _fields(body, {"scale": (number, True)})
            emu.set_time_scale(float(body["scale"]))
            return 200, ok
        if method == "POST" and path == "/token":
            _fields(body, {"required": ((bool,), True)})
            emu.set_token_required(body["required"])
            return 200, ok
        if method == "POST" and path == "/maintenance":
            _fields(
                body,
                {"code": (text, True), "not_before_in": (number, False), "event_id": (text, False)},
            )
            event_id = emu.add_maintenance_event(
                body["code"], float(body.get("not_before_in") or 0.0), event_id=body.get("event_id")
            )
            return 200, {"id": event_id}
        if method == "PUT" and path == "/value":
            _fields(body, {"path": (text, True), "value": (text, False)})
            emu.set_value(body["path"], body.get("value"))
            return 200, ok
        if method == "POST" and path == "/instance-id":
            _fields(body, {"id": (text, True)})
            emu.set_instance_id(body["id"])
            return 200, ok
        raise ControlError(404, "NotFound", f"no control endpoint {method} {path}")
