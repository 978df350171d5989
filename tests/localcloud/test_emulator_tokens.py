"""Hardened mode exactly as the real service: every token rule."""

from __future__ import annotations

from typing import Any

import pytest
from _emulator_http import TOKEN, TTL, get, request, token

from guestagent.localcloud.emulator.tokens import TokenStore, parse_ttl

LEAF = "/latest/meta-data/instance-id"


@pytest.mark.parametrize("ttl", [None, "0", "21601", "-5", "abc", "1.5", ""])
def test_bad_ttl_is_400(emulator: Any, ttl: str | None) -> None:
    headers = {} if ttl is None else {TTL: ttl}
    assert request(emulator.url, "/latest/api/token", "PUT", headers)[0] == 400


@pytest.mark.parametrize("ttl", ["1", "21600"])
def test_ttl_bounds_are_accepted(emulator: Any, ttl: str) -> None:
    status, body = request(emulator.url, "/latest/api/token", "PUT", {TTL: ttl})
    assert status == 200 and len(body) >= 32


def test_forwarded_put_is_403(emulator: Any) -> None:
    headers = {TTL: "60", "X-Forwarded-For": "10.0.0.1"}
    assert request(emulator.url, "/latest/api/token", "PUT", headers)[0] == 403


def test_tokens_optional(emulator: Any) -> None:
    assert get(emulator.url, LEAF)[0] == 200  # token-less read works
    good = token(emulator.url)
    assert get(emulator.url, LEAF, headers={TOKEN: good})[0] == 200
    # ...but a read carrying an invalid token still gets 401.
    assert get(emulator.url, LEAF, headers={TOKEN: "not-a-token"})[0] == 401


def test_tokens_required(emulator: Any) -> None:
    emulator.set_token_required(True)
    assert get(emulator.url, LEAF)[0] == 403
    assert get(emulator.url, "/latest/meta-data/")[0] == 403
    assert get(emulator.url, LEAF, headers={TOKEN: "bogus"})[0] == 401
    good = token(emulator.url)
    assert get(emulator.url, LEAF, headers={TOKEN: good}) == (
        200,
        emulator.scenario.instance.instance_id,
    )
    emulator.revoke_tokens()
    assert get(emulator.url, LEAF, headers={TOKEN: good})[0] == 401
    emulator.set_token_required(False)
    assert get(emulator.url, LEAF)[0] == 200


def test_expired_token_is_401(emulator: Any) -> None:
    now = [1000.0]
    emulator.tokens = TokenStore(clock=lambda: now[0])
    emulator.set_token_required(True)
    tok = token(emulator.url, ttl=5)
    assert get(emulator.url, LEAF, headers={TOKEN: tok})[0] == 200
    now[0] += 5.0
    assert get(emulator.url, LEAF, headers={TOKEN: tok})[0] == 401


def test_hardened_scenario(emulator_factory: Any) -> None:
    emu = emulator_factory("hardened.toml")
    assert emu.token_required
    assert get(emu.url, LEAF)[0] == 403
    tok = token(emu.url)
    assert get(emu.url, "/2016-01-01/user-data", headers={TOKEN: tok})[1].startswith("#!/bin/sh")
    # No role in this scenario: the credentials directory is absent.
    assert (
        get(emu.url, "/latest/meta-data/ram/security-credentials/", headers={TOKEN: tok})[0] == 404
    )


def test_parse_ttl() -> None:
    assert parse_ttl(" 30 ") == 30
    assert parse_ttl("21600") == 21600
    assert parse_ttl("21601") is None and parse_ttl(None) is None
