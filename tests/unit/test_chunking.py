"""CHUNKING (RFC 3030): the sans-IO BDAT parse and chunk reading, and server sessions on bytes."""

from __future__ import annotations

import tracemalloc

import pytest
from test_smtp_server import Client, make_factory
from test_smtp_server_limits import CountingReceiver

from mtrkmta.lmtp.server import LMTPServerFactory
from mtrkmta.smtp.chunking import BdatCommand, ChunkedContent, ChunkReader, parse_bdat
from mtrkmta.smtp.reply import SMTPError
from mtrkmta.smtp.server import ServerSettings

ENVELOPE = b"EHLO c.example\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<m@x.test>\r\n"
MESSAGE = b"Subject: chunks\r\n\r\nbody line\r\n"


# -- sans-IO -------------------------------------------------------------------------------


def test_parse_bdat():
    # RFC 3030 §2: "BDAT" SP chunk-size [ SP end-marker ]
    assert parse_bdat("100") == BdatCommand(100, False)
    assert parse_bdat("0 LAST") == BdatCommand(0, True)
    assert parse_bdat("7 last") == BdatCommand(7, True)
    for bad in ("", "x", "-1", "10 MORE", "1.5", "10 LAST LAST", "1" * 21):
        with pytest.raises(SMTPError) as caught:
            parse_bdat(bad)
        assert (caught.value.reply.code, caught.value.reply.enhanced) == (501, "5.5.4")


def test_chunk_reader_takes_exactly_its_octets():
    reader = ChunkReader(10)
    assert reader.feed(b"QUIT\r\n") == (b"QUIT\r\n", b"")
    assert not reader.done
    assert reader.feed(b".\r\n\r\nNOOP\r\n") == (b".\r\n\r", b"\nNOOP\r\n")
    assert reader.done
    assert ChunkReader(0).done


def test_chunked_content_counts_size_and_keeps_crlf_across_chunks():
    content = ChunkedContent(20)
    assert content.announce(10)
    assert content.feed(b"Received: a\r") == b"Received: a"
    assert content.feed(b"\nX: 1\r\n\r\n") == b"\r\nX: 1\r\n\r\n"
    assert content.feed(b"Received: body\r\n") == b"Received: body\r\n"
    assert content.received_headers == 1  # only the header section counts (RFC 5321 §6.3)
    assert not content.bare_line_ends
    assert not content.announce(11)  # 21 > 20 (RFC 1870)
    assert content.refused and content.size_exceeded


def test_chunked_content_received_split_across_chunks_and_bare_line_ends():
    content = ChunkedContent(1000)
    content.feed(b"Rece")
    content.feed(b"ived: x\r\nreceived: y\n")
    assert content.received_headers == 2
    assert content.bare_line_ends
    assert content.feed(b"a\rb") == b"a\r\nb"
    assert content.feed(b"end\r") == b"end"
    assert content.finish() == b"\r\n"  # a CR at the very end is bare: made CRLF
    refusing = ChunkedContent(1000, reject_bare_line_ends=True)
    assert refusing.feed(b"a\nb") == b""
    assert refusing.refused


def test_chunked_content_line_length_across_chunks():
    # RFC 5321 §4.5.3.1.6: 998 octets a line, CRLF excluded; a line may span chunks.
    content = ChunkedContent(100_000)
    content.feed(b"a" * 500)
    content.feed(b"a" * 498 + b"\r")
    content.feed(b"\n" + b"b" * 998 + b"\r\n")
    assert not content.line_too_long
    content.feed(b"c" * 998)
    assert not content.line_too_long
    content.feed(b"c")
    assert content.line_too_long and content.refused
    assert ChunkedContent(100_000).feed(b"x\r\n" + b"y" * 999 + b"\r\nz") == b""


# -- SMTP sessions -------------------------------------------------------------------------


def stored(receiver, index=0) -> bytes:
    """The content accepted, without the Received: header the server put on top."""
    content = receiver.accepted[index][1]
    assert content.startswith(b"Received: from c.example ([192.0.2.7])")
    return content[content.index(b";\r\n\t") + 3 :].split(b"\r\n", 1)[1]


def test_chunking_is_advertised(client):
    assert b"250-CHUNKING" in client.send(b"EHLO c.example\r\n")


def test_one_chunk_last(client, receiver):
    client.send(ENVELOPE)
    replies = client.send(b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE)
    assert replies == [b"250 2.0.0 Ok: queued as Q1"]
    assert stored(receiver) == MESSAGE
    assert b"with ESMTP id Q1" in receiver.accepted[0][1]


def test_several_chunks_each_get_250_then_the_queue_id(client, receiver):
    client.send(ENVELOPE)
    assert client.send(b"BDAT 9\r\nSubject: ") == [b"250 2.0.0 9 octets received"]
    assert client.send(b"BDAT 6\r\nx\r\n\r\nb") == [b"250 2.0.0 6 octets received"]
    assert client.send(b"BDAT 0 LAST\r\n") == [b"250 2.0.0 Ok: queued as Q1"]
    assert stored(receiver) == b"Subject: x\r\n\r\nb"
    # The session goes on: a new transaction.
    assert client.send(b"MAIL FROM:<b@x.test>\r\n") == [b"250 2.1.0 Ok"]


def test_pipelined_chunks_with_command_like_octets_are_content(client, receiver):
    chunk1 = b"Subject: q\r\n\r\nQUIT\r\n"
    chunk2 = b"\r\n.\r\nRSET\r\nMAIL FROM:<evil@x.test>\r\n"
    replies = client.send(
        ENVELOPE
        + b"BDAT %d\r\n" % len(chunk1)
        + chunk1
        + b"BDAT %d LAST\r\n" % len(chunk2)
        + chunk2
        + b"NOOP\r\n"
    )
    assert replies[-3:] == [
        b"250 2.0.0 %d octets received" % len(chunk1),
        b"250 2.0.0 Ok: queued as Q1",
        b"250 2.0.0 Ok",
    ]
    assert stored(receiver) == chunk1 + chunk2
    assert not client.transport.disconnecting


def test_chunk_arriving_one_octet_at_a_time(client, receiver):
    client.send(ENVELOPE)
    client.send(b"BDAT %d LAST\r\n" % len(MESSAGE))
    for octet in MESSAGE[:-1]:
        assert client.send(bytes([octet])) == []
    assert client.send(MESSAGE[-1:] + b"NOOP\r\n") == [
        b"250 2.0.0 Ok: queued as Q1",
        b"250 2.0.0 Ok",
    ]
    assert stored(receiver) == MESSAGE


def test_bdat_without_a_transaction_reads_and_discards_its_chunk(client, receiver):
    client.send(b"EHLO c.example\r\n")
    # RFC 3030 §2: the chunk is read anyway, so "QUIT" in it is no command.
    assert client.send(b"BDAT 6\r\nQUIT\r\nNOOP\r\n") == [
        b"503 5.5.1 Need MAIL command",
        b"250 2.0.0 Ok",
    ]
    client.send(b"MAIL FROM:<a@x.test>\r\n")
    assert client.send(b"BDAT 2 LAST\r\nab") == [b"503 5.5.1 No valid recipients"]
    assert receiver.sinks == []


def test_bdat_after_helo_is_refused_and_its_chunk_read(client, receiver):
    client.send(b"HELO c.example\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<m@x.test>\r\n")
    assert client.send(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n") == [
        b"503 5.5.1 Send EHLO first: BDAT is CHUNKING",
        b"250 2.0.0 Ok",
    ]
    assert receiver.sinks == []


def test_bad_bdat_size_is_501(client):
    client.send(ENVELOPE)
    assert client.send(b"BDAT ten\r\nNOOP\r\n") == [
        b"501 5.5.4 Syntax: BDAT <chunk-size> [LAST]",
        b"250 2.0.0 Ok",
    ]


def test_data_after_bdat_is_503_and_bdat_goes_on(client, receiver):
    client.send(ENVELOPE)
    client.send(b"BDAT 3\r\nX: ")
    # RFC 3030 §2: DATA after BDAT in one transaction is 503.
    assert client.send(b"DATA\r\n") == [b"503 5.5.1 DATA not allowed after BDAT; send RSET"]
    assert client.send(b"BDAT 3 LAST\r\n1\r\n") == [b"250 2.0.0 Ok: queued as Q1"]
    assert stored(receiver) == b"X: 1\r\n"


def test_rset_after_a_chunk_drops_the_content(client, receiver):
    client.send(ENVELOPE)
    client.send(b"BDAT 3\r\nX: ")
    assert client.send(b"RSET\r\n") == [b"250 2.0.0 Ok"]
    assert receiver.sinks[0].discarded
    assert client.send(b"BDAT 1 LAST\r\nx") == [b"503 5.5.1 Need MAIL command"]
    assert receiver.accepted == []


def test_size_limit_refuses_at_the_command_and_discards_the_chunk(receiver, clock):
    client = Client(make_factory(receiver, clock, message_size=1000))
    client.send(ENVELOPE)
    assert client.send(b"BDAT 600\r\n" + b"a" * 600) == [b"250 2.0.0 600 octets received"]
    # 1200 > 1000: 552 (RFC 1870 §6), after the chunk was read; the transaction failed.
    assert client.send(b"BDAT 600\r\n" + b"b" * 300) == []
    assert client.send(b"b" * 300 + b"NOOP\r\n") == [
        b"552 5.3.4 Message size exceeds fixed maximum message size",
        b"250 2.0.0 Ok",
    ]
    assert receiver.sinks[0].discarded
    # Chunks already in the pipeline after the failed one are read and thrown away.
    assert client.send(b"BDAT 4 LAST\r\nQUIT") == [b"503 5.5.1 Need MAIL command"]
    assert receiver.accepted == []
    client.close()


def test_bdat_is_counted_and_a_refused_one_logged(receiver, clock):
    import io
    import re

    from twisted.logger import globalLogPublisher

    from mtrkmta.logfile import text_observer

    out = io.StringIO()
    observer = text_observer(out)
    globalLogPublisher.addObserver(observer)
    try:
        client = Client(make_factory(receiver, clock, message_size=100))
        client.send(ENVELOPE + b"BDAT 3\r\nX: BDAT 2 LAST\r\n1\n")
        client.send(b"MAIL FROM:<b@x.test>\r\nRCPT TO:<m@x.test>\r\nBDAT 101\r\n" + b"y" * 101)
        client.close()
    finally:
        globalLogPublisher.removeObserver(observer)
    lines = [re.sub(r"^\S+ \[[^]]*\] ", "", line) for line in out.getvalue().splitlines()]
    assert lines[-2:] == [
        "smtp NOQUEUE: reject: BDAT from unknown[192.0.2.7]: 552 5.3.4 Message size exceeds fixed"
        " maximum message size; from=<b@x.test> proto=ESMTP helo=<c.example>",
        "smtp disconnect from unknown[192.0.2.7] ehlo=1 mail=2 rcpt=2 bdat=2/3 commands=7/8",
    ]


def test_hostile_huge_chunk_is_refused_at_once_and_memory_stays_flat(clock):
    receiver = CountingReceiver()
    client = Client(make_factory(receiver, clock, message_size=10_000_000))
    client.send(ENVELOPE)
    assert client.send(b"BDAT 999999999999\r\n") == []
    data = b"QUIT\r\n" * 10923  # 64 KiB
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(160):  # 10 MiB, past the message size: thrown away, not kept
            assert client.send(data) == []
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current - before < 512 * 1024
    assert peak - before < 2 * 1024 * 1024
    assert not client.transport.disconnecting
    client.close()


def test_slow_chunk_is_cut_off_by_the_content_time_limit(receiver, clock):
    client = Client(make_factory(receiver, clock, data_timeout=180, data_min_rate=0))
    client.send(ENVELOPE)
    client.send(b"BDAT 100 LAST\r\nSubject: slow\r\n")
    clock.advance(179)
    assert not client.transport.disconnecting
    clock.advance(1)
    assert client.lines()[-1] == (
        b"421 4.4.2 mx.example.test Timeout: message content too slow, closing"
    )
    assert receiver.sinks[0].discarded
    client.close()


def test_the_250_after_last_waits_for_the_message_to_be_durable(client, receiver):
    receiver.pending_accepts = []
    client.send(ENVELOPE)
    assert client.send(b"BDAT 5 LAST\r\nX: 1\n") == []
    assert len(receiver.pending_accepts) == 1
    assert client.send(b"NOOP\r\n") == []  # answered in order, after the message
    client.transport.clear()
    receiver.pending_accepts[0].callback(None)
    assert client.lines() == [b"250 2.0.0 Ok: queued as Q1", b"250 2.0.0 Ok"]
    assert stored(receiver) == b"X: 1\r\n"  # the bare LF made CRLF (RFC 5321 §2.3.8)


def test_bare_line_ends_refused_when_configured(receiver, clock):
    client = Client(make_factory(receiver, clock, bare_line_ends="reject"))
    client.send(ENVELOPE)
    assert client.send(b"BDAT 5 LAST\r\nX: 1\nNOOP\r\n") == [
        "550 5.6.0 Bare CR or LF in message content (RFC 5321 §2.3.8)".encode(),
        b"250 2.0.0 Ok",
    ]
    assert receiver.accepted == [] and receiver.sinks[0].discarded
    client.close()


def test_over_long_line_in_a_chunk_is_refused_like_data(client, receiver):
    client.send(ENVELOPE)
    assert client.send(b"BDAT 1001\r\n" + b"x" * 999 + b"\r\n") == [
        b"500 5.5.2 Line too long (RFC 5321 limits lines to 998 octets)"
    ]
    assert receiver.sinks[0].discarded
    assert client.send(b"BDAT 0 LAST\r\n") == [b"503 5.5.1 Need MAIL command"]


def test_lmtp_offers_chunking_and_answers_last_once_per_recipient(receiver, clock):
    factory = LMTPServerFactory(
        ServerSettings(hostname="lda.example.test", listener="lmtp"), receiver, clock
    )
    client = Client(factory)
    assert b"250-CHUNKING" in client.send(b"LHLO c.example\r\n")
    client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<m@x.test>\r\nRCPT TO:<n@x.test>\r\n")
    assert client.send(b"BDAT 3\r\nX: ") == [b"250 2.0.0 3 octets received"]
    # RFC 2033 §4.2 with RFC 3030 §2: after BDAT LAST, one reply per accepted recipient.
    assert client.send(b"BDAT 3 LAST\r\n1\r\n") == [
        b"250 2.0.0 <m@x.test> Ok: queued as Q1",
        b"250 2.0.0 <n@x.test> Ok: queued as Q1",
    ]
    client.close()
