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


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestCA:
    """A throwaway certificate authority that issues server certificates (valid, expired,
    for any name); ``pem`` is its own certificate, for a ``ca_file``."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "mtrkmta test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
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
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        """Write the CA certificate (PEM) to ``path``; the path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.pem)
        return path

    def issue(self, hostname: str, *, expired: bool = False) -> tuple[bytes, bytes]:
        """A server certificate for ``hostname`` signed by this CA, and its key, PEM.

        ``expired``: valid for a day that ended a day ago.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)
        if expired:
            start, end = now - datetime.timedelta(days=2), now - datetime.timedelta(days=1)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def write_issued(
        self, directory: Path, hostname: str, *, expired: bool = False
    ) -> tuple[Path, Path]:
        """Write a certificate issued for ``hostname`` (see :meth:`issue`) and its key."""
        cert_pem, key_pem = self.issue(hostname, expired=expired)
        directory.mkdir(parents=True, exist_ok=True)
        certificate, private_key = directory / "cert.pem", directory / "key.pem"
        certificate.write_bytes(cert_pem)
        private_key.write_bytes(key_pem)
        private_key.chmod(0o600)
        return certificate, private_key
