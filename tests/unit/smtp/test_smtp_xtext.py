"""Tests for mtrkmta.smtp.xtext (RFC 3461 §4)."""

from __future__ import annotations

import pytest

from mtrkmta.smtp.xtext import XtextError, decode, encode


class TestDecode:
    def test_plain_xchars(self):
        # RFC 3461 §4
        assert decode("abc@example.com") == "abc@example.com"

    def test_empty(self):
        assert decode("") == ""

    def test_hexchars(self):
        # RFC 3461 §4
        assert decode("a+2Bb+3Dc+20d") == "a+b=c d"

    def test_octets_above_ascii(self):
        assert decode("+C3+A9+FF+00") == "\u00c3\u00a9\u00ff\u0000"

    def test_all_xchar_range(self):
        chars = "".join(chr(c) for c in range(33, 127) if chr(c) not in "+=")
        assert decode(chars) == chars

    @pytest.mark.parametrize(
        "value",
        ["a=b", "a b", "a\tb", "a\x7fb", "a\u00e9b", "+", "+2", "+2G", "a+", "+ZZ", "+2b", "+e9"],
    )
    def test_rejects(self, value):
        # RFC 3461 §4: raw "=", chars outside 33..126, "+" not followed by 2 hex digits,
        # lower-case hex rejected by default.
        with pytest.raises(XtextError):
            decode(value)

    def test_lenient_accepts_lower_case_hex(self):
        # doc/conformance.rst 3461-P4: lenient_xtext switch
        assert decode("a+2bb+3d", lenient=True) == "a+b="
        assert decode("+e9+E9", lenient=True) == "\u00e9\u00e9"

    @pytest.mark.parametrize("value", ["a=b", "+2", "a b", "+g0"])
    def test_lenient_still_rejects_garbage(self, value):
        with pytest.raises(XtextError):
            decode(value, lenient=True)

    def test_decoded_crlf_is_possible_here_and_blocked_by_params(self):
        # xtext itself may carry CR/LF; params.py rejects them (doc/conformance.rst 3461-P5).
        assert decode("a+0D+0Ab") == "a\r\nb"

    def test_error_is_value_error(self):
        assert issubclass(XtextError, ValueError)


class TestEncode:
    def test_plain(self):
        assert encode("abc@example.com") == "abc@example.com"

    def test_escapes_plus_equals_and_outside_range(self):
        # RFC 3461 §4
        assert encode("a+b=c d\x7f\u00e9\x00") == "a+2Bb+3Dc+20d+7F+E9+00"

    def test_upper_case_hex(self):
        # RFC 3461 §4
        assert encode("\u00ff\n") == "+FF+0A"

    def test_base64_fqhn_escaped(self):
        # RFC 3885 §3.2: base64 "+"/"=" become "+2B"/"+3D" on the wire.
        assert encode("ab+/c=") == "ab+2B/c+3D"

    def test_rejects_non_octet(self):
        with pytest.raises(XtextError):
            encode("\u20ac")

    def test_round_trip(self):
        value = "".join(chr(c) for c in range(256))
        assert decode(encode(value)) == value
