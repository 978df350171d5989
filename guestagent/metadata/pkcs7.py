"""Verify the identity document's PKCS#7 (CMS SignedData) signature with ``cryptography``.

``cryptography`` can build PKCS#7 signatures but has no verifier, so this module reads the
few DER structures involved itself (RFC 5652 §5) and checks, with cryptography's primitives:
the signer certificate is the CA or directly issued by it and valid now; the signed content
(embedded, or the document itself when the signature is detached) matches the document;
the ``messageDigest`` attribute matches; the signature over the attributes verifies.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from guestagent.metadata.errors import BadAnswer

OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "1.3.14.3.2.26": hashes.SHA1,
    "2.16.840.1.101.3.4.2.1": hashes.SHA256,
    "2.16.840.1.101.3.4.2.2": hashes.SHA384,
    "2.16.840.1.101.3.4.2.3": hashes.SHA512,
}


class _Der:
    """One DER element: tag, the bytes of its value, and its full encoding."""

    __slots__ = ("encoded", "tag", "value")

    def __init__(self, tag: int, value: bytes, encoded: bytes) -> None:
        self.tag, self.value, self.encoded = tag, value, encoded

    def children(self) -> list[_Der]:
        out, pos = [], 0
        while pos < len(self.value):
            item, pos = _read(self.value, pos)
            out.append(item)
        return out


def _read(data: bytes, pos: int) -> tuple[_Der, int]:
    try:
        start, tag = pos, data[pos]
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4:
                raise BadAnswer("pkcs7: unsupported DER length")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        end = pos + length
        if end > len(data):
            raise BadAnswer("pkcs7: truncated DER")
        return _Der(tag, data[pos:end], data[start:end]), end
    except IndexError:
        raise BadAnswer("pkcs7: truncated DER") from None


def _oid(el: _Der) -> str:
    if el.tag != 0x06 or not el.value:
        raise BadAnswer("pkcs7: expected an object identifier")
    first, parts, acc = el.value[0], [], 0
    parts = [str(first // 40), str(first % 40)]
    for byte in el.value[1:]:
        acc = (acc << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(str(acc))
            acc = 0
    return ".".join(parts)


def _decode_signature(text: str) -> bytes:
    body = "".join(ln for ln in text.strip().splitlines() if not ln.startswith("-----"))
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise BadAnswer("pkcs7: not valid base64") from None


def signed_content(document: str, audience: str | None) -> bytes:
    """What the service signs: the document, with the audience added when one was asked."""
    if audience is None:
        return document.encode()
    doc = json.loads(document)
    doc["audience"] = audience
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def verify_identity_signature(
    document: str, signature: str, ca_pem: bytes, audience: str | None = None
) -> None:
    """Raise :class:`BadAnswer` unless ``signature`` signs ``document`` under ``ca_pem``."""
    try:
        _verify(document, signature, ca_pem, audience)
    except (IndexError, StopIteration, ValueError) as exc:
        raise BadAnswer(f"pkcs7: malformed signature structure ({type(exc).__name__})") from None


def _verify(document: str, signature: str, ca_pem: bytes, audience: str | None) -> None:
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise BadAnswer("pkcs7: the configured CA certificate is not a PEM certificate") from None
    info, _ = _read(_decode_signature(signature), 0)
    parts = info.children()
    if len(parts) < 2 or _oid(parts[0]) != OID_SIGNED_DATA:
        raise BadAnswer("pkcs7: not a SignedData structure")
    signed = parts[1].children()[0].children()
    encap = signed[2].children()
    content = encap[1].children()[0].value if len(encap) > 1 else None
    expected = signed_content(document, audience)
    # Exactly the content asked for: a signature made without the audience (or for another
    # one) must not pass a check that names an audience, or it could be replayed elsewhere.
    if content is not None and content != expected:
        raise BadAnswer(_content_mismatch(content, document, audience))
    if content is None:
        content = expected
    certs = [
        x509.load_der_x509_certificate(c.encoded) for el in signed[3:] if el.tag == 0xA0
        for c in el.children()
    ]
    signer_infos = [el for el in signed[3:] if el.tag == 0x31]
    if not signer_infos or not signer_infos[0].children():
        raise BadAnswer("pkcs7: no signer")
    _verify_signer(signer_infos[0].children()[0], content, certs or [ca], ca)


def _content_mismatch(content: bytes, document: str, audience: str | None) -> str:
    if audience is not None and content == document.encode():
        return (f"pkcs7: signed without an audience, but audience {audience!r} was asked for "
                "(the signature could have been made for anyone)")
    if audience is not None:
        return (f"pkcs7: the signed content is not this identity document for audience "
                f"{audience!r} (wrong audience or another document)")
    return "pkcs7: the signed content is not this identity document"


def _verify_signer(
    si: _Der, content: bytes, certs: list[x509.Certificate], ca: x509.Certificate
) -> None:
    fields = si.children()
    digest_cls = DIGESTS.get(_oid(fields[2].children()[0]))
    if digest_cls is None:
        raise BadAnswer("pkcs7: unsupported digest algorithm")
    rest = fields[3:]
    attrs = rest[0] if rest and rest[0].tag == 0xA0 else None
    signature = next(el.value for el in rest if el.tag == 0x04)
    h = hashes.Hash(digest_cls())
    h.update(content)
    signed_bytes = _signed_bytes(attrs, content, h.finalize())
    now = datetime.now(UTC)
    for cert in certs:
        valid_now = cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
        if valid_now and _issued_by(cert, ca) and _verifies(cert, signature, signed_bytes,
                                                            digest_cls()):
            return
    raise BadAnswer("pkcs7: signature does not verify against the configured CA")


def _signed_bytes(attrs: _Der | None, content: bytes, digest: bytes) -> bytes:
    """What the signature covers: the content itself, or (with signed attributes) the
    attributes, whose message digest must be the content's."""
    if attrs is None:
        return content
    found = None
    for attr in attrs.children():
        a = attr.children()
        if _oid(a[0]) == OID_MESSAGE_DIGEST:
            found = a[1].children()[0].value
    if found != digest:
        raise BadAnswer("pkcs7: the document does not match the signed digest")
    return b"\x31" + attrs.encoded[1:]  # [0] IMPLICIT → SET OF for verification


def _verifies(cert: x509.Certificate, signature: bytes, signed: bytes,
              algorithm: hashes.HashAlgorithm) -> bool:
    key = cert.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, signed, ec.ECDSA(algorithm))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert == ca:
        return True
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
