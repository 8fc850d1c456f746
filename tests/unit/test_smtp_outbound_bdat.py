"""The pure BDAT rules of the outbound client: when to chunk, and the exact chunk framing
(RFC 3030 §2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_smtp_outbound import SETTINGS, content_bytes, envelope, expected_content, params

from mtrkmta.smtp.framing import DataReader
from mtrkmta.smtp.outbound import (
    bdat_chunks,
    bdat_command,
    binarymime_status,
    dot_stuff,
    offers_chunking,
)

POSTFIX = {"PIPELINING": "", "SIZE": "10240000", "8BITMIME": "", "CHUNKING": ""}


def test_chunking_only_when_offered_and_enabled():
    assert offers_chunking(POSTFIX, True)
    assert not offers_chunking(POSTFIX, False)  # delivery.chunking = false
    assert not offers_chunking({"PIPELINING": "", "8BITMIME": ""}, True)
    assert not offers_chunking({}, True)  # HELO: no extensions at all


def test_bdat_command_is_the_exact_grammar():
    # RFC 3030 §2: bdat-cmd ::= "BDAT" SP chunk-size [ SP end-marker ] CR LF
    assert bdat_command(65536, False) == b"BDAT 65536\r\n"
    assert bdat_command(12, True) == b"BDAT 12 LAST\r\n"
    assert bdat_command(0, True) == b"BDAT 0 LAST\r\n"
    with pytest.raises(ValueError, match="never negative"):
        bdat_command(-1, True)


def test_one_chunk_without_dot_stuffing_or_terminator():
    content = b"Subject: dots\r\n\r\n.\r\n..leading\r\n.\r\nend\r\n"
    assert list(bdat_chunks(content)) == [(b"BDAT %d LAST\r\n" % len(content), content)]


def test_eight_bit_and_nul_octets_go_as_they_are():
    content = b"Subject: x\r\n\r\n\xe4\xf6\xfc\x00\xff\x80 .\r\n"
    assert list(bdat_chunks(content)) == [(b"BDAT 24 LAST\r\n", content)]


def test_empty_content_is_bdat_0_last():
    assert list(bdat_chunks(b"")) == [(b"BDAT 0 LAST\r\n", b"")]


def test_content_is_split_into_bounded_chunks_with_exact_counts():
    content = b"0123456789" * 2 + b"abc\r\n"
    assert list(bdat_chunks(content, 10)) == [
        (b"BDAT 10\r\n", b"0123456789"),
        (b"BDAT 10\r\n", b"0123456789"),
        (b"BDAT 5 LAST\r\n", b"abc\r\n"),
    ]


def test_a_chunk_boundary_on_an_exact_end_needs_no_empty_last_chunk():
    assert list(bdat_chunks(b"abcd\r\n", 3)) == [
        (b"BDAT 3\r\n", b"abc"),
        (b"BDAT 3 LAST\r\n", b"d\r\n"),
    ]


def test_line_ends_are_repaired_as_on_the_data_path():
    # RFC 5321 §2.3.8: no bare CR or LF on the wire; a missing final CRLF is added.
    assert list(bdat_chunks(b"a\nb\rc")) == [(b"BDAT 9 LAST\r\n", b"a\r\nb\r\nc\r\n")]


def test_a_crlf_cut_by_a_chunk_boundary_stays_one_crlf():
    # The CR of a CRLF split by the boundary waits for the next chunk: not a bare CR.
    assert list(bdat_chunks(b"ab\r\ncd\r\n", 3)) == [
        (b"BDAT 2\r\n", b"ab"),
        (b"BDAT 4\r\n", b"\r\ncd"),
        (b"BDAT 2 LAST\r\n", b"\r\n"),
    ]


@SETTINGS
@given(content=content_bytes, chunk=st.integers(min_value=1, max_value=40))
def test_chunks_carry_what_data_would_deliver(content, chunk):
    chunks = list(bdat_chunks(content, chunk))
    for command, payload in chunks:
        assert command == bdat_command(len(payload), command.endswith(b" LAST\r\n"))
        assert len(payload) <= 2 * chunk + 4  # bounded: a held CR, bare line ends, a final CRLF
    assert [command.endswith(b" LAST\r\n") for command, _ in chunks] == [False] * (
        len(chunks) - 1
    ) + [True]
    assert all(payload for _, payload in chunks[:-1])  # no empty chunk but the last
    carried = b"".join(payload for _, payload in chunks)
    assert carried == expected_content(content)
    reader = DataReader(max_size=1 << 20, max_line=1 << 20)
    result = reader.feed(dot_stuff(content))
    assert result is not None and result.content == carried  # the same bytes as DATA


# -- BODY=BINARYMIME (RFC 3030 §3) -------------------------------------------------------

BINARY_HOP = {**POSTFIX, "BINARYMIME": ""}


def test_binarymime_needs_a_hop_with_binarymime_and_chunking():
    binary = envelope(body="BINARYMIME")
    assert binarymime_status(binary, BINARY_HOP, True) is None
    assert binarymime_status(binary, POSTFIX, True) == "5.6.3"  # no BINARYMIME
    assert binarymime_status(binary, {"BINARYMIME": "", "8BITMIME": ""}, True) == "5.6.3"
    assert binarymime_status(binary, BINARY_HOP, False) == "5.6.3"  # delivery.chunking off
    assert binarymime_status(envelope(body="8BITMIME"), {}, False) is None


def test_body_binarymime_only_to_a_hop_advertising_it():
    assert "BODY=BINARYMIME" in params(envelope(body="BINARYMIME"), BINARY_HOP)
    assert not any(p.startswith("BODY=") for p in params(envelope(body="BINARYMIME"), POSTFIX))
    assert "BODY=8BITMIME" in params(envelope(body="8BITMIME"), BINARY_HOP)


def test_binary_chunks_are_the_octets_unchanged():
    content = b"a\rb\nc\r\n.\r\n\x00\xff"
    assert list(bdat_chunks(content, 4, binary=True)) == [
        (b"BDAT 4\r\n", b"a\rb\n"),
        (b"BDAT 4\r\n", b"c\r\n."),
        (b"BDAT 4 LAST\r\n", b"\r\n\x00\xff"),
    ]
    assert list(bdat_chunks(b"", binary=True)) == [(b"BDAT 0 LAST\r\n", b"")]
