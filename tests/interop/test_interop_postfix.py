"""mtrkmta and a real Postfix 3.7 relaying to each other, over SMTP and LMTP.

Postfix advertises DSN but not MTRK (``MTRK=`` would get ``555 5.5.4 Unsupported
option``); it passes ENVID/RET/NOTIFY/ORCPT on to a DSN-capable next hop, and
adds ``ORCPT=rfc822;<rcpt>`` itself when none came. smtp-sink's dump files show
the MAIL and RCPT parameters it was given (``X-Mail-Args:``/``X-Rcpt-Args:``).
"""

from __future__ import annotations

import base64
import re

import pytest_twisted
from interop_lab import (
    Lab,
    Postfix,
    SmtpSink,
    eventually,
    final_record,
    in_thread,
    program,
    queue_id,
    run,
    running_mtrkmta,
    send_mail,
    wait_for,
)

from mtrkmta.tracking.interfaces import RecipientState

SENDER = "sender@localhost"  # a local mailbox of the mtrkmta node
CERTIFIER = bytes(range(40, 60))
MTRK = f"MTRK={base64.b64encode(CERTIFIER).decode()}:3600"


async def start(daemon):
    await in_thread(daemon.start)
    return daemon


def postfix_sent_to(postfix: Postfix, address: str) -> list[str]:
    return [line for line in postfix.sent_lines() if f"to=<{address}>" in line]


def mtrkmta_queue_id(postfix_line: str) -> str:
    """mtrkmta's queue id, from the reply Postfix logged with ``status=sent``."""
    match = re.search(r"status=sent \(250 2\.0\.0 .*Ok: queued as (\S+)\)", postfix_line)
    assert match is not None, postfix_line
    return match.group(1)


@pytest_twisted.ensureDeferred
async def test_mtrkmta_relays_through_postfix_with_dsn_parameters_but_no_mtrk(lab: Lab):
    sink = await start(SmtpSink(lab))
    postfix = await start(Postfix(lab, relay_port=sink.port))
    async with running_mtrkmta(lab, "to-postfix.toml", POSTFIX_SMTP_PORT=postfix.port) as node:
        reply = await in_thread(
            send_mail,
            node.port("smtp"),
            SENDER,
            [
                ("carol@relay.test", "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Carol+2Bold@relay.test"),
                ("dave@relay.test", ""),
            ],
            b"From: sender@localhost\r\nSubject: through postfix\r\n\r\nRelayed.\r\n",
            mail_params=f"ENVID=pf+2B1@client.example.test RET=HDRS {MTRK}",
        )
        qid = queue_id(reply)
        record = await final_record(node, qid)
        spool = node.spool
        # every recipient is final: the message leaves the spool (once any DSN is queued)
        await eventually(lambda: spool.queue_ids().addCallback(lambda ids: qid not in ids), qid)

    # mtrkmta: handed to a hop outside the tracking world, which took it.
    for recipient in record.recipients:
        assert (recipient.state, recipient.status, recipient.action) == (
            RecipientState.RELAYED,
            "2.1.9",
            "relayed",
        )
        assert not recipient.certifier_forwarded
        # Postfix offers CHUNKING: mtrkmta sent BDAT, which Postfix answers with the octet count.
        assert re.fullmatch(r"smtp; 250 2\.0\.0 Ok: \d+ bytes queued as \w+", recipient.diagnostic)
    assert record.certifier == CERTIFIER and record.envid == "pf+1@client.example.test"

    # Postfix took ENVID/RET/NOTIFY/ORCPT (no 555 for MTRK) and relayed both recipients.
    await in_thread(wait_for, lambda: len(postfix.sent_lines()) == 2, "Postfix to relay both")
    assert "Unsupported option" not in postfix.log_text()
    (dump,) = sink.dumps()
    # What Postfix passed on is what mtrkmta gave it, xtext-encoded again by Postfix.
    assert dump.mail_args == "<sender@localhost> ENVID=pf+2B1@client.example.test RET=HDRS"
    assert "MTRK" not in dump.mail_args
    assert sorted(dump.rcpt_args) == [
        "<carol@relay.test> ORCPT=rfc822;Carol+2Bold@relay.test NOTIFY=SUCCESS,FAILURE",
        "<dave@relay.test> ORCPT=rfc822;dave@relay.test",
    ]
    assert dump.header("Subject") == ["through postfix"]
    assert any("by mx.example.test" in value for value in dump.header("Received"))


@pytest_twisted.ensureDeferred
async def test_postfix_relays_into_mtrkmta_which_records_its_dsn_parameters(lab: Lab):
    async with running_mtrkmta(lab, "from-postfix.toml") as node:
        postfix = await start(Postfix(lab, relay_port=node.port("smtp")))
        await in_thread(
            send_mail,
            postfix.port,
            SENDER,
            [
                ("erin@example.test", "NOTIFY=DELAY,FAILURE ORCPT=rfc822;Erin+2Bold@example.test"),
                ("frank@example.test", "NOTIFY=NEVER"),
            ],
            b"From: sender@localhost\r\nSubject: from postfix\r\n\r\nInbound.\r\n",
            mail_params="ENVID=in+2Bpf+3D1 RET=FULL",
        )
        lines = await in_thread(
            wait_for,
            lambda: postfix_sent_to(postfix, "erin@example.test"),
            "Postfix to relay into mtrkmta",
        )
        record = await final_record(node, mtrkmta_queue_id(lines[0]))
        mailbox = node.config.data_dir / "mail"
        await eventually(lambda: list((mailbox / "frank" / "new").glob("*")), "frank's mail")

    assert record.client.address == "127.0.0.1"
    assert record.client.helo == "postfix.example.test"
    assert record.sender == SENDER
    assert record.envid == "in+pf=1"  # xtext-decoded, exactly what the client gave Postfix
    assert record.ret == "FULL"
    erin, frank = record.recipients
    assert erin.orcpt is not None and frank.orcpt is not None
    assert (erin.orcpt.addr_type, erin.orcpt.address) == ("rfc822", "Erin+old@example.test")
    assert erin.notify == frozenset({"DELAY", "FAILURE"})
    # No ORCPT from the client: Postfix added one for the address as it received it.
    assert (frank.orcpt.addr_type, frank.orcpt.address) == ("rfc822", "frank@example.test")
    assert frank.notify == frozenset({"NEVER"})
    for recipient in record.recipients:
        assert (recipient.state, recipient.status) == (RecipientState.DELIVERED, "2.1.5")
    for local in ("erin", "frank"):
        (mail,) = (mailbox / local / "new").iterdir()
        assert b"Subject: from postfix" in mail.read_bytes()


@pytest_twisted.ensureDeferred
async def test_postfix_delivers_over_lmtp_into_mtrkmta(lab: Lab):
    async with running_mtrkmta(lab, "from-postfix.toml") as node:
        lmtp_port = node.port("lmtp")
        postfix = await start(Postfix(lab, default_transport=f"lmtp:inet:127.0.0.1:{lmtp_port}"))
        swaks = await in_thread(
            run,
            [
                program("swaks"),
                "--server",
                f"127.0.0.1:{postfix.port}",
                "--from",
                SENDER,
                "--to",
                "gina@example.test,hank@example.test,ivan@elsewhere.test",
                "--header",
                "Subject: over lmtp",
                "--body",
                "Postfix's LMTP client.",
            ],
        )
        assert "queued as" in swaks.stdout
        await in_thread(
            wait_for,
            lambda: (
                postfix_sent_to(postfix, "hank@example.test")
                and postfix_sent_to(postfix, "gina@example.test")
                and "to=<ivan@elsewhere.test>" in postfix.log_text()
            ),
            "Postfix to deliver to every recipient",
        )
        mailbox = node.config.data_dir / "mail"
        for local in ("gina", "hank"):
            await eventually(lambda local=local: list((mailbox / local / "new").glob("*")), local)
        queue_ids = {
            mtrkmta_queue_id(postfix_sent_to(postfix, a)[0])
            for a in ("gina@example.test", "hank@example.test")
        }
        (qid,) = queue_ids  # one transaction, two recipients
        record = await final_record(node, qid)

    # One LMTP reply per recipient: Postfix logged each one on its own.
    for address in ("gina@example.test", "hank@example.test"):
        (line,) = postfix_sent_to(postfix, address)
        assert f"relay=127.0.0.1[127.0.0.1]:{lmtp_port}" in line, line
        assert f"status=sent (250 2.0.0 <{address}> Ok: queued as {qid})" in line, line
    (refused,) = [
        line for line in postfix.log_text().splitlines() if "to=<ivan@elsewhere.test>" in line
    ]
    assert "status=bounced" in refused and "Relay access denied" in refused, refused
    for local in ("gina", "hank"):
        (mail,) = (mailbox / local / "new").iterdir()
        assert b"Subject: over lmtp" in mail.read_bytes()
    assert record.sender == SENDER
    assert record.client.protocol == "LMTP"
    assert [(r.address, r.state, r.status) for r in record.recipients] == [
        ("gina@example.test", RecipientState.DELIVERED, "2.1.5"),
        ("hank@example.test", RecipientState.DELIVERED, "2.1.5"),
    ]
