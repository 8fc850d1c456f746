"""TLS contexts for the listeners: TLS 1.2 at least (RFC 8996)."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import ssl


class TLSFileError(ValueError):
    """The certificate or key cannot be used; ``str()`` names both files."""


def load_pair(certificate: Path, private_key: Path) -> ssl.PrivateCertificate:
    """The certificate with its key, checked to match; raises TLSFileError. Blocking."""
    where = f"tls.certificate {certificate} and tls.private_key {private_key}"
    try:
        cert_pem = certificate.read_bytes()
        key_pem = private_key.read_bytes()
        public = x509.load_pem_x509_certificate(cert_pem).public_key()
        key = serialization.load_pem_private_key(key_pem, password=None)
    except OSError as error:
        raise TLSFileError(f"{where}: {error.filename}: {error.strerror}") from None
    except Exception as error:  # OpenSSL and cryptography raise their own types for bad PEM
        raise TLSFileError(f"{where}: not a PEM certificate and key ({error})") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != public.public_bytes(*spki):
        raise TLSFileError(
            f"{where}: the key does not belong to the certificate; give the certificate's own key"
        )
    return ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)


def server_context(certificate: Path, private_key: Path) -> ssl.CertificateOptions:
    """A server context from PEM files; the certificate file may carry the chain after it."""
    leaf = load_pair(certificate, private_key)
    cert_pem = certificate.read_bytes()
    chain = [ssl.Certificate.loadPEM(block) for block in _pem_blocks(cert_pem)[1:]]
    return ssl.CertificateOptions(
        privateKey=leaf.privateKey.original.to_cryptography_key(),
        certificate=leaf.original.to_cryptography(),
        extraCertChain=[c.original.to_cryptography() for c in chain],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def _pem_blocks(pem: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    blocks = []
    for part in pem.split(end)[:-1]:
        start = part.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            blocks.append(part[start:] + end + b"\n")
    return blocks
