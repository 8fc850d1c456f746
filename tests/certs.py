"""Throwaway self-signed TLS certificates for the STARTTLS tests."""

from __future__ import annotations

import datetime
import functools
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@functools.lru_cache(maxsize=4)
def pem_pair(hostname: str) -> tuple[bytes, bytes]:
    """A self-signed EC P-256 certificate for ``hostname`` and its key, PEM (cached)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def write_certificate(directory: Path, hostname: str = "mx.example.test") -> tuple[Path, Path]:
    """Write a self-signed EC P-256 certificate for ``hostname`` and its key; their paths."""
    cert_pem, key_pem = pem_pair(hostname)
    directory.mkdir(parents=True, exist_ok=True)
    certificate = directory / "cert.pem"
    private_key = directory / "key.pem"
    certificate.write_bytes(cert_pem)
    private_key.write_bytes(key_pem)
    private_key.chmod(0o600)
    return certificate, private_key


def tls_options(directory: Path, hostname: str = "mx.example.test") -> tuple[tuple[str, str], ...]:
    """``node_config`` options that enable STARTTLS with a fresh certificate."""
    certificate, private_key = write_certificate(directory, hostname)
    return (("tls.certificate", str(certificate)), ("tls.private_key", str(private_key)))
