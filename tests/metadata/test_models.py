from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from guestagent.metadata.errors import BadAnswer
from guestagent.metadata.models import IdentityDocument, MaintenanceEvent, RoleCredentials
from guestagent.metadata.pkcs7 import signed_content, verify_identity_signature

CREDS = {
    "AccessKeyId": "STS.AKID1234567890",
    "AccessKeySecret": "very-secret-value",
    "SecurityToken": "CAIS-token-value",
    "Expiration": "2026-11-21T10:00:00Z",
    "LastUpdated": "2026-11-21T04:00:00Z",
    "Code": "Success",
}


def test_credentials_parse_and_repr_hides_secrets() -> None:
    c = RoleCredentials.parse(json.dumps(CREDS), "ram")
    assert c.expiration == dt.datetime(2026, 11, 21, 10, tzinfo=dt.UTC)
    assert "very-secret" not in repr(c) and "CAIS" not in repr(c)
    assert c.to_metadata_json() == CREDS


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.pop("SecurityToken"), "'SecurityToken' is missing"),
        (lambda d: d.update(Expiration="2026-11-21 10:00:00"), "Expiration: expected a time"),
        (lambda d: d.update(AccessKeyId=5), "'AccessKeyId' must be a non-empty string"),
        (lambda d: d.update(Code="Failed"), "Code='Failed'"),
    ],
)
def test_bad_credential_documents(mutate, needle) -> None:  # type: ignore[no-untyped-def]
    doc = dict(CREDS)
    mutate(doc)
    with pytest.raises(BadAnswer, match=needle):
        RoleCredentials.parse(json.dumps(doc), "ram/security-credentials/r")


@pytest.mark.parametrize("text", ['{"AccessKeyId": "x"', "[]", "", "null"])
def test_truncated_or_wrong_json(text: str) -> None:
    with pytest.raises(BadAnswer, match="ram"):
        RoleCredentials.parse(text, "ram")


def test_answers_nested_too_deeply_are_bad_answers() -> None:
    deep = "[" * 100_000  # a hostile or broken service: json recurses per level
    with pytest.raises(BadAnswer, match="ram: not valid JSON"):
        RoleCredentials.parse(deep, "ram")
    with pytest.raises(BadAnswer, match="nested too deeply"):
        IdentityDocument.parse(deep)
    with pytest.raises(BadAnswer, match="nested too deeply"):
        MaintenanceEvent.parse_list(deep)


def test_identity_document_fields() -> None:
    doc = {k: f"v-{k}" for k in (
        "zone-id", "serial-number", "instance-id", "region-id", "private-ipv4",
        "owner-account-id", "mac", "image-id", "instance-type")}
    ident = IdentityDocument.parse(json.dumps(doc))
    assert ident.to_json() == doc
    del doc["mac"]
    with pytest.raises(BadAnswer, match="'mac' is missing"):
        IdentityDocument.parse(json.dumps(doc))


def test_maintenance_events() -> None:
    text = json.dumps([{"EventId": "e-1", "Code": "SystemMaintenance.Reboot",
                        "NotBefore": "2026-11-22T00:00:00Z"}])
    (ev,) = MaintenanceEvent.parse_list(text)
    assert ev.event_id == "e-1" and ev.not_before is not None
    with pytest.raises(BadAnswer):
        MaintenanceEvent.parse_list('[{"Code": 1}]')


def _ca(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(7)
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


@pytest.mark.parametrize("detached", [False, True])
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_pkcs7_verification(detached: bool, kind: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa" \
        else ec.generate_private_key(ec.SECP256R1())
    cert = _ca(key)
    doc = json.dumps({"instance-id": "i-abc", "region-id": "cn-hangzhou"})
    opts = [pkcs7.PKCS7Options.DetachedSignature] if detached else []
    content = signed_content(doc, "sts.example")
    sig = pkcs7.PKCS7SignatureBuilder().set_data(content).add_signer(
        cert, key, hashes.SHA256()).sign(serialization.Encoding.DER, opts)
    text = base64.b64encode(sig).decode()
    pem = cert.public_bytes(serialization.Encoding.PEM)
    verify_identity_signature(doc, text, pem, "sts.example")
    with pytest.raises(BadAnswer):
        verify_identity_signature(doc.replace("abc", "xyz"), text, pem, "sts.example")
    other = _ca(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(BadAnswer, match="does not verify"):
        verify_identity_signature(doc, text, other.public_bytes(serialization.Encoding.PEM),
                                  "sts.example")


@pytest.mark.parametrize("garbage", ["!!!", base64.b64encode(b"\x30\x03\x02\x01").decode(), ""])
def test_pkcs7_garbage_is_a_clear_error(garbage: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = _ca(key).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(BadAnswer, match="pkcs7"):
        verify_identity_signature("{}", garbage, pem)


def _signed(content: bytes, detached: bool) -> tuple[str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _ca(key)
    opts = [pkcs7.PKCS7Options.DetachedSignature] if detached else []
    sig = pkcs7.PKCS7SignatureBuilder().set_data(content).add_signer(
        cert, key, hashes.SHA256()).sign(serialization.Encoding.DER, opts)
    return base64.b64encode(sig).decode(), cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("detached", [False, True])
def test_pkcs7_without_audience_fails_a_check_that_asks_for_one(detached: bool) -> None:
    doc = json.dumps({"instance-id": "i-abc", "region-id": "cn-hangzhou"})
    text, pem = _signed(signed_content(doc, None), detached)
    verify_identity_signature(doc, text, pem)  # fine when no audience is asked for
    # Embedded content names the cause; a detached one only fails its digest.
    with pytest.raises(BadAnswer, match="pkcs7: the document" if detached else "audience"):
        verify_identity_signature(doc, text, pem, "sts.example")


@pytest.mark.parametrize("detached", [False, True])
def test_pkcs7_for_another_audience_is_refused(detached: bool) -> None:
    doc = json.dumps({"instance-id": "i-abc", "region-id": "cn-hangzhou"})
    text, pem = _signed(signed_content(doc, "other.example"), detached)
    verify_identity_signature(doc, text, pem, "other.example")
    for asked in ("sts.example", None):
        with pytest.raises(BadAnswer, match="pkcs7"):
            verify_identity_signature(doc, text, pem, asked)


@pytest.mark.parametrize("body", [
    '{"Code": "Success"}', "role-a\nrole b", "a" * 65, "../etc", "role\x00x", "<html>",
])
def test_role_listing_must_be_role_names(body: str) -> None:
    from guestagent.metadata.models import parse_role_listing

    with pytest.raises(BadAnswer, match="not a RAM role listing") as info:
        parse_role_listing(body, "ram/security-credentials/")
    assert body not in str(info.value)  # the shape, never the content
    assert parse_role_listing("EcsRamRoleDemo\n", "x") == ["EcsRamRoleDemo"]
    assert parse_role_listing("", "x") == []
