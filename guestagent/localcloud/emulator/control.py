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
import math
from collections.abc import Callable
from typing import Any

from guestagent import jsondoc
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
            # A repeated key is refused: a scripted fault must do what the test wrote.
            body = jsondoc.loads(raw, parse_float=_finite, parse_constant=_finite)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ControlError(400, "BadJson", f"body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ControlError(400, "BadJson", "body must be a JSON object")
        return body

    def route(self, method: str, path: str, raw: bytes) -> tuple[int, Body | bytes]:
        """One control request: a table from (method, path) to what it does."""
        emu = self.server.emulator
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
            return 200, result if isinstance(result, dict) else _done(None)
        def put_user_data(data: bytes) -> Body:
            emu.set_user_data(data)
            return _done(None)

        raw_routes: dict[tuple[str, str], Callable[[bytes], Body | bytes]] = {
            ("GET", "/credentials"): lambda _: {"credentials": emu.issued_credentials()},
            ("GET", "/ca.pem"): lambda _: emu.ca_cert_pem,
            ("PUT", "/user-data"): put_user_data,
        }
        if (method, path) in raw_routes:
            return 200, raw_routes[(method, path)](raw)
        if method == "DELETE" and path.startswith("/faults/"):
            if not emu.remove_fault(path.removeprefix("/faults/")):
                raise ControlError(404, "NotFound", "no such fault rule")
            return 200, _done(None)
        action = _BODY_ROUTES.get((method, path))
        if action is None:
            raise ControlError(404, "NotFound", f"no control endpoint {method} {path}")
        fields, call = action
        body = self.json_body(raw)
        _fields(body, fields)
        return 200, call(emu, body)


_NUMBER, _TEXT = (int, float), (str,)


def _finite(text: str) -> float:
    """NaN, Infinity or 1e999 as a delay or a scale broke the emulator (its clock, its
    spot timer): refused with the body."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"a number must be finite, got {text}")
    return value


def _done(_: object) -> Body:
    return {"ok": True}


def _add_fault(emu: Any, body: Body) -> Body:
    args = {k: v for k, v in body.items() if v is not None and k not in ("path", "kind")}
    return {"id": emu.add_fault(body["path"], body["kind"], **args)}


def _maintenance(emu: Any, body: Body) -> Body:
    event_id = emu.add_maintenance_event(
        body["code"], float(body.get("not_before_in") or 0.0), event_id=body.get("event_id")
    )
    return {"id": event_id}


# (method, path) -> (the JSON body's fields: (types, required), what to do with it)
_BODY_ROUTES: dict[tuple[str, str], tuple[dict[str, Any], Callable[[Any, Body], Body]]] = {
    ("POST", "/faults"): (
        {"path": (_TEXT, True), "kind": (_TEXT, True), "status": ((int,), False),
         "latency": (_NUMBER, False), "count": ((int,), False), "method": (_TEXT, False),
         "body": (_TEXT, False)},
        _add_fault),
    ("POST", "/spot"): (
        {"in_seconds": (_NUMBER, False), "release_after": (_NUMBER, False)},
        lambda emu, b: _done(emu.schedule_termination(
            float(b.get("in_seconds") or 0.0), float(b.get("release_after", 300.0))))),
    ("POST", "/role"): ({"name": (_TEXT, True)},
                        lambda emu, b: _done(emu.attach_role(b["name"]))),
    ("POST", "/time-scale"): ({"scale": (_NUMBER, True)},
                              lambda emu, b: _done(emu.set_time_scale(float(b["scale"])))),
    ("POST", "/token"): ({"required": ((bool,), True)},
                         lambda emu, b: _done(emu.set_token_required(b["required"]))),
    ("POST", "/maintenance"): (
        {"code": (_TEXT, True), "not_before_in": (_NUMBER, False), "event_id": (_TEXT, False)},
        _maintenance),
    ("PUT", "/value"): ({"path": (_TEXT, True), "value": (_TEXT, False)},
                        lambda emu, b: _done(emu.set_value(b["path"], b.get("value")))),
    ("POST", "/instance-id"): ({"id": (_TEXT, True)},
                               lambda emu, b: _done(emu.set_instance_id(b["id"]))),
}
