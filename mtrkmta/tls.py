"""TLS contexts: the listeners' and the verifying client's (``tls = verify``); TLS >= 1.2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) a verification most often fails with.
_VERIFY_ERRORS = {
    2: "the issuer certificate is unknown",
    7: "the certificate signature is wrong",
    9: "the certificate is not yet valid",
    10: "the certificate has expired",
    18: "the certificate is self-signed and not trusted",
    19: "a self-signed certificate in the chain is not trusted",
    20: "the certificate is issued by an unknown CA",
    21: "the certificate signature cannot be checked (unknown CA)",
    23: "the certificate is revoked",
    24: "a CA certificate in the chain is not a CA",
    26: "the certificate is not for a TLS server",
}


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


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingClientTLS:
    """A client TLS context that verifies the server (one per connection): the chain against
    ``ca_pem`` (PEM CA certificates; None: the system's CAs) and the name ``hostname`` by
    RFC 6125 (service_identity, as Twisted's optionsForClientTLS does). ``problem`` says,
    in a few words, why a verification failed (None while nothing failed).
    """

    def __init__(self, hostname: str, ca_pem: bytes | None = None) -> None:
        self.hostname = hostname
        self.problem: str | None = None
        self._is_ip = isIPAddress(hostname) or isIPv6Address(hostname)
        trust: Any = ssl.platformTrust()
        if ca_pem is not None:
            trust = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(block) for block in _pem_blocks(ca_pem)]
            )
        self._options = ssl.CertificateOptions(
            trustRoot=trust, raiseMinimumTo=ssl.TLSVersion.TLSv1_2
        )

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        if not self._is_ip:
            try:
                connection.set_tlsext_host_name(self.hostname.encode("idna"))
            except UnicodeError:
                pass  # no SNI for a name IDNA cannot encode; the name is still checked
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        return connection

    def _verify(
        self, connection: SSL.Connection, cert: Any, error: int, depth: int, ok: int
    ) -> bool:
        if not ok:
            if self.problem is None:
                self.problem = _VERIFY_ERRORS.get(error, f"certificate error {error}")
            return False
        if depth != 0:
            return True
        leaf = cert.to_cryptography()
        try:
            if self._is_ip:
                verify_certificate_ip_address(leaf, self.hostname)
            else:
                verify_certificate_hostname(leaf, self.hostname)
        except VerificationError:
            self.problem = f"the certificate is not for {self.hostname} ({_names(leaf)})"
            return False
        except Exception:  # a certificate service_identity cannot read: not verified
            self.problem = f"the certificate names cannot be read for {self.hostname}"
            return False
        return True


def _names(certificate: x509.Certificate) -> str:
    """The DNS names (or else the common name) a certificate is for, as a short text."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [str(name) for name in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [
            str(attribute.value)
            for attribute in certificate.subject.get_attributes_for_oid(
                x509.oid.NameOID.COMMON_NAME
            )
        ]
    return "it names " + ", ".join(names[:5]) if names else "it names no host"
