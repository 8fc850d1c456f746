"""CHUNKING (RFC 3030) over real loopback sockets: BDAT chunks, pipelined, reach the Maildir
byte for byte and are accepted on the same durable path as DATA (spool + tracking record)."""

from __future__ import annotations

import pytest_twisted
from smtpwire import (
    Wire,
    WireReply,
    in_thread,
    queue_emptied,
    queue_id_of,
    queued_everywhere,
    running_node,
)

from mtrkmta.testing import node_config, start_node, stop_node

# Octets that would end DATA or look like commands: in a chunk they are only content.
CHUNK1 = b"From: <s@client.example>\r\nSubject: chunked\r\n\r\nQUIT\r\n"
CHUNK2 = b"\r\n.\r\n..two dots\r\nRSET\r\n\x80\xffeight bit\r\n"


def send_chunks(port: int, recipient: str) -> list[WireReply]:
    with Wire(port) as wire:
        assert wire.ehlo().code == 250
        replies = wire.pipeline("MAIL FROM:<s@client.example>", f"RCPT TO:<{recipient}>")
        assert [r.code for r in replies] == [250, 250]
        # RFC 3030 §4.2: both chunks in one write; one reply each.
        wire.send(
            b"BDAT %d\r\n" % len(CHUNK1) + CHUNK1 + b"BDAT %d LAST\r\n" % len(CHUNK2) + CHUNK2
        )
        answers = wire.replies(2)
        assert wire.command("QUIT").code == 221
    return answers


@pytest_twisted.ensureDeferred
async def test_bdat_message_is_accepted_durably(tmp_path):
    async with running_node(tmp_path) as node:
        answers = await in_thread(send_chunks, node.port("smtp"), "alice@localhost")
        assert answers[0].line == f"250 2.0.0 {len(CHUNK1)} octets received"
        queue_id = queue_id_of(answers[1])
        # The 250 came after the spool file and the tracking record (RFC 3885 §3.1).
        stored = await queued_everywhere(node, queue_id)
        assert [r.address for r in stored.recipients] == ["alice@localhost"]


@pytest_twisted.ensureDeferred
async def test_bdat_message_lands_in_the_maildir_byte_for_byte(tmp_path):
    node = await start_node(node_config(tmp_path / "data", listeners=("smtp",)))
    try:
        answers = await in_thread(send_chunks, node.port("smtp"), "alice@localhost")
        assert answers[1].line.startswith("250 2.0.0 Ok: queued as ")
        await queue_emptied(node)
    finally:
        await stop_node(node)
    (path,) = (tmp_path / "data" / "mail" / "alice" / "new").iterdir()
    delivered = path.read_bytes()
    # The Maildir stores LF line ends (mtrkmta.delivery.maildir); every other octet is as sent.
    assert delivered.endswith((CHUNK1 + CHUNK2).replace(b"\r\n", b"\n"))


@pytest_twisted.ensureDeferred
async def test_lmtp_answers_bdat_last_once_per_recipient(tmp_path):
    async with running_node(tmp_path) as node:

        def talk() -> list[str]:
            with Wire(node.port("lmtp")) as wire:
                assert wire.ehlo(verb="LHLO").code == 250
                wire.pipeline(
                    "MAIL FROM:<s@client.example>",
                    "RCPT TO:<alice@localhost>",
                    "RCPT TO:<bob@localhost>",
                )
                wire.send(b"BDAT %d LAST\r\n" % len(CHUNK1) + CHUNK1)
                return [r.line for r in wire.replies(2)]

        lines = await in_thread(talk)
    assert lines[0].startswith("250 2.0.0 <alice@localhost> Ok: queued as ")
    assert lines[1].startswith("250 2.0.0 <bob@localhost> Ok: queued as ")
