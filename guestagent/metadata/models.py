"""Typed views of the metadata service's answers, each validated on the way in.

Parsers raise :class:`BadAnswer` naming the path and the field, never a bare
``KeyError``/``ValueError`` traceback.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from guestagent.metadata.errors import BadAnswer

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# The form the service sends, read without strptime (whose _strptime module and locale
# tables would stay loaded in the daemon); anything else still goes through strptime.
_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)Z")


def parse_time(text: str, where: str) -> datetime:
    """Parse the service's strict UTC form ``YYYY-MM-DDTHH:MM:SSZ``."""
    try:
        found = _TIME.fullmatch(text) if isinstance(text, str) and text.isascii() else None
        if found:
            y, mo, d, h, mi, s = (int(g) for g in found.groups())
            return datetime(y, mo, d, h, mi, s, tzinfo=UTC)
        return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)
    except (TypeError, ValueError):
        raise BadAnswer(
            f"{where}: expected a time like 2026-01-02T03:04:05Z, got {text!r}"
        ) from None


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


def load_json_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadAnswer(f"{where}: not valid JSON ({exc.msg} at char {exc.pos})") from None
    except RecursionError:
        raise BadAnswer(f"{where}: not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise BadAnswer(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _str_field(doc: dict[str, Any], key: str, where: str, *, allow_empty: bool = False) -> str:
    if key not in doc:
        raise BadAnswer(f"{where}: field {key!r} is missing")
    value = doc[key]
    if not isinstance(value, str) or (not value and not allow_empty):
        raise BadAnswer(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class IdentityDocument:
    zone_id: str
    serial_number: str
    instance_id: str
    region_id: str
    private_ipv4: str
    owner_account_id: str
    mac: str
    image_id: str
    instance_type: str

    @classmethod
    def parse(
        cls, text: str, where: str = "dynamic/instance-identity/document"
    ) -> IdentityDocument:
        doc = load_json_object(text, where)
        return cls(
            **{
                name: _str_field(doc, name.replace("_", "-"), where)
                for name in cls.__dataclass_fields__
            }
        )

    def to_json(self) -> dict[str, str]:
        return {name.replace("_", "-"): getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class NetworkInterface:
    mac: str
    network_interface_id: str
    netmask: str
    gateway: str
    primary_ip_address: str
    private_ipv4s: list[str]
    vpc_id: str
    vswitch_id: str


def parse_ip_list(text: str, where: str) -> list[str]:
    """``private-ipv4s`` is a JSON array on the real service; accept one-per-line too."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except (json.JSONDecodeError, RecursionError):
            raise BadAnswer(f"{where}: not a valid JSON array: {stripped[:60]!r}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadAnswer(f"{where}: expected a list of addresses")
        return value
    return lines(text)


def lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


# A RAM role name: 1-64 letters, digits, '.', '_' or '-' (what RAM accepts).
ROLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def parse_role_listing(text: str, where: str) -> list[str]:
    """The role names under ``ram/security-credentials/``; anything else is a bad answer.

    The error describes the answer's shape, never its content: a misrouted answer could
    hold a secret, and it must not reach a log or ``/v1/health``.
    """
    names = [ln.rstrip("/") for ln in lines(text)]
    if all(ROLE_NAME.fullmatch(n) for n in names):
        return names
    first = text.lstrip()[:1]
    shape = "a JSON document" if first in ("{", "[") else "text"
    raise BadAnswer(
        f"{where}: not a RAM role listing ({shape}, {len(text)} characters on "
        f"{len(text.splitlines())} lines; want one role name per line)"
    )


@dataclass(frozen=True)
class RoleCredentials:
    """One STS credential set of the instance's RAM role. ``repr`` never shows secrets."""

    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str = field(repr=False)
    expiration: datetime
    last_updated: datetime
    code: str = "Success"

    @classmethod
    def parse(cls, text: str, where: str) -> RoleCredentials:
        doc = load_json_object(text, where)
        code = doc.get("Code", "Success")
        if code != "Success":
            raise BadAnswer(f"{where}: the service reports Code={code!r}")
        return cls(
            access_key_id=_str_field(doc, "AccessKeyId", where),
            access_key_secret=_str_field(doc, "AccessKeySecret", where),
            security_token=_str_field(doc, "SecurityToken", where),
            expiration=parse_time(_str_field(doc, "Expiration", where), f"{where}: Expiration"),
            last_updated=parse_time(
                _str_field(doc, "LastUpdated", where), f"{where}: LastUpdated"
            ),
            code="Success",
        )

    def to_metadata_json(self) -> dict[str, str]:
        """The service's own document (what oss2 and ALIBABA_CLOUD_CREDENTIALS_URI read)."""
        return {
            "AccessKeyId": self.access_key_id,
            "AccessKeySecret": self.access_key_secret,
            "SecurityToken": self.security_token,
            "Expiration": format_time(self.expiration),
            "LastUpdated": format_time(self.last_updated),
            "Code": "Success",
        }

    def masked_key_id(self) -> str:
        return mask(self.access_key_id)


def mask(secret: str, keep: int = 4) -> str:
    """Show only the last few characters of an identifier-like secret."""
    if len(secret) <= keep * 2:
        return "*" * len(secret)
    return "*" * (len(secret) - keep) + (secret[-keep:] if keep else "")


@dataclass(frozen=True)
class MaintenanceEvent:
    event_id: str
    code: str
    not_before: datetime | None
    raw: dict[str, Any] = field(compare=False)

    @classmethod
    def parse_list(cls, text: str, where: str = "maintenance/active-system-events") -> list[
        MaintenanceEvent
    ]:
        try:
            value = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise BadAnswer(f"{where}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise BadAnswer(f"{where}: not valid JSON (nested too deeply)") from None
        if isinstance(value, dict):
            value = value.get("Events", value.get("events", [value]))
        if not isinstance(value, list):
            raise BadAnswer(f"{where}: expected a JSON list of events")
        events = []
        for i, item in enumerate(value):
            at = f"{where}[{i}]"
            if not isinstance(item, dict):
                raise BadAnswer(f"{at}: expected an object")
            event_id = item.get("EventId") or item.get("Id")
            code = item.get("Code") or item.get("EventType")
            if not isinstance(event_id, str) or not isinstance(code, str):
                raise BadAnswer(f"{at}: needs string EventId and Code")
            nb = item.get("NotBefore")
            events.append(
                cls(event_id, code, parse_time(nb, f"{at}.NotBefore") if nb else None, item)
            )
        return events
