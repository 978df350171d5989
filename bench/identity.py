"""Identity pkcs7 verification: the hand-written DER reader (guestagent/metadata/pkcs7.py)
beside two well-kept CMS implementations, on the same signatures from the emulator's CA.

    python bench/identity.py [--n 300]

- ``builtin``: our reader + cryptography's primitives (what the agent uses);
- ``asn1crypto``: asn1crypto's CMS parser + the same cryptography checks;
- ``openssl cms -verify``: OpenSSL's CMS code through guestagent.process.run (one process
  per check).

Each one first goes through the correctness cases (valid; no audience when one is asked
for; wrong audience; tampered document; another CA): a candidate that accepts a bad case
is disqualified whatever its speed. Then the time per verification.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from guestagent import process
from guestagent.localcloud.emulator.ca import Authority
from guestagent.metadata.errors import BadAnswer
from guestagent.metadata.pkcs7 import signed_content, verify_identity_signature

Verify = Callable[[str, str, bytes, "str | None"], None]


def asn1crypto_verify(document: str, signature: str, ca_pem: bytes, audience: str | None) -> None:
    from asn1crypto import cms

    info = cms.ContentInfo.load(base64.b64decode(signature))
    signed = info["content"]
    expected = signed_content(document, audience)
    content = signed["encap_content_info"]["content"].native
    if content is not None and content != expected:
        raise BadAnswer("pkcs7: signed content is not this document")
    content = content if content is not None else expected
    ca = x509.load_pem_x509_certificate(ca_pem)
    si = signed["signer_infos"][0]
    algo = si["digest_algorithm"]["algorithm"].native
    digest_cls = {"sha256": hashes.SHA256, "sha384": hashes.SHA384,
                  "sha512": hashes.SHA512}[algo]
    attrs = si["signed_attrs"]
    found = next(a["values"][0].native for a in attrs if a["type"].native == "message_digest")
    if found != hashlib.new(algo, content).digest():
        raise BadAnswer("pkcs7: digest mismatch")
    data = attrs.untag().dump()
    sig = si["signature"].native
    for c in signed["certificates"]:
        cert = x509.load_der_x509_certificate(c.chosen.dump())
        if cert != ca:
            try:
                cert.verify_directly_issued_by(ca)
            except Exception:
                continue
        key = cert.public_key()
        try:
            if isinstance(key, rsa.RSAPublicKey):
                key.verify(sig, data, padding.PKCS1v15(), digest_cls())
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(sig, data, ec.ECDSA(digest_cls()))
            return
        except Exception:
            continue
    raise BadAnswer("pkcs7: does not verify")


def openssl_verify(document: str, signature: str, ca_pem: bytes, audience: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="ga-bench-cms-") as tmp:
        ca = Path(tmp, "ca.pem")
        ca.write_bytes(ca_pem)
        res = process.run(["openssl", "cms", "-verify", "-inform", "DER", "-binary",
                           "-purpose", "any", "-CAfile", str(ca)],
                          input=base64.b64decode(signature), timeout=30)
    if not res.ok or res.stdout != signed_content(document, audience):
        raise BadAnswer("pkcs7: openssl cms -verify refused it")


def cases(auth: Authority, other: Authority, document: str) -> list[tuple[str, str, bytes,
                                                                             str | None, bool]]:
    ca, other_ca = auth.cert_pem, other.cert_pem
    aud = "sts.aliyuncs.com"
    with_aud = auth.sign(signed_content(document, aud))
    without = auth.sign(document.encode())
    wrong = auth.sign(signed_content(document, "other.example"))

    return [
        ("valid, audience", with_aud, ca, aud, True),
        ("valid, none asked", without, ca, None, True),
        ("no audience, one asked", without, ca, aud, False),
        ("wrong audience", wrong, ca, aud, False),
        ("tampered document", with_aud, ca, aud, False),
        ("another CA", with_aud, other_ca, aud, False),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    auth = Authority()
    ca_dir = Path(__file__).resolve().parent.parent / "tests/data/scenarios/ca"
    other = Authority(ca_dir / "other-ca.pem", ca_dir / "other-ca.key")
    document = json.dumps({"instance-id": "i-bench0001", "region-id": "cn-hangzhou",
                           "zone-id": "cn-hangzhou-h"}, separators=(",", ":"))
    candidates: dict[str, Verify] = {"builtin": verify_identity_signature,
                                     "asn1crypto": asn1crypto_verify,
                                     "openssl cms -verify": openssl_verify}
    print(f"pkcs7 verification, {args.n} runs each (openssl: n/10)")
    print(f"{'implementation':<22} {'cases ok':>9} {'per verify':>12}")
    for name, fn in candidates.items():
        ok = 0
        all_cases = cases(auth, other, document)
        for _label, sig, ca, aud, good in all_cases:
            doc = document.replace('"i-', '"i-x') if _label == "tampered document" else document
            try:
                fn(doc, sig, ca, aud)
                accepted = True
            except (BadAnswer, ImportError):
                accepted = False
            ok += accepted == good
            if accepted != good:
                print(f"  {name}: {_label}: {'accepted' if accepted else 'refused'} (wrong)")
        sig, ca, aud = all_cases[0][1], all_cases[0][2], all_cases[0][3]
        n = max(1, args.n // 10) if name.startswith("openssl") else args.n
        try:
            start = time.perf_counter()
            for _ in range(n):
                fn(document, sig, ca, aud)
            per = (time.perf_counter() - start) / n
            timing = f"{per * 1e3:.3f} ms"
        except (BadAnswer, ImportError) as exc:
            timing = f"failed: {exc}"
        print(f"{name:<22} {ok:>5}/{len(all_cases):<3} {timing:>12}")


if __name__ == "__main__":
    main()
