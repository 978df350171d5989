"""Our pkcs7 verifier agrees with OpenSSL's CMS code (``openssl cms -verify``) on every
case that matters: right or wrong audience, none, a tampered document, another CA."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from guestagent import process
from guestagent.localcloud.emulator.ca import Authority
from guestagent.metadata.errors import BadAnswer
from guestagent.metadata.pkcs7 import signed_content, verify_identity_signature

CA_DIR = Path(__file__).resolve().parents[1] / "data" / "scenarios" / "ca"
DOC = json.dumps({"instance-id": "i-cross0001", "region-id": "cn-hangzhou"},
                 separators=(",", ":"))
AUD = "sts.aliyuncs.com"


def _ours(doc: str, sig: str, ca: bytes, audience: str | None) -> bool:
    try:
        verify_identity_signature(doc, sig, ca, audience)
    except BadAnswer:
        return False
    return True


def _openssl(doc: str, sig: str, ca: bytes, audience: str | None, tmp: Path) -> bool:
    (tmp / "ca.pem").write_bytes(ca)
    res = process.run(["openssl", "cms", "-verify", "-inform", "DER", "-binary", "-purpose",
                       "any", "-CAfile", str(tmp / "ca.pem")], input=base64.b64decode(sig),
                      timeout=60)
    return res.ok and res.stdout == signed_content(doc, audience)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@pytest.mark.parametrize("case", ["right audience", "none asked", "no audience, one asked",
                                  "wrong audience", "tampered", "another CA"])
def test_verdict_matches_openssl_cms(case: str, tmp_path: Path) -> None:
    ours = Authority()
    other = Authority(CA_DIR / "other-ca.pem", CA_DIR / "other-ca.key")
    doc, ca, asked = DOC, ours.cert_pem, AUD
    sig = ours.sign(signed_content(DOC, AUD))
    if case == "none asked":
        sig, asked = ours.sign(DOC.encode()), None
    elif case == "no audience, one asked":
        sig = ours.sign(DOC.encode())
    elif case == "wrong audience":
        sig = ours.sign(signed_content(DOC, "other.example"))
    elif case == "tampered":
        doc = DOC.replace("i-cross", "i-other")
    elif case == "another CA":
        ca = other.cert_pem
    expected = case in ("right audience", "none asked")
    assert _openssl(doc, sig, ca, asked, tmp_path) is expected  # the reference
    assert _ours(doc, sig, ca, asked) is expected
