"""The SMTP and LMTP client sessions with BDAT (RFC 3030) over a StringTransport: the exact
bytes, the replies after each chunk, and DATA when CHUNKING is not offered or turned off."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mtrkmta.lmtp.client import LMTPClient
from mtrkmta.smtp.client import (
    ClientSettings,
    ClientTimeouts,
    OutgoingTransaction,
    SMTPClient,
    TransactionResult,
)

HOSTNAME = "relay.example.test"
SETTINGS = ClientSettings(HOSTNAME, ClientTimeouts())
CONTENT = b"Subject: dots\r\n\r\n.\r\n..two\r\n\xe4\xf6\xfc 8-bit\r\n.\r\n"
CHUNKING = ("PIPELINING", "8BITMIME", "CHUNKING")


class Session:
    """A client session on a StringTransport, its handshake done with ``extensions``."""

    def __init__(
        self,
        extensions: tuple[str, ...] = CHUNKING,
        *,
        settings: ClientSettings = SETTINGS,
        client_class: type[SMTPClient] = SMTPClient,
    ) -> None:
        self.clock = Clock()
        self.client = client_class(settings, self.clock, server_name="mx.example.test", tls="none")
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.reply("220 mx.example.test ESMTP")
        lines = ["mx.example.test", *extensions]
        self.reply("\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}")
        assert self.client.usable
        self.said()  # the EHLO/LHLO

    def reply(self, text: str) -> None:
        self.client.dataReceived(text.encode("utf-8") + b"\r\n")

    def said(self) -> bytes:
        """What the client wrote since the last call, letting its content producer run dry."""
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        data = self.transport.value()
        self.transport.clear()
        return data

    def send(self, *recipients: str, content: bytes = CONTENT) -> list[Any]:
        done: list[Any] = []
        tx = OutgoingTransaction("a@example.test", recipients or ("b@example.test",), content)
        d: Deferred[TransactionResult] = self.client.send(tx)
        d.addCallback(done.append)
        return done


def codes(result: TransactionResult) -> list[int | None]:
    return [r.reply.code if r.reply else None for r in result.per_recipient()]


def test_chunking_offered_sends_one_bdat_last_with_the_exact_unstuffed_bytes():
    s = Session()
    done = s.send()
    # MAIL and RCPT pipelined (RFC 2920), but BDAT waits for their replies.
    assert s.said() == b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n"
    s.reply("250 2.1.0 Ok")
    assert s.said() == b""
    s.reply("250 2.1.5 Ok")
    # RFC 3030 §2: exactly len(CONTENT) octets, no dot-stuffing, no "." terminator.
    assert s.said() == b"BDAT %d LAST\r\n" % len(CONTENT) + CONTENT
    assert not done
    s.reply("250 2.0.0 Ok: queued as 4Xyz")
    (result,) = done
    assert result.error is None and result.dot_sent and result.data is None
    assert codes(result) == [250]


def test_chunks_are_bounded_and_each_waits_for_its_250():
    settings = ClientSettings(HOSTNAME, ClientTimeouts(), bdat_chunk=12, data_chunk=7)
    s = Session(settings=settings)
    done = s.send()
    s.said()
    s.reply("250 2.1.0 Ok")
    s.reply("250 2.1.5 Ok")
    assert s.said() == b"BDAT 12\r\n" + CONTENT[:12]
    s.reply("250 2.0.0 12 octets received")
    assert s.said() == b"BDAT 12\r\n" + b"s\r\n\r\n.\r\n..tw"  # "." and ".." unstuffed
    s.reply("250 2.0.0 12 octets received")
    assert s.said() == b"BDAT 12\r\n" + CONTENT[24:36]
    assert not done
    s.reply("250 2.0.0 12 octets received")
    assert s.said() == b"BDAT 5 LAST\r\n" + b"\r\n.\r\n"
    s.reply("250 2.0.0 Ok: queued")
    assert codes(done[0]) == [250] and done[0].dot_sent


def test_a_refused_non_final_chunk_decides_every_accepted_recipient_and_ends_the_chunks():
    settings = ClientSettings(HOSTNAME, ClientTimeouts(), bdat_chunk=12)
    s = Session(settings=settings)
    done = s.send("b@example.test", "c@example.test", "d@example.test")
    s.said()
    s.reply("250 2.1.0 Ok")
    s.reply("250 2.1.5 Ok")
    s.reply("550 5.1.1 no such user")
    s.reply("250 2.1.5 Ok")
    assert s.said() == b"BDAT 12\r\n" + CONTENT[:12]
    s.reply("552 5.3.4 Message too big")
    (result,) = done
    assert codes(result) == [552, 550, 552]
    assert not result.dot_sent and result.error is None
    assert s.said() == b""  # RFC 3030 §2: no further BDAT after a failed one
    assert s.client.usable
    s.send()
    assert s.said().startswith(b"RSET\r\n")


def test_every_rcpt_refused_sends_no_bdat_and_the_next_transaction_rsets():
    s = Session()
    done = s.send("b@example.test", "c@example.test")
    s.said()
    s.reply("250 2.1.0 Ok")
    s.reply("550 5.1.1 unknown")
    s.reply("450 4.2.1 try later")
    (result,) = done
    assert codes(result) == [550, 450]
    assert s.said() == b""  # nothing pipelined that would have to be discarded
    s.send()
    assert s.said() == b"RSET\r\n"


def test_refused_mail_sends_no_bdat():
    s = Session(("CHUNKING",))  # no PIPELINING: one command at a time
    done = s.send()
    assert s.said() == b"MAIL FROM:<a@example.test>\r\n"
    s.reply("451 4.3.0 not now")
    assert codes(done[0]) == [451]
    assert s.said() == b""


def test_without_pipelining_each_rcpt_waits_then_bdat():
    s = Session(("CHUNKING", "8BITMIME"))
    done = s.send("b@example.test", "c@example.test")
    assert s.said() == b"MAIL FROM:<a@example.test>\r\n"
    s.reply("250 2.1.0 Ok")
    assert s.said() == b"RCPT TO:<b@example.test>\r\n"
    s.reply("250 2.1.5 Ok")
    assert s.said() == b"RCPT TO:<c@example.test>\r\n"
    s.reply("250 2.1.5 Ok")
    assert s.said() == b"BDAT %d LAST\r\n" % len(CONTENT) + CONTENT
    s.reply("451 4.3.0 queue file write error")
    assert codes(done[0]) == [451, 451]


def test_lmtp_one_reply_per_accepted_recipient_after_bdat_last():
    s = Session(
        ("8BITMIME", "CHUNKING", "ENHANCEDSTATUSCODES", "PIPELINING"), client_class=LMTPClient
    )
    done = s.send("a@example.test", "bad@example.test", "full@example.test")
    s.said()
    s.reply("250 2.1.0 Ok")
    s.reply("250 2.1.5 Ok")
    s.reply("550 5.1.1 <bad@example.test> User doesn't exist")
    s.reply("250 2.1.5 Ok")
    assert s.said() == b"BDAT %d LAST\r\n" % len(CONTENT) + CONTENT
    s.reply("250 2.0.0 <a@example.test> Saved")
    assert not done  # RFC 2033 §4.2: one reply per accepted RCPT
    s.reply("452 4.2.2 <full@example.test> Quota exceeded")
    (result,) = done
    assert codes(result) == [250, 550, 452]
    assert result.final[1] is None


def test_connection_lost_after_bdat_last_leaves_the_outcome_unknown():
    s = Session()
    done = s.send()
    s.said()
    s.reply("250 2.1.0 Ok")
    s.reply("250 2.1.5 Ok")
    assert s.said().startswith(b"BDAT ")
    s.client.connectionLost(None)
    (result,) = done
    assert result.error is not None and result.dot_sent
    assert result.per_recipient()[0].unknown


def test_no_reply_to_a_chunk_times_out_within_the_data_block_timeout():
    settings = ClientSettings(HOSTNAME, ClientTimeouts(), bdat_chunk=16)
    s = Session(settings=settings)
    done = s.send()
    s.said()
    s.reply("250 2.1.0 Ok")
    s.reply("250 2.1.5 Ok")
    s.said()
    s.clock.advance(SETTINGS.timeouts.data_block - 1)
    assert not done
    s.clock.advance(1)
    (result,) = done
    assert result.error is not None and "timed out waiting for the reply to BDAT" in str(
        result.error
    )
    assert not result.dot_sent and s.transport.disconnecting


def test_a_reply_nobody_asked_for_during_bdat_breaks_the_session():
    s = Session()
    done = s.send()
    s.said()
    s.reply("250 2.1.0 Ok")
    s.reply("250 2.1.5 Ok")
    s.said()
    s.reply("250 2.0.0 Ok: queued")
    s.reply("250 2.0.0 and one more")
    assert codes(done[0]) == [250]
    assert not s.client.usable


def test_without_chunking_offered_data_with_dot_stuffing():
    s = Session(("PIPELINING", "8BITMIME"))
    done = s.send()
    assert s.said() == b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
    s.reply("250 2.1.0 Ok")
    s.reply("250 2.1.5 Ok")
    s.reply("354 go ahead")
    assert s.said() == CONTENT.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    s.reply("250 2.0.0 Ok")
    assert codes(done[0]) == [250]


def test_chunking_turned_off_sends_data_although_offered():
    s = Session(settings=ClientSettings(HOSTNAME, ClientTimeouts(), chunking=False))
    s.send()
    assert s.said().endswith(b"DATA\r\n")


def test_binary_content_goes_unchanged():
    s = Session((*CHUNKING, "BINARYMIME"))
    content = b"\x00\r\n.\r\nbare\nlf\rcr\xff"
    done: list[Any] = []
    tx = OutgoingTransaction(
        "a@example.test", ("b@example.test",), content, ("BODY=BINARYMIME",), binary=True
    )
    s.client.send(tx).addCallback(done.append)
    assert s.said() == b"MAIL FROM:<a@example.test> BODY=BINARYMIME\r\nRCPT TO:<b@example.test>\r\n"
    s.reply("250 2.1.0 Ok")
    s.reply("250 2.1.5 Ok")
    assert s.said() == b"BDAT %d LAST\r\n" % len(content) + content
    s.reply("250 2.0.0 Ok")
    assert codes(done[0]) == [250]
