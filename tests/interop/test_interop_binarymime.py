"""BINARYMIME (RFC 3030 §3) toward a real Dovecot 2.3 LMTP, which offers CHUNKING but not
BINARYMIME: a stranger's binary message is refused at RCPT; a trusted client's is accepted,
mtrkmta sends Dovecot nothing and returns the message with 5.6.3, header only."""

from __future__ import annotations

import email
import email.message
import email.policy

import pytest_twisted
from interop_lab import (
    Client,
    Lab,
    final_record,
    in_thread,
    outcome,
    queue_id,
    running_mtrkmta,
    start_dovecot,
    wait_for,
)
from test_bdat_to_postfix_dovecot import Capture

from mtrkmta.tracking.interfaces import RecipientState

SENDER = "sender@localhost"  # the DSN lands in the node's own Maildir
HEADER = b"From: <sender@localhost>\r\nSubject: binary interop\r\nContent-Type: image/png\r\n"
BINARY = HEADER + b"\r\n\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\n" + bytes(range(256))


def lhlo(port: int) -> list[str]:
    """Dovecot's LHLO keywords; its answer to BODY=BINARYMIME is checked on the way."""
    with Client(port) as client:
        assert client.reply().code == 220
        lines = client.expect("LHLO probe.example.test", 250).lines
        refused = client.command("MAIL FROM:<a@x.test> BODY=BINARYMIME")
        assert refused.code == 555, str(refused)
        client.command("QUIT")
    return [line[4:] for line in lines[1:]]


def stranger_rcpt(port: int, recipient: str) -> str:
    """MAIL BODY=BINARYMIME and RCPT from a client neither authenticated nor trusted."""
    with Client(port) as client:
        assert client.reply().code == 220
        client.expect("EHLO c.test", 250)
        client.expect(f"MAIL FROM:<{SENDER}> BODY=BINARYMIME", 250)
        refused = str(client.command(f"RCPT TO:<{recipient}>"))
        client.command("QUIT")
        return refused


def send_binary(port: int, recipient: str) -> str:
    """MAIL BODY=BINARYMIME and one BDAT LAST to mtrkmta's SMTP listener; the final reply."""
    with Client(port) as client:
        assert client.reply().code == 220
        assert "BINARYMIME" in [line[4:] for line in client.expect("EHLO c.test", 250).lines]
        client.expect(f"MAIL FROM:<{SENDER}> BODY=BINARYMIME", 250)
        client.expect(f"RCPT TO:<{recipient}>", 250)
        client.send(b"BDAT %d LAST\r\n" % len(BINARY) + BINARY)
        done = client.reply()
        assert done.code == 250, str(done)
        client.command("QUIT")
        return str(done)


@pytest_twisted.ensureDeferred
async def test_binarymime_to_dovecot_lmtp_fails_5_6_3_with_a_headers_only_dsn(lab: Lab):
    dovecot = await start_dovecot(lab)
    offered = await in_thread(lhlo, dovecot.port)
    assert "CHUNKING" in offered and "BINARYMIME" not in offered  # Dovecot 2.3.19
    capture = Capture(dovecot.port)
    try:
        async with running_mtrkmta(
            lab, "to-dovecot.toml", DOVECOT_LMTP_PORT=capture.listen_port
        ) as node:
            # Accepted, it would bounce to a sender address a stranger chose.
            refused = await in_thread(stranger_rcpt, node.port("smtp"), "alice@example.test")
            assert refused.startswith("550 5.6.3 "), refused
        trusted = (("relay.trusted_networks", ("127.0.0.0/8",)),)
        async with running_mtrkmta(
            lab, "to-dovecot.toml", options=trusted, DOVECOT_LMTP_PORT=capture.listen_port
        ) as node:
            reply = await in_thread(send_binary, node.port("smtp"), "alice@example.test")
            record = await final_record(node, queue_id(reply))
            sender_box = lab.path("mtrkmta") / "mail" / "sender" / "new"
            (dsn_file,) = await in_thread(
                wait_for, lambda: list(sender_box.glob("*")) if sender_box.is_dir() else [], "DSN"
            )
    finally:
        await capture.listening.stopListening()

    alice = outcome(record, "alice@example.test")
    assert (alice.state, alice.status) == (RecipientState.FAILED, "5.6.3")
    # RFC 3030 §3: no conversion, so no transaction at all toward Dovecot.
    assert "MAIL" not in capture.commands() and "BDAT" not in capture.commands()
    assert dovecot.maildir("alice@example.test") == []
    raw = dsn_file.read_bytes()
    assert b"\x00" not in raw and b"\x89PNG" not in raw
    dsn = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(dsn, email.message.EmailMessage)
    _, status, returned = dsn.iter_parts()
    assert "Status: 5.6.3" in str(status)
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload(decode=True).endswith(HEADER.replace(b"\r\n", b"\n"))
