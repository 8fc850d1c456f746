"""normalize_line_ends: every bare CR and bare LF becomes CRLF (RFC 5321 §2.3.8)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtrkmta.smtp.framing import normalize_line_ends

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

line_end_bytes = st.one_of(
    st.binary(max_size=80),
    st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\x00"]), max_size=60).map(
        b"".join
    ),
)


def reference(data: bytes) -> bytes:
    """One octet at a time: CR LF is copied, a CR or LF on its own becomes CR LF."""
    out = bytearray()
    index = 0
    while index < len(data):
        if data[index : index + 2] == b"\r\n":
            out += b"\r\n"
            index += 2
        elif data[index : index + 1] in (b"\r", b"\n"):
            out += b"\r\n"
            index += 1
        else:
            out += data[index : index + 1]
            index += 1
    return bytes(out)


def test_bare_cr_and_bare_lf_become_crlf():
    assert normalize_line_ends(b"hello\r.\r\nMAIL") == b"hello\r\n.\r\nMAIL"
    assert normalize_line_ends(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd"
    assert normalize_line_ends(b"\r\r\n\n\r") == b"\r\n\r\n\r\n\r\n"
    assert normalize_line_ends(b"\n\r") == b"\r\n\r\n"  # LF CR is two bare ends, not one


def test_crlf_only_and_empty_are_unchanged():
    assert normalize_line_ends(b"") == b""
    assert normalize_line_ends(b"a\r\n.\r\n\r\n") == b"a\r\n.\r\n\r\n"


@SETTINGS
@given(line_end_bytes)
def test_matches_the_octet_by_octet_reference(data):
    assert normalize_line_ends(data) == reference(data)


@SETTINGS
@given(line_end_bytes)
def test_result_has_cr_and_lf_only_as_crlf_and_is_a_fixed_point(data):
    result = normalize_line_ends(data)
    assert result.count(b"\r") == result.count(b"\n") == result.count(b"\r\n")
    assert normalize_line_ends(result) == result
    assert result.replace(b"\r\n", b"") == data.replace(b"\r\n", b"").replace(b"\r", b"").replace(
        b"\n", b""
    )
