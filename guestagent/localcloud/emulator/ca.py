"""The emulator's CA: signs the identity document into PKCS#7 as the real service does.

The output is base64 DER without PEM armour lines, content attached, signer certificate
included; clients verify it against :attr:`Authority.cert_pem`
(``openssl smime -verify -inform DER -CAfile ca.pem``).
"""

from __future__ import annotations

import base64
import datetime
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

_generated: tuple[rsa.RSAPrivateKey, x509.Certificate] | None = None
_generated_lock = threading.Lock()


class CAError(ValueError):
    """The CA files of a scenario are unreadable or do not match."""


def _generate() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    # One key per process: RSA generation costs tens of ms and tests start many emulators.
    global _generated  # noqa: PLW0603
    with _generated_lock:
        if _generated is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            name = x509.Name(
                [
                    x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "guestagent local cloud"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "guestagent metadata emulator CA"),
                ]
            )
            now = datetime.datetime.now(datetime.UTC)
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .sign(key, hashes.SHA256())
            )
            _generated = (key, cert)
        return _generated


def _load(cert_file: Path, key_file: Path) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CAError(f"ca: cannot load {cert_file} / {key_file}: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CAError(f"ca.key_file: {key_file} must hold an RSA private key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise CAError(f"ca: {key_file} does not match the certificate {cert_file}")
    return key, cert


class Authority:
    def __init__(self, cert_file: Path | None = None, key_file: Path | None = None) -> None:
        if cert_file is not None and key_file is not None:
            self._key, self._cert = _load(cert_file, key_file)
        else:
            self._key, self._cert = _generate()
        self.cert_pem = self._cert.public_bytes(serialization.Encoding.PEM)

    def sign(self, content: bytes) -> str:
        der = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(content)
            .add_signer(self._cert, self._key, hashes.SHA256())
            .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
        )
        return base64.b64encode(der).decode("ascii")
