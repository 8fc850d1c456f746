"""The MTRK= certifier of RFC 3885 §3.1: parsing, formatting and the originator's secret."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets

from mtrkmta.envelope import Mtrk

CERTIFIER_LENGTHS = frozenset({16, 20})  # doc/conformance.rst 3885-P1: 128-bit or SHA-1 (160-bit)
MAX_TIMEOUT = 999_999_999  # 1*9DIGIT
MIN_SECRET_BYTES = 16  # 128 bits, RFC 3885 §3.1
MAX_SECRET_BYTES = 128  # 1024 bits
MAX_ENVID = 100  # RFC 3885 §3.2 / RFC 3461 §4.4, decoded characters
MAX_LOCAL_ENVID_HASHED = 72  # local-envid limit when fqhn is replaced by its hash

_BASE64 = re.compile(r"([A-Za-z0-9+/]+)(={0,2})")
_TIMEOUT = re.compile(r"[0-9]{1,9}")


class MtrkError(ValueError):
    """A malformed MTRK value (RFC 3885 §3.1; doc/conformance.rst 3885-P3)."""


def parse_mtrk(value: str) -> Mtrk:
    """Parse what follows ``MTRK=``: base64 certifier, optionally ``:`` and 1-9 digits.

    Accepts padded and unpadded base64; the decoded certifier must be 16 or 20
    octets (RFC 3885 §3.1, doc/conformance.rst 3885-P1). Raises :class:`MtrkError` otherwise
    (doc/conformance.rst 3885-P3).
    """
    certifier_text, colon, timeout_text = value.partition(":")
    timeout: int | None = None
    if colon:
        if _TIMEOUT.fullmatch(timeout_text) is None:
            raise MtrkError("MTRK timeout must be 1 to 9 digits")
        timeout = int(timeout_text)
    return Mtrk(certifier=_decode_certifier(certifier_text), timeout=timeout)


def _decode_certifier(text: str) -> bytes:
    match = _BASE64.fullmatch(text)
    if match is None:
        raise MtrkError("MTRK certifier is not base64")
    body, padding = match.group(1), match.group(2)
    needed = -len(body) % 4
    if needed == 3 or (padding and len(padding) != needed):
        raise MtrkError("MTRK certifier has bad base64 padding")
    try:
        certifier = base64.b64decode(body + "=" * needed, validate=True)
    except binascii.Error as exc:
        raise MtrkError("MTRK certifier is not base64") from exc
    if len(certifier) not in CERTIFIER_LENGTHS:
        raise MtrkError(f"MTRK certifier decodes to {len(certifier)} octets, not 16 or 20")
    return certifier


def format_mtrk(certifier: bytes, timeout: int | None) -> str:
    """The value to send after ``MTRK=``: unpadded base64, plus ``:timeout`` when given.

    No ``=`` padding: 27 characters for 20 octets, 22 for 16. RFC 3885 §1 defines
    the base64 characters as ``+``, ``/``, digits and letters, and an esmtp-value
    cannot hold ``=`` (RFC 5321 §4.1.2, RFC 3461 §4), so a server such as go-smtp refuses a
    padded certifier with 501. :func:`parse_mtrk` still accepts both forms.
    """
    if len(certifier) not in CERTIFIER_LENGTHS:
        raise ValueError(f"certifier must be 16 or 20 octets, not {len(certifier)}")
    text = base64.b64encode(certifier).decode("ascii").rstrip("=")
    if timeout is None:
        return text
    if isinstance(timeout, bool) or not 0 <= timeout <= MAX_TIMEOUT:
        raise ValueError(f"MTRK timeout out of range: {timeout!r}")
    return f"{text}:{timeout}"


def certifier_from_secret(secret: bytes) -> bytes:
    """B = SHA1(A): the certifier for secret A, as raw octets (RFC 3885 §3.1)."""
    return hashlib.sha1(secret).digest()


def new_secret(nbytes: int = 20) -> bytes:
    """A fresh random secret A of ``nbytes`` octets, 16..128 (RFC 3885 §3.1, §4.2)."""
    if not MIN_SECRET_BYTES <= nbytes <= MAX_SECRET_BYTES:
        raise ValueError(f"secret must be 16..128 octets, not {nbytes}")
    return secrets.token_bytes(nbytes)


def unique_envid(local_envid: str, fqhn: str) -> str:
    """Build a decoded unique-envid ``local@fqhn`` of at most 100 characters.

    When ``local@fqhn`` would exceed 100 characters the host name is replaced by
    unpadded base64(SHA1(fqhn)) and ``local_envid`` may have at most 72 characters
    (RFC 3885 §3.2). The result still needs xtext encoding.
    """
    if not local_envid or not fqhn:
        raise ValueError("local-envid and fqhn must both be non-empty")
    envid = f"{local_envid}@{fqhn}"
    if len(envid) <= MAX_ENVID:
        return envid
    if len(local_envid) > MAX_LOCAL_ENVID_HASHED:
        raise ValueError(f"local-envid longer than {MAX_LOCAL_ENVID_HASHED} characters")
    digest = hashlib.sha1(fqhn.encode("utf-8")).digest()
    return f"{local_envid}@{base64.b64encode(digest).decode('ascii').rstrip('=')}"
