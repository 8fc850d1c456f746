"""BINARYMIME (RFC 3030 §3) through whole nodes on loopback: a binary message sent with BDAT
reaches a Maildir byte for byte, crosses a second node that offers BINARYMIME, and comes back
as a 5.6.3 DSN with its header only from a hop that does not; from a client neither
authenticated nor trusted it is refused at RCPT unless it stays in a local Maildir."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest
import pytest_twisted
from fakemta import ALL_EXTENSIONS
from smtpwire import Wire, in_thread, queue_emptied, queue_id_of, until
from test_relay_end_to_end import RCPT, SENDER, relaying

from mtrkmta.testing import node_config, start_node, stop_node
from mtrkmta.tracking.interfaces import RecipientState

HEADER = (
    b"From: <sender@localhost>\r\nSubject: binary\r\nContent-Type: application/octet-stream\r\n"
)
# NUL, bare CR, bare LF, 8-bit octets, a dot line, a line over 998 octets, no final CRLF.
BODY = b"\x00\r\x00\n\xff\r\r\n\n.\r\n" + bytes(range(256)) * 8 + b"\rend\r"
BINARY = HEADER + b"\r\n" + BODY
B_DOMAIN = "b.example"
# The sending client is trusted (as an organisation's own hosts are): a binary message that
# may fail at a next hop is accepted only from such a client or one that authenticated.
TRUSTED = ("relay.trusted_networks", ("127.0.0.0/8",))


def refused_binary(port: int, recipient: str) -> str:
    """Blocking: MAIL BODY=BINARYMIME, then the RCPT reply's line."""
    with Wire(port) as wire:
        assert "BINARYMIME" in wire.ehlo().keywords
        assert wire.command(f"MAIL FROM:<{SENDER}> BODY=BINARYMIME").code == 250
        line = wire.command(f"RCPT TO:<{recipient}>").line
        assert wire.command("QUIT").code == 221
    return line


def send_binary(port: int, recipient: str) -> str:
    """Blocking: MAIL BODY=BINARYMIME, DATA refused (RFC 3030 §3), then BDAT; the queue id."""
    with Wire(port) as wire:
        assert "BINARYMIME" in wire.ehlo().keywords
        replies = wire.pipeline(f"MAIL FROM:<{SENDER}> BODY=BINARYMIME", f"RCPT TO:<{recipient}>")
        assert [r.code for r in replies] == [250, 250]
        assert wire.command("DATA").line == "503 5.5.1 BODY=BINARYMIME requires BDAT, not DATA"
        half = len(BINARY) // 2
        wire.send(b"BDAT %d\r\n" % half + BINARY[:half])
        wire.send(b"BDAT %d LAST\r\n" % (len(BINARY) - half) + BINARY[half:])
        first, last = wire.replies(2)
        assert first.code == 250, str(first)
        assert wire.command("QUIT").code == 221
    return queue_id_of(last)


def delivered(data_dir: Path, mailbox: str) -> bytes:
    (path,) = (data_dir / "mail" / mailbox / "new").iterdir()
    return path.read_bytes()


@pytest_twisted.ensureDeferred
async def test_binary_message_lands_in_the_maildir_byte_for_byte(tmp_path):
    node = await start_node(node_config(tmp_path / "data", listeners=("smtp",)))
    try:
        queue_id = await in_thread(send_binary, node.port("smtp"), "alice@localhost")
        await queue_emptied(node)
        assert node.tracking is not None
        stored = await node.tracking.message(queue_id)
        assert stored is not None and stored.body == "BINARYMIME"
    finally:
        await stop_node(node)
    copy = delivered(tmp_path / "data", "alice")
    # CRLF kept: the Maildir's LF convention would change the binary body.
    assert copy.startswith(
        b"Return-Path: <sender@localhost>\r\nDelivered-To: <alice@localhost>\r\nReceived: "
    )
    assert copy.endswith(b"\r\n" + BINARY)


@pytest.mark.parametrize(
    ("transport", "state"),
    [("smtp", RecipientState.RELAYED), ("lmtp", RecipientState.DELIVERED)],
)
@pytest_twisted.ensureDeferred
async def test_binary_message_relayed_to_a_second_node_offering_binarymime(
    tmp_path, transport, state
):
    # The second node's SMTP or LMTP listener offers BINARYMIME and CHUNKING: the first
    # sends BODY=BINARYMIME with BDAT, octets unchanged (RFC 3030 §3).
    final = await start_node(
        node_config(
            tmp_path / "b",
            hostname="b.example.test",
            listeners=(transport,),
            options=(("domains.local", (B_DOMAIN,)),),
        )
    )
    try:
        port = final.port(transport)
        route = f"{B_DOMAIN}={transport}:tcp:host=127.0.0.1:port={port};tls=none"
        first = await start_node(
            node_config(tmp_path / "a", listeners=("smtp",), options=(("routes", route), TRUSTED))
        )
        try:
            queue_id = await in_thread(send_binary, first.port("smtp"), f"alice@{B_DOMAIN}")
            await queue_emptied(first)
            assert first.tracking is not None
            stored = await first.tracking.message(queue_id)
            assert stored is not None
            assert [r.state for r in stored.recipients] == [state]
            await until(lambda: (tmp_path / "b" / "mail" / "alice" / "new").is_dir(), "delivery")
            await queue_emptied(final)
        finally:
            await stop_node(first)
    finally:
        await stop_node(final)
    copy = delivered(tmp_path / "b", "alice")
    # The second node stored it as binary (CRLF kept): BODY=BINARYMIME reached it.
    assert copy.startswith(
        b"Return-Path: <sender@localhost>\r\nDelivered-To: <alice@b.example>\r\n"
    )
    # Two Received: fields (one per node) above the octets as sent.
    assert copy.count(b"\r\nReceived: ") == 2 and copy.endswith(b"\r\n" + BINARY)


@pytest_twisted.ensureDeferred
async def test_binary_message_to_a_hop_without_binarymime_fails_5_6_3_with_headers(tmp_path):
    chunking_only = (*ALL_EXTENSIONS, "CHUNKING")  # CHUNKING, but no BINARYMIME
    async with relaying(tmp_path, extensions=chunking_only, options=(TRUSTED,)) as rig:
        assert rig.node is not None
        await in_thread(send_binary, rig.node.port("smtp"), RCPT)
        await queue_emptied(rig.node)
        assert rig.fake.transactions == []  # nothing was sent: no conversion (RFC 3030 §3)
    raw = delivered(tmp_path / "data", "sender")
    assert b"\x00" not in raw and b"\xff" not in raw
    dsn = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(dsn, email.message.EmailMessage)
    assert dsn.get_content_type() == "multipart/report"
    text, status, returned = dsn.iter_parts()
    assert "Status: 5.6.3" in str(status)
    assert "Action: failed" in str(status)
    # RFC 3461 §6.2, RFC 6522 §3: the header only; the binary body cannot travel in a DSN.
    assert returned.get_content_type() == "text/rfc822-headers"
    # The DSN is a text message: its Maildir copy has LF line ends.
    assert returned.get_payload(decode=True).endswith(HEADER.replace(b"\r\n", b"\n"))
    assert "BODY=BINARYMIME" in text.get_content()


@pytest_twisted.ensureDeferred
async def test_a_strangers_binary_message_is_refused_at_rcpt_unless_it_stays_local(tmp_path):
    # A next hop may lack BINARYMIME (Dovecot's LMTP and Postfix do): accepted from a
    # stranger, the message would then bounce to a sender address the stranger chose.
    async with relaying(tmp_path) as rig:
        assert rig.node is not None
        line = await in_thread(refused_binary, rig.node.port("smtp"), RCPT)
        assert line.startswith("550 5.6.3 ") and "8BITMIME" in line
        await in_thread(send_binary, rig.node.port("smtp"), "alice@localhost")  # a Maildir
        await queue_emptied(rig.node)
    assert delivered(tmp_path / "data", "alice").endswith(b"\r\n" + BINARY)
