"""BINARYMIME (RFC 3030 §3) on the server: the keyword, BODY=BINARYMIME, DATA refused, BDAT kept
byte for byte."""

from __future__ import annotations

import pytest
from test_chunking import stored
from test_dsn_render import failed_report, parse, render, returned, stored_message
from test_smtp_server import Client, make_factory
from twisted.internet.testing import MemoryReactorClock
from twisted.python.threadpool import ThreadPool

from mtrkmta.delivery.interfaces import Attempt, NextHop
from mtrkmta.delivery.maildir import MaildirTransport
from mtrkmta.envelope import Envelope, MailParams, Recipient
from mtrkmta.lmtp.server import LMTPServerFactory
from mtrkmta.smtp.chunking import ChunkedContent
from mtrkmta.smtp.server import ServerSettings
from mtrkmta.tracking.interfaces import RecipientState

EHLO = b"EHLO c.example\r\n"
BINARY_ENVELOPE = EHLO + b"MAIL FROM:<a@x.test> BODY=BINARYMIME\r\nRCPT TO:<m@x.test>\r\n"
# A header section of CRLF lines, then a body with NUL, bare CR, bare LF, 8-bit octets,
# a "line" far over 998 octets and no final CRLF: all of it binary data.
HEADER = b"Subject: bin\r\nContent-Type: application/octet-stream\r\n\r\n"
BODY = b"\x00\r\x00\n\xff\r\r\n\n.\r\n" + bytes(range(256)) * 8 + b"\rend\r"
BINARY = HEADER + BODY


# -- sans-IO -------------------------------------------------------------------------------


def test_binary_content_checks_the_header_section_only():
    content = ChunkedContent(100_000, binary=True)
    out = content.feed(b"Received: a\r\nX: ") + content.feed(b"1\r") + content.feed(b"\n\r")
    # The end of the header section split across chunks, a CR held back meanwhile.
    out += content.feed(b"\n\x00\rreceived: b\n" + b"z" * 2000 + b"\r")
    out += content.finish()
    assert out == b"Received: a\r\nX: 1\r\n\r\n\x00\rreceived: b\n" + b"z" * 2000 + b"\r"
    assert content.received_headers == 1  # RFC 5321 §6.3: the header section's only
    assert not content.refused and not content.bare_line_ends and not content.line_too_long


def test_binary_content_refuses_a_bare_line_end_in_its_header_section():
    # Making it CRLF could move the end of the header section into the body, so a bare
    # LF there is refused even though text content would have it made CRLF.
    content = ChunkedContent(100_000, binary=True)
    assert content.feed(b"Subject: x\n\nbody\r\n\r\n") == b""
    assert content.refused and content.bare_line_ends
    trailing = ChunkedContent(100_000, binary=True)
    trailing.feed(b"Subject: x\r")
    assert trailing.finish() == b"" and trailing.refused


def test_binary_content_keeps_the_header_line_limit_and_size():
    # RFC 5321 §4.5.3.1.6 for header lines; RFC 1870 for the whole.
    content = ChunkedContent(100_000, binary=True)
    content.feed(b"X: " + b"a" * 996 + b"\r\n")
    assert content.refused and content.line_too_long
    sized = ChunkedContent(10, binary=True)
    assert not sized.announce(11) and sized.refused


# -- sessions --------------------------------------------------------------------------------


def test_binarymime_is_advertised_after_chunking(client):
    # RFC 3030 §3: BINARYMIME only together with CHUNKING.
    lines = client.send(EHLO)
    assert lines[lines.index(b"250-CHUNKING") + 1] == b"250-BINARYMIME"


def test_lmtp_advertises_binarymime(receiver, clock):
    factory = LMTPServerFactory(
        ServerSettings(hostname="lda.example.test", listener="lmtp"), receiver, clock
    )
    client = Client(factory)
    lines = client.send(b"LHLO c.example\r\n")
    assert lines[lines.index(b"250-CHUNKING") + 1] == b"250-BINARYMIME"
    client.send(b"MAIL FROM:<a@x.test> BODY=BINARYMIME\r\nRCPT TO:<m@x.test>\r\n")
    assert client.send(b"BDAT %d LAST\r\n" % len(BINARY) + BINARY) == [
        b"250 2.0.0 <m@x.test> Ok: queued as Q1"
    ]
    assert stored(receiver) == BINARY
    client.close()


def test_binarymime_mail_then_data_is_503_and_bdat_is_accepted(client, receiver):
    replies = client.send(BINARY_ENVELOPE)
    assert replies[-2:] == [b"250 2.1.0 Ok", b"250 2.1.5 Ok"]
    # RFC 3030 §3: DATA after MAIL BODY=BINARYMIME MUST get 503.
    assert client.send(b"DATA\r\n") == [b"503 5.5.1 BODY=BINARYMIME requires BDAT, not DATA"]
    assert receiver.sinks == []
    half = len(BINARY) // 2
    assert client.send(b"BDAT %d\r\n" % half + BINARY[:half]) == [
        b"250 2.0.0 %d octets received" % half
    ]
    rest = BINARY[half:]
    assert client.send(b"BDAT %d LAST\r\n" % len(rest) + rest) == [b"250 2.0.0 Ok: queued as Q1"]
    envelope, content = receiver.accepted[0]
    assert envelope.params.body == "BINARYMIME"
    assert stored(receiver) == BINARY  # byte for byte: no line end made CRLF
    assert content.startswith(b"Received: from c.example")


def test_binarymime_is_kept_byte_exact_under_bare_line_ends_reject(receiver, clock):
    client = Client(make_factory(receiver, clock, bare_line_ends="reject"))
    client.send(BINARY_ENVELOPE)
    # One octet at a time: every CR is at the end of a chunk once.
    for octet in BINARY[:-1]:
        assert client.send(b"BDAT 1\r\n" + bytes([octet])) == [b"250 2.0.0 1 octets received"]
    assert client.send(b"BDAT 1 LAST\r\n" + BINARY[-1:]) == [b"250 2.0.0 Ok: queued as Q1"]
    assert stored(receiver) == BINARY
    client.close()


def test_binarymime_header_section_with_a_bare_lf_is_refused(client, receiver):
    client.send(BINARY_ENVELOPE)
    message = b"Subject: x\nX: y\r\n\r\n\x00"
    assert client.send(b"BDAT %d LAST\r\n" % len(message) + message + b"NOOP\r\n") == [
        b"550 5.6.0 Bare CR or LF in the header section of a BINARYMIME message",
        b"250 2.0.0 Ok",
    ]
    assert receiver.accepted == [] and receiver.sinks[0].discarded


# -- local delivery --------------------------------------------------------------------------


def test_maildir_stores_a_binarymime_message_byte_exact(tmp_path):
    # RFC 3030 §3: CRLF -> LF (the Maildir convention) would change a binary body.
    envelope = Envelope(
        queue_id="Q1",
        sender="s@y.test",
        recipients=(Recipient("alice@x.test"),),
        params=MailParams(body="BINARYMIME"),
    )
    maildir = MaildirTransport(MemoryReactorClock(), ThreadPool(), tmp_path)
    attempt = Attempt(envelope, BINARY, (0,), NextHop("maildir", "maildir"), now=0.0)
    assert [o.state for o in maildir._deliver(attempt)] == [RecipientState.DELIVERED]
    (copy,) = (tmp_path / "alice" / "new").iterdir()
    assert copy.read_bytes() == (
        b"Return-Path: <s@y.test>\r\nDelivered-To: <alice@x.test>\r\n" + BINARY
    )


# -- DSN of a binary message -----------------------------------------------------------------


@pytest.mark.parametrize("ret", ["FULL", None])
def test_dsn_returns_only_the_header_of_a_binary_message(ret):
    # RFC 3461 §6.2 (full content SHOULD, not MUST), RFC 6522 §3 (text/rfc822-headers for
    # content that cannot go as it is): a binary body in message/rfc822 would make the DSN
    # an invalid 7bit/8bit message, and normalising its line ends would corrupt it.
    dsn = render(
        [failed_report()],
        message=stored_message(body="BINARYMIME", size=len(BINARY)),
        content=BINARY,
        ret=ret,
    )
    assert returned(dsn) == ("text/rfc822-headers", HEADER[:-2])
    assert b"\x00" not in dsn and b"\xff" not in dsn
    assert parse(dsn).defects == []
    text = parse(dsn).get_body(("plain",))
    assert text is not None
    words = " ".join(text.get_content().split())
    assert "sent as binary MIME (BODY=BINARYMIME), so its body is not returned" in words
