"""mtrkmta sends BDAT (RFC 3030) to a real Postfix 3.7 smtpd and to Dovecot 2.3's LMTP.

Both advertise CHUNKING. A recording proxy between mtrkmta and the peer captures what
mtrkmta wrote, so the test sees the ``BDAT <n>[ LAST]`` commands and each chunk's exact
octets (no dot-stuffing, CRLF line ends); Dovecot's Maildir file then shows that the
bytes arrived end to end (Dovecot stores LF line ends: ``mail_save_crlf`` is off).
"""

from __future__ import annotations

import re

import pytest_twisted
from interop_lab import (
    Lab,
    Postfix,
    final_record,
    in_thread,
    outcome,
    queue_id,
    running_mtrkmta,
    send_mail,
    start_dovecot,
    wait_for,
)
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.protocols import portforward

from mtrkmta.tracking.interfaces import RecipientState

SENDER = "sender@localhost"
CHUNK = 256 * 1024  # mtrkmta.smtp.outbound.BDAT_CHUNK


def message(size: int) -> bytes:
    """A message with lines DATA would dot-stuff, a lone "." line, and 8-bit octets."""
    head = (
        b"From: sender@localhost\r\nTo: alice@example.test\r\nSubject: bdat interop\r\n"
        b"Message-ID: <bdat-interop@client.example.test>\r\n"
        b"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n"
        b"\r\n.\r\n..\r\n.hidden line\r\n"
    )
    line = b".dot \xe4\xf6\xfc\xdf 8-bit 0123456789 abcdefghijklmnopqrstuvwxyz\r\n"
    return head + line * (size // len(line)) + b".\r\nend\r\n"


class _Recorder(portforward.ProxyServer):
    def dataReceived(self, data: bytes) -> None:
        self.factory.captured.extend(data)  # type: ignore[attr-defined]
        super().dataReceived(data)


class Capture(portforward.ProxyFactory):
    """A loopback proxy to ``port`` that records what the client sent."""

    protocol = _Recorder

    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port)
        self.captured = bytearray()
        self.listening: IListeningPort = reactor.listenTCP(0, self, interface="127.0.0.1")

    @property
    def listen_port(self) -> int:
        return self.listening.getHost().port

    def chunks(self) -> list[tuple[str, bytes]]:
        """Every BDAT command line the client sent, with the octets that followed it."""
        data, found, at = bytes(self.captured), [], 0
        while at < len(data):
            end = data.index(b"\r\n", at)
            line = data[at:end].decode("ascii", "replace")
            at = end + 2
            if line.upper().startswith("BDAT "):
                size = int(line.split(" ")[1])
                found.append((line, data[at : at + size]))
                at += size
        return found

    def commands(self) -> list[str]:
        """The command verbs the client sent (BDAT octets skipped)."""
        verbs = []
        data, at = bytes(self.captured), 0
        while at < len(data):
            end = data.index(b"\r\n", at)
            line = data[at:end].decode("ascii", "replace")
            verbs.append(line.split(" ")[0].upper())
            at = end + 2 + (int(line.split(" ")[1]) if verbs[-1] == "BDAT" else 0)
        return verbs


def body(stored: bytes) -> bytes:
    return stored.split(b"\n\n", 1)[1]


def lf(content: bytes) -> bytes:
    return content.replace(b"\r\n", b"\n")


@pytest_twisted.ensureDeferred
async def test_mtrkmta_sends_bdat_chunks_to_postfix_smtpd_and_the_bytes_arrive(lab: Lab):
    content = message(300 * 1024)  # two chunks: 256 KiB, then the rest with LAST
    dovecot = await start_dovecot(lab)
    postfix = Postfix(lab, default_transport=f"lmtp:inet:127.0.0.1:{dovecot.port}")
    await in_thread(postfix.start)
    capture = Capture(postfix.port)
    route = ("routes", f"example.test=smtp:tcp:host=127.0.0.1:port={capture.listen_port};tls=none")
    try:
        async with running_mtrkmta(
            lab, "to-postfix.toml", POSTFIX_SMTP_PORT=capture.listen_port, options=(route,)
        ) as node:
            reply = await in_thread(
                send_mail,
                node.port("smtp"),
                SENDER,
                [("alice@example.test", "")],
                content,
                mail_params="BODY=8BITMIME",
            )
            record = await final_record(node, queue_id(reply))
    finally:
        await capture.listening.stopListening()

    alice = outcome(record, "alice@example.test")
    assert alice.state is RecipientState.RELAYED, alice.diagnostic
    # Postfix's smtpd answers BDAT LAST (not DATA) with the octets it took.
    reply_match = re.fullmatch(r"smtp; 250 2\.0\.0 Ok: (\d+) bytes queued as \w+", alice.diagnostic)
    assert reply_match is not None, alice.diagnostic
    # What mtrkmta wrote: MAIL and RCPT, then BDAT (never DATA), exact counts, no stuffing.
    assert "DATA" not in capture.commands()
    (first, last) = capture.chunks()
    assert first[0] == f"BDAT {CHUNK}" and len(first[1]) == CHUNK
    assert last[0] == f"BDAT {len(last[1])} LAST"
    sent = first[1] + last[1]
    assert sent.startswith(b"Received: ") and sent.endswith(content)  # CRLF, "." lines as is
    assert int(reply_match.group(1)) == len(sent)
    # Postfix took it (its log) and delivered it into Dovecot: the same bytes arrived.
    await in_thread(wait_for, postfix.sent_lines, "Postfix to deliver into Dovecot")
    (mail,) = await in_thread(wait_for, lambda: dovecot.maildir("alice@example.test"), "the mail")
    stored = mail.read_bytes()
    assert body(stored) == body(lf(content))
    assert b"\n.\n..\n.hidden line\n" in stored and b"\xe4\xf6\xfc\xdf" in stored
    assert b"Subject: bdat interop\n" in stored


@pytest_twisted.ensureDeferred
async def test_mtrkmta_sends_bdat_last_to_dovecot_lmtp_with_one_reply_per_recipient(lab: Lab):
    content = message(64 * 1024)
    dovecot = await start_dovecot(lab)
    capture = Capture(dovecot.port)
    try:
        async with running_mtrkmta(
            lab, "to-dovecot.toml", DOVECOT_LMTP_PORT=capture.listen_port
        ) as node:
            reply = await in_thread(
                send_mail,
                node.port("smtp"),
                SENDER,
                [("alice@example.test", ""), ("full@example.test", ""), ("bob@example.test", "")],
                content,
                mail_params="BODY=8BITMIME",
            )
            record = await final_record(node, queue_id(reply))
    finally:
        await capture.listening.stopListening()

    # RFC 2033 §4.2 after BDAT LAST: one reply per recipient; full@ is over quota (552).
    for address in ("alice@example.test", "bob@example.test"):
        delivered = outcome(record, address)
        assert delivered.state is RecipientState.DELIVERED, delivered.diagnostic
        assert delivered.diagnostic.endswith(" Saved")
    full = outcome(record, "full@example.test")
    assert full.state is RecipientState.FAILED
    assert full.diagnostic.startswith("smtp; 552 5.2.2 <full@example.test> Quota exceeded")
    assert "DATA" not in capture.commands()
    ((line, sent),) = capture.chunks()
    assert line == f"BDAT {len(sent)} LAST"
    assert sent.startswith(b"Received: ") and sent.endswith(content)
    for address in ("alice@example.test", "bob@example.test"):
        (mail,) = dovecot.maildir(address)
        stored = mail.read_bytes()
        assert body(stored) == body(lf(content))
        assert b"by mx.example.test" in stored
