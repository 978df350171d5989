"""RAM role credentials: the rotation timeline, time scaling, export and the issuer hook."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from _emulator_http import get

from guestagent.localcloud.emulator import Emulator, load_scenario
from guestagent.localcloud.emulator.roles import RoleCredentials

ROLE = "EcsRamRoleDemo"
PATH = f"/latest/meta-data/ram/security-credentials/{ROLE}"


def parse(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def read(emu: Any) -> dict[str, str]:
    status, body = get(emu.url, PATH)
    assert status == 200
    doc: dict[str, str] = json.loads(body)
    return doc


def test_document_format(emulator: Any) -> None:
    doc = read(emulator)
    assert set(doc) == {
        "AccessKeyId",
        "AccessKeySecret",
        "SecurityToken",
        "Expiration",
        "LastUpdated",
        "Code",
    }
    assert doc["Code"] == "Success" and doc["AccessKeyId"].startswith("STS.")
    now = time.time()
    # Real wall-clock timestamps: valid 6 h from now.
    assert abs(parse(doc["Expiration"]) - (now + 6 * 3600)) < 5
    assert abs(parse(doc["LastUpdated"]) - now) < 5
    assert read(emulator) == doc  # stable until rotation
    assert emulator.issued_credentials()[-1]["AccessKeyId"] == doc["AccessKeyId"]


def test_rotation_timeline_with_injected_clock() -> None:
    now = [1_700_000_000.0]
    emu = Emulator(clock=lambda: now[0])
    with emu.start():
        first = read(emu)
        assert parse(first["Expiration"]) == now[0] + 21600
        now[0] += 21600 - 1800 - 1  # just before the overlap starts
        assert read(emu) == first
        now[0] += 1  # 30 min before expiry a new set appears...
        second = read(emu)
        assert second["AccessKeyId"] != first["AccessKeyId"]
        assert parse(second["Expiration"]) == now[0] + 21600
        # ...and both are valid until the first one's expiry.
        assert [c.access_key_id for c in emu.roles.valid()] == [
            first["AccessKeyId"],
            second["AccessKeyId"],
        ]
        now[0] += 1800
        assert [c.access_key_id for c in emu.roles.valid()] == [second["AccessKeyId"]]
        assert read(emu) == second
        assert len(emu.issued_credentials()) == 2


def test_rotation_in_real_time_with_time_scale() -> None:
    # 6 h / 14400 = 1.5 s validity; the new set appears 30 min / 14400 = 0.125 s before expiry.
    scenario = load_scenario(overrides={"ram": {"time_scale": 14400}})
    with Emulator(scenario).start() as emu:
        first = read(emu)
        start = time.time()
        assert parse(first["Expiration"]) - start <= 1.5
        deadline = start + 5
        while time.time() < deadline:
            current = read(emu)
            if current["AccessKeyId"] != first["AccessKeyId"]:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("no rotation within 5 s")
        # Times are whole seconds (as published), so the set lives 0.5..1.5 s and the new
        # one appears 0.125 s before the first one's published Expiration.
        left = parse(first["Expiration"]) - time.time()
        assert 0.0 < left <= 0.2, left
        valid = emu.roles.valid()  # the old set is still valid at the moment the new appears
        assert first["AccessKeyId"] in {c.access_key_id for c in valid}


def test_time_scale_change_rotate_and_export(emulator: Any) -> None:
    first = read(emulator)
    emulator.set_time_scale(3600)
    second = read(emulator)
    assert second["AccessKeyId"] != first["AccessKeyId"]
    assert parse(second["Expiration"]) - time.time() <= 6
    emulator.rotate_credentials()
    third = read(emulator)
    assert third["AccessKeyId"] not in (first["AccessKeyId"], second["AccessKeyId"])
    issued = emulator.issued_credentials()
    assert [c["AccessKeyId"] for c in issued] == [
        first["AccessKeyId"],
        second["AccessKeyId"],
        third["AccessKeyId"],
    ]
    assert all(
        {"AccessKeyId", "AccessKeySecret", "SecurityToken", "Expiration"} <= set(c) for c in issued
    )
    assert emulator.current_credentials() == third


def test_issuer_hook(emulator: Any) -> None:
    minted = iter([("AKIDEXAMPLE1", "secret1", "token1"), ("AKIDEXAMPLE2", "secret2", "token2")])
    emulator.set_credential_issuer(lambda: next(minted))
    emulator.rotate_credentials()
    doc = read(emulator)
    assert (doc["AccessKeyId"], doc["AccessKeySecret"], doc["SecurityToken"]) == (
        "AKIDEXAMPLE1",
        "secret1",
        "token1",
    )
    emulator.rotate_credentials()
    assert read(emulator)["AccessKeyId"] == "AKIDEXAMPLE2"
    emulator.set_credential_issuer(None)
    emulator.rotate_credentials()
    assert read(emulator)["AccessKeyId"].startswith("STS.")


def test_attach_and_detach(emulator: Any) -> None:
    emulator.detach_role()
    assert get(emulator.url, PATH)[0] == 404
    assert get(emulator.url, "/latest/meta-data/ram/security-credentials/")[0] == 404
    assert "ram/" not in get(emulator.url, "/latest/meta-data/")[1].split("\n")
    emulator.attach_role("OtherRole")
    assert get(emulator.url, "/latest/meta-data/ram/security-credentials/") == (200, "OtherRole")
    assert get(emulator.url, PATH)[0] == 404
    assert get(emulator.url, "/latest/meta-data/ram/security-credentials/OtherRole")[0] == 200


def test_secrets_not_in_repr() -> None:
    roles = RoleCredentials()
    roles.attach(ROLE)
    (current,) = roles.valid()
    assert current.access_key_secret not in repr(current)
    assert current.security_token not in repr(current)
