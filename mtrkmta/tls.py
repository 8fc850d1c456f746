"""TLS contexts for the listeners: TLS 1.2 at least (RFC 8996)."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import ssl


def server_context(certificate: Path, private_key: Path) -> ssl.CertificateOptions:
    """A server context from PEM files; the certificate file may carry the chain after it."""
    cert_pem = certificate.read_bytes()
    key_pem = private_key.read_bytes()
    leaf = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
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
