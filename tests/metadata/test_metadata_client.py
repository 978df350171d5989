"""The metadata client against the emulator: both token modes, every fault kind, recovery."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from guestagent.metadata.client import MetadataClient
from guestagent.metadata.errors import BadAnswer, ServiceUnavailable
from guestagent.metadata.settings import MetadataSettings


def client_for(emu: Any, **overrides: Any) -> MetadataClient:
    opts: dict[str, Any] = {"timeout": 0.5, "retries": 2, "backoff_base": 0.02,
                            "backoff_max": 0.05}
    opts.update(overrides)
    return MetadataClient(MetadataSettings(url=emu.url, **opts))


@pytest.mark.parametrize("required", [False, True])
def test_typed_accessors_in_both_token_modes(emulator: Any, required: bool) -> None:
    emulator.set_token_required(required)
    c = client_for(emulator)
    ident = c.identity()
    assert ident.instance_id == c.instance_id()
    assert ident.region_id == c.region_id()
    assert c.nameservers() and c.ntp_servers()
    nics = c.network_interfaces()
    assert nics and nics[0].mac and nics[0].private_ipv4s
    assert c.public_keys()
    (role,) = c.ram_role_names()
    creds = c.ram_credentials(role)
    assert creds is not None and creds.access_key_id
    assert c.spot_termination_time() is None
    assert c.user_data() is None
    assert c.list("meta-data/") and "instance-id" in (c.list("meta-data/") or [])


def test_token_is_reused_not_requested_per_read(emulator: Any) -> None:
    emulator.set_token_required(True)
    c = client_for(emulator, cache_ttl=0)
    for _ in range(5):
        c.instance_id()
    puts = [r for r in emulator.requests_log if r[1] == "PUT"]
    assert len(puts) == 1


def test_absent_is_none_and_not_retried(emulator: Any) -> None:
    c = client_for(emulator)
    before = len(emulator.requests_log)
    assert c.get("meta-data/no-such-thing") is None
    gets = [r for r in emulator.requests_log[before:] if r[0].endswith("no-such-thing")]
    assert len(gets) == 1


def test_static_values_are_cached(emulator: Any) -> None:
    c = client_for(emulator)
    c.instance_id()
    n = len(emulator.requests_log)
    for _ in range(10):
        c.instance_id()
    assert len(emulator.requests_log) == n


def test_401_drops_the_token_and_retries_once(emulator: Any) -> None:
    emulator.set_token_required(True)
    c = client_for(emulator, cache_ttl=0)
    c.instance_id()
    emulator.add_fault("meta-data/instance-id", "status", status=401, count=1)
    assert c.instance_id()  # recovered with a fresh token
    puts = [r for r in emulator.requests_log if r[1] == "PUT"]
    assert len(puts) == 2


def test_persistent_401_does_not_loop(emulator: Any) -> None:
    emulator.set_token_required(True)
    c = client_for(emulator, cache_ttl=0)
    emulator.add_fault("meta-data/instance-id", "status", status=401)
    with pytest.raises(ServiceUnavailable, match="401"):
        c.instance_id()
    assert len([r for r in emulator.requests_log if r[1] == "PUT"]) <= 2


def test_token_refused_falls_back_unless_required(emulator: Any) -> None:
    emulator.add_fault("api/token", "status", status=403, method="PUT")
    assert client_for(emulator).instance_id()
    with pytest.raises(ServiceUnavailable, match="require_token"):
        client_for(emulator, require_token=True).instance_id()


def test_token_less_client_against_required_service_fetches_token(emulator: Any) -> None:
    emulator.add_fault("api/token", "status", status=403, method="PUT", count=1)
    c = client_for(emulator, cache_ttl=0)
    assert c.instance_id()  # token-less after the refused PUT
    emulator.set_token_required(True)
    assert c.instance_id()  # 403 → asks for a token again


@pytest.mark.parametrize(
    ("kind", "extra"),
    [("status", {"status": 500}), ("status", {"status": 503}), ("reset", {}),
     ("hang", {}), ("truncate", {})],
)
def test_transient_faults_are_retried(emulator: Any, kind: str, extra: dict[str, Any]) -> None:
    c = client_for(emulator)
    emulator.add_fault("meta-data/instance-id", kind, count=2, **extra)
    assert c.instance_id()


@pytest.mark.parametrize(
    ("kind", "extra", "needle"),
    [("status", {"status": 500}, "HTTP 500"), ("reset", {}, "reset"),
     ("hang", {}, "timed out"), ("truncate", {}, "truncated")],
)
def test_persistent_faults_are_clear_errors_then_recover(
    emulator: Any, kind: str, extra: dict[str, Any], needle: str
) -> None:
    c = client_for(emulator)
    emulator.add_fault("meta-data/instance-id", kind, **extra)
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=needle) as err:
        c.instance_id()
    assert time.monotonic() - start < 3.0
    assert "\n" not in str(err.value)
    emulator.clear_faults()
    assert c.instance_id()


def test_latency_below_timeout_is_fine(emulator: Any) -> None:
    emulator.add_fault("meta-data/instance-id", "latency", latency=0.2)
    assert client_for(emulator).instance_id()


@pytest.mark.parametrize(
    ("body", "needle"),
    [('{"AccessKeyId": "x", "Acc', "not valid JSON"),
     ('{"AccessKeyId": 1, "AccessKeySecret": "s", "SecurityToken": "t",'
      ' "Expiration": "2030-01-01T00:00:00Z", "LastUpdated": "2030-01-01T00:00:00Z"}',
      "'AccessKeyId' must be"),
     ('{"AccessKeyId": "a", "AccessKeySecret": "s", "SecurityToken": "t",'
      ' "Expiration": "tomorrow", "LastUpdated": "2030-01-01T00:00:00Z"}',
      "Expiration: expected a time")],
)
def test_bad_credential_answers(emulator: Any, body: str, needle: str) -> None:
    c = client_for(emulator)
    (role,) = c.ram_role_names()
    emulator.add_fault(f"meta-data/ram/security-credentials/{role}", "body", body=body)
    with pytest.raises(BadAnswer, match=needle):
        c.ram_credentials(role)
    emulator.clear_faults()
    assert c.ram_credentials(role) is not None


def test_bad_spot_time_is_a_clear_error(emulator: Any) -> None:
    emulator.add_fault("meta-data/instance/spot/termination-time", "body", body="soon")
    with pytest.raises(BadAnswer, match="termination-time"):
        client_for(emulator).spot_termination_time()


def test_spot_notice(emulator: Any) -> None:
    c = client_for(emulator)
    assert c.spot_termination_time() is None
    emulator.schedule_termination(in_seconds=0, release_after=300)
    t = c.spot_termination_time()
    assert t is not None and 200 < t.timestamp() - time.time() <= 301


def test_credentials_rotation_seen_by_client(emulator: Any) -> None:
    c = client_for(emulator)
    (role,) = c.ram_role_names()
    first = c.ram_credentials(role)
    emulator.rotate_credentials()
    second = c.ram_credentials(role)
    assert first and second and first.access_key_id != second.access_key_id


def test_detached_role(emulator: Any) -> None:
    c = client_for(emulator)
    (role,) = c.ram_role_names()
    emulator.detach_role()
    assert c.ram_role_names() == []
    assert c.ram_credentials(role) is None


def test_identity_signature_verifies(emulator: Any) -> None:
    c = client_for(emulator)
    ident = c.verify_identity(emulator.ca_cert_pem)
    assert ident.instance_id == c.instance_id()
    assert c.verify_identity(emulator.ca_cert_pem, audience="sts.aliyuncs.com")


def test_identity_signature_for_the_wrong_audience_is_refused(emulator: Any) -> None:
    from guestagent.metadata.pkcs7 import verify_identity_signature

    c = client_for(emulator)
    doc = c.get_fresh("dynamic/instance-identity/document")
    assert doc is not None
    # Made without an audience (a signature anyone could have asked for) ...
    plain = c.identity_pkcs7()
    with pytest.raises(BadAnswer, match="without an audience"):
        verify_identity_signature(doc, plain, emulator.ca_cert_pem, "sts.aliyuncs.com")
    # ... or for another audience: neither passes a check naming ours.
    other = c.identity_pkcs7("other.example.com")
    with pytest.raises(BadAnswer, match="wrong audience"):
        verify_identity_signature(doc, other, emulator.ca_cert_pem, "sts.aliyuncs.com")
    with pytest.raises(BadAnswer, match="pkcs7"):
        verify_identity_signature(doc, other, emulator.ca_cert_pem)


def test_thread_safety(emulator: Any) -> None:
    emulator.set_token_required(True)
    c = client_for(emulator, cache_ttl=0)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(30):
                assert c.instance_id()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_bad_paths_refused_before_any_request(emulator: Any) -> None:
    c = client_for(emulator)
    for path in ("meta-data/../x", "meta-data/a b", "meta-data/\n"):
        with pytest.raises(ValueError, match="bad metadata path"):
            c.get(path)


def test_token_renewed_before_it_expires(emulator: Any) -> None:
    emulator.set_token_required(True)
    c = client_for(emulator, cache_ttl=0, token_ttl=2)
    c.instance_id()
    time.sleep(2.3)  # past the token's life: the client must have renewed, not hit a 401
    c.instance_id()
    statuses = [r[2] for r in emulator.requests_log]
    assert 401 not in statuses
    assert len([r for r in emulator.requests_log if r[1] == "PUT"]) == 2


@pytest.mark.parametrize("body", ["abc\ndef", "abc\u00e9def", "x" * 5000],
                         ids=["newline", "non-ascii", "too long"])
def test_a_garbled_token_answer_is_retried_not_a_traceback(emulator: Any, body: str) -> None:
    # Sent back as a header it made http.client raise ValueError out of the client.
    emulator.set_token_required(True)
    emulator.add_fault("api/token", "body", body=body, method="PUT", count=1)
    assert client_for(emulator, cache_ttl=0).instance_id()  # the next PUT's token works
    emulator.add_fault("api/token", "body", body=body, method="PUT")
    with pytest.raises(ServiceUnavailable, match="not a token"):
        client_for(emulator, cache_ttl=0).instance_id()
