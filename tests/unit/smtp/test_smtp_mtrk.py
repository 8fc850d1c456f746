"""Tests for mtrkmta.smtp.mtrk: the MTRK certifier (RFC 3885 §3.1, §3.2, §4.2)."""

from __future__ import annotations

import base64
import hashlib

import pytest

from mtrkmta.envelope import Mtrk
from mtrkmta.smtp.mtrk import (
    MtrkError,
    certifier_from_secret,
    format_mtrk,
    new_secret,
    parse_mtrk,
    unique_envid,
)

VECTOR_SECRET = bytes(range(16))
VECTOR_CERTIFIER_HEX = "56178b86a57fac22899a9964185c2cc96e7da589"
VECTOR_CERTIFIER = "VheLhqV/rCKJmplkGFwsyW59pYk="
VECTOR_UNPADDED = VECTOR_CERTIFIER.rstrip("=")  # 27 characters, what goes on the wire
B16 = bytes(range(100, 116))
B16_PADDED = base64.b64encode(B16).decode()  # 24 chars, "=="


class TestVector:
    def test_certifier_of_a_known_secret(self):
        # RFC 3885 §3.1 (our own vector): certifier = base64(SHA1(A))
        assert base64.b64encode(VECTOR_SECRET).decode() == "AAECAwQFBgcICQoLDA0ODw=="
        certifier = certifier_from_secret(VECTOR_SECRET)
        assert certifier.hex() == VECTOR_CERTIFIER_HEX
        assert format_mtrk(certifier, None) == VECTOR_UNPADDED

    def test_vector_parses_back(self):
        # RFC 3885 §3.1 (our own vector)
        assert parse_mtrk(VECTOR_CERTIFIER) == Mtrk(bytes.fromhex(VECTOR_CERTIFIER_HEX), None)

    def test_hashes_the_decoded_secret_not_its_base64(self):
        # RFC 3885 §3.1: hash the decoded secret, not its base64 text
        assert (
            certifier_from_secret(VECTOR_SECRET)
            != hashlib.sha1(base64.b64encode(VECTOR_SECRET)).digest()
        )


class TestParse:
    def test_padded_28(self):
        # doc/conformance.rst 3885-P1
        assert len(parse_mtrk(VECTOR_CERTIFIER).certifier) == 20

    def test_unpadded_27(self):
        # doc/conformance.rst 3885-P1
        assert parse_mtrk(VECTOR_CERTIFIER.rstrip("=")) == parse_mtrk(VECTOR_CERTIFIER)

    def test_16_octets_padded_and_unpadded(self):
        # doc/conformance.rst 3885-P1: a 128-bit certifier is accepted too
        assert parse_mtrk(B16_PADDED).certifier == B16
        assert parse_mtrk(B16_PADDED.rstrip("=")).certifier == B16

    @pytest.mark.parametrize("timeout", ["0", "1", "3600", "999999999", "000000001"])
    def test_timeout(self, timeout):
        # RFC 3885 §3.1: 1-9 digits, kept as seconds from receipt here
        assert parse_mtrk(f"{VECTOR_CERTIFIER}:{timeout}").timeout == int(timeout)

    def test_no_timeout(self):
        assert parse_mtrk(VECTOR_CERTIFIER).timeout is None

    @pytest.mark.parametrize(
        "value",
        [
            "",
            ":3600",
            f"{VECTOR_CERTIFIER}:",  # empty timeout
            f"{VECTOR_CERTIFIER}:1234567890",  # 10 digits
            f"{VECTOR_CERTIFIER}:+5",
            f"{VECTOR_CERTIFIER}:-5",
            f"{VECTOR_CERTIFIER}:12a",
            f"{VECTOR_CERTIFIER}:\u0661\u0662",  # non-ASCII digits
            f"{VECTOR_CERTIFIER}:1:2",
            "VheLhqV/rCKJmplkGFwsyW59pYk==",  # too much padding
            "VheLhqV/rCKJmplkGFwsyW59pY=",  # one pad where two are needed
            B16_PADDED.rstrip("=") + "=",  # 16 octets with one pad only
            "VheLhqV/rCKJmplkGFwsyW59p=Yk",  # "=" in the middle
            "VheLhqV-rCKJmplkGFwsyW59pYk=",  # base64url alphabet
            "VheLhqV/rCKJmplkGFwsyW59pYk\u00e9",
            "Vhe LhqV/rCKJmplkGFwsyW59pYk",
            base64.b64encode(bytes(24)).decode(),  # decodes to 24 octets
            base64.b64encode(bytes(15)).decode(),  # 15 octets
            "A",  # ABNF-literal single character
            "AAAAA",  # length % 4 == 1
        ],
    )
    def test_rejects(self, value):
        # RFC 3885 §3.1, doc/conformance.rst 3885-P3 and 3885-P1 (decoded length 16 or 20)
        with pytest.raises(MtrkError):
            parse_mtrk(value)

    def test_error_is_value_error(self):
        assert issubclass(MtrkError, ValueError)


class TestFormat:
    def test_with_timeout(self):
        assert format_mtrk(bytes.fromhex(VECTOR_CERTIFIER_HEX), 3600) == f"{VECTOR_UNPADDED}:3600"

    def test_emits_unpadded(self):
        # RFC 3885 §1: base64 here is + / digits letters, no "="; RFC 5321 §4.1.2 and
        # RFC 3461 §4: an esmtp-value excludes "=" (go-smtp answers a padded one 501).
        assert format_mtrk(B16, None) == B16_PADDED.rstrip("=")
        assert len(format_mtrk(B16, None)) == 22
        assert len(format_mtrk(bytes(20), None)) == 27
        assert len(format_mtrk(bytes(20), 999999999)) == 37
        for certifier in (B16, bytes.fromhex(VECTOR_CERTIFIER_HEX)):
            assert "=" not in format_mtrk(certifier, 5)
            assert parse_mtrk(format_mtrk(certifier, 60)) == Mtrk(certifier, 60)

    @pytest.mark.parametrize("length", [0, 15, 19, 21, 32])
    def test_bad_certifier_length(self, length):
        with pytest.raises(ValueError):
            format_mtrk(bytes(length), None)

    @pytest.mark.parametrize("timeout", [-1, 1_000_000_000, True])
    def test_bad_timeout(self, timeout):
        with pytest.raises(ValueError):
            format_mtrk(bytes(20), timeout)


class TestSecret:
    def test_default_secret_is_160_bits_and_fresh(self):
        # RFC 3885 §3.1, §4.2
        first, second = new_secret(), new_secret()
        assert len(first) == 20 and first != second

    @pytest.mark.parametrize("nbytes", [16, 128])
    def test_bounds_accepted(self, nbytes):
        assert len(new_secret(nbytes)) == nbytes

    @pytest.mark.parametrize("nbytes", [15, 129])
    def test_bounds_rejected(self, nbytes):
        with pytest.raises(ValueError):
            new_secret(nbytes)


class TestUniqueEnvid:
    def test_short_kept(self):
        # RFC 3885 §3.2
        assert unique_envid("abc123", "mail.example.com") == "abc123@mail.example.com"

    def test_long_fqhn_replaced_by_hash(self):
        # RFC 3885 §3.2: base64(SHA1(fqhn)), 27 chars, unpadded
        fqhn = "h" * 90 + ".example"
        envid = unique_envid("x" * 72, fqhn)
        local, _, host = envid.rpartition("@")
        assert local == "x" * 72
        assert host == base64.b64encode(hashlib.sha1(fqhn.encode()).digest()).decode()[:27]
        assert len(envid) == 100

    def test_long_local_rejected_when_hashing(self):
        with pytest.raises(ValueError):
            unique_envid("x" * 73, "h" * 40)

    @pytest.mark.parametrize(("local", "fqhn"), [("", "h"), ("l", "")])
    def test_empty_parts_rejected(self, local, fqhn):
        with pytest.raises(ValueError):
            unique_envid(local, fqhn)
