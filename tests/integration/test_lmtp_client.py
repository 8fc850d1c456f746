"""The LMTP client against the fake LMTP server: LHLO and one reply per accepted recipient."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from fakemta import DOT, ClientHarness, FakeMTA

from mtrkmta.lmtp.client import LMTPClient
from mtrkmta.smtp.client import ClientSettings, ClientTimeouts, OutgoingTransaction, SessionError

HOSTNAME = "relay.example.test"
FAST = ClientSettings(hostname=HOSTNAME, timeouts=ClientTimeouts().scaled(0.01))
DOVECOT = ("8BITMIME", "CHUNKING", "ENHANCEDSTATUSCODES", "PIPELINING")  # lab/README.md
MESSAGE = b"Subject: hi\r\n\r\n.\r\nbody\r\n"


@pytest_twisted.async_yield_fixture
async def net() -> AsyncIterator[ClientHarness]:
    harness = ClientHarness(FAST)
    yield harness
    await harness.close()


async def lmtp(net: ClientHarness, **options: Any) -> tuple[FakeMTA, LMTPClient]:
    fake = await net.fake(lmtp=True, **options)
    client = await net.connect(fake, client_class=LMTPClient)
    assert isinstance(client, LMTPClient)
    return fake, client


def tx(*recipients: str) -> OutgoingTransaction:
    return OutgoingTransaction("alice@client.example", recipients, MESSAGE)


@pytest_twisted.ensureDeferred
async def test_lhlo_and_one_reply_per_accepted_recipient(net):
    fake, client = await lmtp(net, extensions=DOVECOT)
    await client.when_ready()
    assert set(client.keywords) == set(DOVECOT)
    fake.final_replies["full@example.test"] = "452 4.2.2 <full@example.test> Quota exceeded"
    fake.final_replies["gone@example.test"] = "550 5.1.1 <gone@example.test> User doesn't exist"
    fake.rcpt_replies["bad@example.test"] = "550 5.1.1 <bad@example.test> no such user"
    result = await client.send(
        tx("a@example.test", "full@example.test", "bad@example.test", "gone@example.test")
    )
    assert result.error is None
    decided = result.per_recipient()
    assert [r.reply.code for r in decided] == [250, 452, 550, 550]
    assert [r.reply.enhanced for r in decided] == ["2.0.0", "4.2.2", "5.1.1", "5.1.1"]
    assert "Quota exceeded" in decided[1].reply.text
    assert "no such user" in decided[2].reply.text  # the RCPT refusal, not a final reply
    assert result.final[2] is None
    session = fake.sessions[0]
    assert session.hellos == [f"LHLO {HOSTNAME}"]
    assert fake.transactions[0].content == MESSAGE
    # CHUNKING offered: BDAT, the line "." as it is (RFC 3030 §2)
    assert fake.transactions[0].chunks == [(f"BDAT {len(MESSAGE)} LAST", MESSAGE)]
    assert client.usable


@pytest_twisted.ensureDeferred
async def test_bare_cr_goes_out_as_crlf_so_no_smuggled_end_of_data(net):
    # RFC 5321 §2.3.8 (RFC 2033 §4.2 keeps SMTP's DATA): CR only in CRLF, so that
    # "\r.\r\n" cannot end DATA early at a lenient LMTP server (CVE-2023-51764).
    fake, client = await lmtp(net)
    await client.when_ready()
    smuggled = b"hello\r.\r\nMAIL FROM:<admin@x.test>\r\nRCPT TO:<root@localhost>\r\nDATA\r\n"
    result = await client.send(
        OutgoingTransaction("alice@client.example", ("a@example.test",), smuggled)
    )
    assert [r.reply.code for r in result.per_recipient()] == [250]
    raw = fake.transactions[0].raw_data
    assert raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n")
    assert raw.startswith(b"hello\r\n..\r\nMAIL FROM:<admin@x.test>\r\n")


@pytest_twisted.ensureDeferred
async def test_duplicate_recipients_each_get_their_reply(net):
    # RFC 2033 §4.2: one reply per accepted RCPT, duplicates included.
    fake, client = await lmtp(net)
    await client.when_ready()
    result = await client.send(tx("a@example.test", "a@example.test"))
    assert [r.reply.code for r in result.per_recipient()] == [250, 250]
    assert fake.transactions[0].accepted == ["a@example.test", "a@example.test"]


@pytest_twisted.ensureDeferred
async def test_drop_after_the_dot_leaves_unanswered_recipients_unknown(net):
    # RFC 2033 §5: recipients without a reply are temporary failures.
    fake, client = await lmtp(net)
    fake.drop_at = DOT
    fake.replies_before_drop = 1
    await client.when_ready()
    result = await client.send(tx("a@example.test", "b@example.test", "c@example.test"))
    decided = result.per_recipient()
    assert decided[0].reply is not None and decided[0].reply.code == 250
    assert [(r.reply, r.unknown) for r in decided[1:]] == [(None, True), (None, True)]
    assert result.error is not None and not client.usable


@pytest_twisted.ensureDeferred
async def test_lmtp_never_falls_back_to_helo(net):
    fake, client = await lmtp(net)
    fake.replies["LHLO"] = "500 5.5.1 Unknown command"
    try:
        await client.when_ready()
    except SessionError as error:
        assert error.reply is not None and error.reply.code == 500
    else:
        raise AssertionError("LHLO refusal must fail the session")
    assert fake.sessions[0].hellos == [f"LHLO {HOSTNAME}"]
    assert not any(c.startswith(("HELO", "EHLO")) for c in fake.sessions[0].commands)


@pytest_twisted.ensureDeferred
async def test_second_transaction_after_rset(net):
    fake, client = await lmtp(net)
    await client.when_ready()
    first = await client.send(tx("a@example.test"))
    second = await client.send(tx("b@example.test", "c@example.test"))
    assert first.error is None and second.error is None
    assert [r.reply.code for r in second.per_recipient()] == [250, 250]
    assert "RSET" in fake.sessions[0].commands
