"""The LMTP variant of the server core (RFC 2033)."""

from __future__ import annotations

import pytest
from test_smtp_server import Client, RecordingReceiver
from twisted.internet.testing import MemoryReactorClock

from mtrkmta.lmtp.server import LMTPServerFactory
from mtrkmta.smtp.server import ServerSettings


@pytest.fixture
def receiver():
    return RecordingReceiver()


@pytest.fixture
def client(receiver):
    factory = LMTPServerFactory(
        ServerSettings(hostname="lda.example.test", listener="lmtp"), receiver, MemoryReactorClock()
    )
    c = Client(factory)
    yield c
    c.close()


def test_greeting_and_lhlo(client):
    assert client.lines() == [b"220 lda.example.test LMTP mtrkmta"]
    lines = client.send(b"LHLO c.example\r\n")
    assert lines[0] == b"250-lda.example.test"
    # RFC 2033 §5: PIPELINING and ENHANCEDSTATUSCODES; MTRK with DSN (RFC 3886 §3.5,
    # doc/conformance.rst 3885-P4).
    assert {b"250-PIPELINING", b"250-ENHANCEDSTATUSCODES", b"250-DSN", b"250-MTRK"} <= set(lines)


def test_helo_and_ehlo_are_refused(client):
    # RFC 2033 §4.1: HELO/EHLO never get 2xx on LMTP.
    assert client.send(b"EHLO c\r\n")[0].startswith(b"500 5.5.1")
    assert client.send(b"HELO c\r\n")[0].startswith(b"500 5.5.1")


def test_one_reply_per_recipient_in_order_with_duplicates(client, receiver):
    # RFC 2033 §4.2: one reply per accepted RCPT, RCPT order, duplicates included.
    client.send(
        b"LHLO c\r\nMAIL FROM:<s@c.example>\r\nRCPT TO:<a@lda.example.test>\r\n"
        b"RCPT TO:<b@lda.example.test>\r\nRCPT TO:<a@lda.example.test>\r\nDATA\r\n"
    )
    assert client.send(b"Subject: x\r\n\r\nhi\r\n.\r\n") == [
        b"250 2.0.0 <a@lda.example.test> Ok: queued as Q1",
        b"250 2.0.0 <b@lda.example.test> Ok: queued as Q1",
        b"250 2.0.0 <a@lda.example.test> Ok: queued as Q1",
    ]
    assert len(receiver.accepted[0][0].recipients) == 3


def test_refused_content_is_refused_for_every_recipient(client, receiver):
    receiver.fail_accept = True
    client.send(
        b"LHLO c\r\nMAIL FROM:<s@c.example>\r\nRCPT TO:<a@lda.example.test>\r\n"
        b"RCPT TO:<b@lda.example.test>\r\nDATA\r\n"
    )
    assert (
        client.send(b"hi\r\n.\r\n")
        == [b"451 4.3.0 Could not queue the message; try again later"] * 2
    )


def test_data_without_recipients(client):
    # RFC 2033 §4.2
    client.send(b"LHLO c\r\nMAIL FROM:<s@c.example>\r\n")
    assert client.send(b"DATA\r\n") == [b"503 5.5.1 No valid recipients"]


def test_lhlo_name_must_be_a_printable_ascii_domain_of_at_most_255_octets(client):
    # RFC 5321 §4.5.3.1.2 (RFC 2033 §4.1: LHLO is EHLO's twin).
    assert client.send(b"LHLO " + b"h" * 256 + b"\r\n") == [
        b"501 5.5.2 LHLO argument too long (RFC 5321 \xc2\xa74.5.3.1.2)"
    ]
    assert client.send(b"LHLO evil\x0bX-Injected:yes\r\n") == [
        b"501 5.5.2 LHLO argument must be a domain or address literal in printable ASCII"
    ]
    assert client.send(b"MAIL FROM:<s@c.example>\r\n")[0].startswith(b"503 5.5.1")


def test_quit_with_an_argument_and_expn(client):
    # RFC 2033 §4 keeps RFC 5321's commands: QUIT takes no argument (RFC 5321 §4.3.2:
    # 501) and a disabled EXPN answers 502 (RFC 5321 §3.5.2, §7.3).
    client.send(b"LHLO c\r\n")
    assert client.send(b"QUIT oops\r\nEXPN staff\r\n") == [
        b"501 5.5.4 Syntax: QUIT",
        b"502 5.5.1 EXPN not implemented",
    ]
    assert client.send(b"QUIT\r\n") == [b"221 2.0.0 lda.example.test Bye"]
