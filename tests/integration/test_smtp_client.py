"""The SMTP client core against the fake MTA: handshake, pipelining, stuffing, failures, TLS."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_twisted
from fakemta import ALL_EXTENSIONS, DOT, GREETING, ClientHarness
from twisted.internet import ssl

from mtrkmta.smtp.client import (
    ClientSettings,
    ClientTimeouts,
    OutgoingTransaction,
    SessionError,
    SMTPClient,
)
from mtrkmta.smtp.outbound import dot_stuff

HOSTNAME = "relay.example.test"
FAST = ClientSettings(hostname=HOSTNAME, timeouts=ClientTimeouts().scaled(0.01))
MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


@pytest_twisted.async_yield_fixture
async def net() -> AsyncIterator[ClientHarness]:
    harness = ClientHarness(FAST)
    yield harness
    await harness.close()


def tx(
    *recipients: str, content: bytes = MESSAGE, mail_parameters: tuple[str, ...] = ()
) -> OutgoingTransaction:
    recipients = recipients or ("bob@example.test",)
    return OutgoingTransaction("alice@client.example", recipients, content, mail_parameters)


async def ready_failure(client: SMTPClient) -> SessionError:
    try:
        await client.when_ready()
    except SessionError as error:
        return error
    raise AssertionError("session became ready")


# -- handshake ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ehlo_keywords_are_remembered_and_a_message_goes_through(net):
    fake = await net.fake()
    client = await net.ready(fake)
    assert client.esmtp and set(client.keywords) >= {"PIPELINING", "DSN", "MTRK", "SIZE"}
    assert client.keywords["SIZE"] == "10240000"
    result = await client.send(tx(mail_parameters=("SIZE=24",)))
    assert result.error is None and result.dot_sent
    assert [r.reply.code for r in result.per_recipient()] == [250]
    await client.close()
    session = fake.sessions[0]
    assert session.hellos == [f"EHLO {HOSTNAME}"]
    (transaction,) = fake.transactions
    assert transaction.mail == "MAIL FROM:<alice@client.example> SIZE=24"
    assert transaction.content == MESSAGE
    assert session.commands[-1] == "QUIT" and session.closed


@pytest_twisted.ensureDeferred
async def test_send_before_the_handshake_finished_waits_for_it(net):
    fake = await net.fake()
    client = await net.connect(fake)
    result = await client.send(tx())
    assert result.error is None and client.usable
    assert [c.split(" ")[0] for c in fake.sessions[0].commands] == ["EHLO", "MAIL", "RCPT", "DATA"]


@pytest_twisted.ensureDeferred
async def test_send_on_a_refused_session_reports_the_refusal(net):
    fake = await net.fake()
    fake.greeting = "421 4.3.2 busy"
    client = await net.connect(fake)
    result = await client.send(tx())
    assert result.error is not None and result.error.status == "4.3.2"
    assert result.per_recipient()[0].reply is None


@pytest_twisted.ensureDeferred
async def test_ehlo_refused_falls_back_to_helo_and_lockstep(net):
    fake = await net.fake()
    fake.replies["EHLO"] = "502 5.5.2 Error: command not recognized"
    client = await net.ready(fake)
    assert not client.esmtp and client.keywords == {}
    result = await client.send(tx("b@example.test", "c@example.test"))
    assert [r.reply.code for r in result.per_recipient()] == [250, 250]
    session = fake.sessions[0]
    assert session.hellos == [f"EHLO {HOSTNAME}", f"HELO {HOSTNAME}"]
    assert not any(b"MAIL" in read and b"RCPT" in read for read in session.reads)


@pytest_twisted.ensureDeferred
async def test_helo_refused_too_fails_the_session(net):
    fake = await net.fake()
    fake.replies["EHLO"] = "502 5.5.2 no"
    fake.replies["HELO"] = "550 5.7.1 go away"
    error = await ready_failure(await net.connect(fake))
    assert error.reply is not None and error.reply.code == 550 and error.status == "4.7.1"


@pytest_twisted.ensureDeferred
async def test_greeting_4xx_fails_ready_and_close_says_quit(net):
    fake = await net.fake()
    fake.greeting = "421 4.3.2 busy"
    client = await net.connect(fake)
    error = await ready_failure(client)
    assert error.reply is not None and error.reply.code == 421 and error.status == "4.3.2"
    assert not client.usable
    await client.close()
    assert fake.sessions[0].commands == ["QUIT"]


@pytest_twisted.ensureDeferred
async def test_greeting_without_enhanced_code_defers_with_4_0_0(net):
    fake = await net.fake()
    fake.greeting = "554 no SMTP service here"
    error = await ready_failure(await net.connect(fake))
    assert error.status == "4.0.0" and error.reply is not None and error.reply.code == 554


@pytest_twisted.ensureDeferred
async def test_greeting_timeout(net):
    fake = await net.fake()
    fake.hang_at = GREETING
    settings = ClientSettings(HOSTNAME, ClientTimeouts(greeting=0.2))
    error = await ready_failure(await net.connect(fake, settings=settings))
    assert "timed out" in error.message and "greeting" in error.message
    assert error.status == "4.4.2"
    await fake.wait_all_closed()


@pytest_twisted.ensureDeferred
async def test_malformed_reply_breaks_the_session(net):
    fake = await net.fake()
    fake.replies["MAIL"] = "hello there"
    client = await net.ready(fake)
    result = await client.send(tx())
    assert result.error is not None and result.error.status == "4.5.0"
    assert result.per_recipient()[0].reply is None
    await client.when_lost()


@pytest_twisted.ensureDeferred
async def test_over_long_reply_line_breaks_the_session(net):
    fake = await net.fake()
    fake.replies["MAIL"] = "250 " + "x" * 5000
    client = await net.ready(fake)
    result = await client.send(tx())
    assert result.error is not None and "over-long" in result.error.message


@pytest_twisted.ensureDeferred
async def test_quit_dropped_by_the_server_still_closes(net):
    fake = await net.fake()
    fake.drop_at = "QUIT"
    client = await net.ready(fake)
    await client.close()
    assert not client.usable and fake.sessions[0].commands[-1] == "QUIT"


# -- pipelining ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pipelining_sends_mail_rcpts_and_data_in_one_write(net):
    fake = await net.fake()
    client = await net.ready(fake)
    result = await client.send(tx("b@example.test", "c@example.test"))
    assert result.error is None
    batch = b"MAIL FROM:<alice@client.example>\r\nRCPT TO:<b@example.test>\r\n"
    batch += b"RCPT TO:<c@example.test>\r\nDATA\r\n"
    assert batch in fake.sessions[0].reads


@pytest_twisted.ensureDeferred
async def test_without_pipelining_commands_go_one_at_a_time(net):
    fake = await net.fake(extensions=("8BITMIME", "DSN"))
    client = await net.ready(fake)
    await client.send(tx("b@example.test", "c@example.test"))
    reads = fake.sessions[0].reads
    for command in (b"MAIL FROM:<alice@client.example>\r\n", b"RCPT TO:<b@example.test>\r\n"):
        assert command in reads
    assert b"DATA\r\n" in reads


@pytest_twisted.ensureDeferred
async def test_pipelined_mail_refusal_decides_for_every_recipient(net):
    fake = await net.fake()
    fake.replies["MAIL"] = "550 5.7.1 sender rejected"
    client = await net.ready(fake)
    result = await client.send(tx("b@example.test", "c@example.test"))
    decided = result.per_recipient()
    assert [r.reply.code for r in decided] == [550, 550]
    assert decided[0].reply.enhanced == "5.7.1"
    assert not result.dot_sent and result.error is None
    assert client.usable


@pytest_twisted.ensureDeferred
async def test_lockstep_mail_refusal_sends_no_rcpt(net):
    fake = await net.fake(extensions=("DSN",))
    fake.replies["MAIL"] = "451 4.3.0 try later"
    client = await net.ready(fake)
    result = await client.send(tx("b@example.test"))
    assert result.per_recipient()[0].reply.code == 451
    assert not any(c.startswith("RCPT") for c in fake.sessions[0].commands)


@pytest_twisted.ensureDeferred
async def test_per_recipient_rcpt_replies_and_data_refusal(net):
    for extensions in (ALL_EXTENSIONS, ("DSN",)):
        fake = await net.fake(extensions=extensions)
        fake.rcpt_replies["bad@example.test"] = "550 5.1.1 no such user"
        fake.rcpt_replies["later@example.test"] = "452 4.2.2 mailbox full"
        fake.replies["DATA"] = "554 5.6.0 content refused"
        client = await net.ready(fake)
        result = await client.send(tx("bad@example.test", "ok@example.test", "later@example.test"))
        codes = [r.reply.code for r in result.per_recipient()]
        assert codes == [550, 554, 452], extensions


@pytest_twisted.ensureDeferred
async def test_nothing_accepted_with_pipelining_never_sends_content(net):
    fake = await net.fake()
    fake.replies["RCPT"] = "550 5.1.1 no"
    client = await net.ready(fake)
    result = await client.send(tx("b@example.test", content=b"secret\r\n"))
    assert result.per_recipient()[0].reply.code == 550
    assert not any(b"secret" in read for read in fake.sessions[0].reads)
    assert client.usable  # DATA got 554 from the fake: still in step


@pytest_twisted.ensureDeferred
async def test_lockstep_sends_no_data_when_every_rcpt_is_refused(net):
    fake = await net.fake(extensions=("DSN",))
    fake.replies["RCPT"] = "550 5.1.1 no"
    client = await net.ready(fake)
    result = await client.send(tx("b@example.test", "c@example.test"))
    assert [r.reply.code for r in result.per_recipient()] == [550, 550]
    assert "DATA" not in fake.sessions[0].commands and result.data is None


@pytest_twisted.ensureDeferred
async def test_pipelined_data_accepted_without_recipients_gets_only_a_dot(net):
    # RFC 2920 §3.1: a server that says 354 although no RCPT succeeded gets a lone dot.
    fake = await net.fake()
    fake.replies["RCPT"] = "550 5.1.1 no"
    fake.replies["DATA"] = "354 go ahead anyway"
    client = await net.ready(fake)
    result = await client.send(tx(content=b"secret\r\n"))
    assert result.per_recipient()[0].reply.code == 550 and not result.dot_sent
    assert fake.transactions[0].raw_data == b".\r\n"
    assert client.usable and (await client.send(tx())).error is None


@pytest_twisted.ensureDeferred
async def test_data_answered_with_2xx_is_a_protocol_error(net):
    fake = await net.fake()
    fake.replies["DATA"] = "250 2.0.0 sure"
    client = await net.ready(fake)
    result = await client.send(tx())
    assert result.error is not None and result.error.status == "4.5.0"
    assert result.per_recipient()[0].reply is None and not result.dot_sent


# -- the content ---------------------------------------------------------------------------


async def send_content(net: ClientHarness, content: bytes) -> bytes:
    fake = await net.fake()
    client = await net.ready(fake)
    result = await client.send(tx(content=content))
    assert result.error is None
    (transaction,) = fake.transactions
    return transaction.raw_data


@pytest_twisted.ensureDeferred
async def test_dot_stuffing_of_a_first_line_dot(net):
    raw = await send_content(net, b".\r\nsecond\r\n")
    assert raw == b"..\r\nsecond\r\n.\r\n"


@pytest_twisted.ensureDeferred
async def test_dot_stuffing_of_a_body_of_only_dots(net):
    raw = await send_content(net, b".\r\n..\r\n...")
    assert raw == b"..\r\n...\r\n....\r\n.\r\n"


@pytest_twisted.ensureDeferred
async def test_dot_stuffing_at_16k_write_boundaries(net):
    # Dot lines at the 16 KiB boundaries the client writes at: the boundary falls in
    # ".\r|\n", ".|\r\n", "\r\n|.", "\r|\n." and "|\r\n." (shift -2 .. +2).
    chunk = 16 * 1024
    content = bytearray()
    for n in range(10):
        shift = (n % 5) - 2  # where the dot lands relative to the boundary
        filler = chunk * (n + 1) - len(content) - 2 + shift
        content += b"x" * filler + b"\r\n"
        content += b".\r\n" if n % 2 else b".dot\r\n"
    content += b"no final newline."
    fake = await net.fake()
    client = await net.ready(fake)
    result = await client.send(tx(content=bytes(content)))
    assert result.error is None
    (transaction,) = fake.transactions
    assert transaction.raw_data == dot_stuff(bytes(content))
    assert transaction.content == bytes(content) + b"\r\n"


SMUGGLED = b"hello\r.\r\nMAIL FROM:<admin@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"


@pytest_twisted.ensureDeferred
async def test_bare_cr_goes_out_as_crlf_so_no_smuggled_end_of_data(net):
    # RFC 5321 §2.3.8: CR only in CRLF. "\r.\r\n" would end DATA at a receiver that
    # takes a bare CR for a line end (SMTP smuggling, CVE-2023-51764); the bare CR at
    # the end of the first 16 KiB write meets its "." in the next one.
    content = b"x" * (16 * 1024 - 1) + b"\r.\rnext\n" + SMUGGLED
    raw = await send_content(net, content)
    assert raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n")
    assert raw.find(b"\r\n.\r\n") == len(raw) - 5  # only the real end of data
    assert raw.endswith(b"\r\n..\r\nnext\r\nhello\r\n..\r\n" + SMUGGLED[9:] + b".\r\n")


@pytest_twisted.ensureDeferred
async def test_content_without_final_newline_and_empty_content(net):
    assert await send_content(net, b"abc") == b"abc\r\n.\r\n"
    assert await send_content(net, b"") == b".\r\n"


# -- failures ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connection_lost_after_the_final_dot_is_unknown(net):
    fake = await net.fake()
    fake.drop_at = DOT
    client = await net.ready(fake)
    result = await client.send(tx("b@example.test", "c@example.test"))
    assert result.dot_sent and result.error is not None
    assert [(r.reply, r.unknown) for r in result.per_recipient()] == [(None, True), (None, True)]
    assert fake.transactions[0].content == MESSAGE
    assert not client.usable


@pytest_twisted.ensureDeferred
async def test_connection_lost_at_rcpt_is_not_unknown(net):
    fake = await net.fake(extensions=("DSN",))
    fake.drop_at = "RCPT"
    client = await net.ready(fake)
    result = await client.send(tx("b@example.test"))
    assert not result.dot_sent and result.error is not None
    assert result.error.status == "4.4.2"
    assert [(r.reply, r.unknown) for r in result.per_recipient()] == [(None, False)]


@pytest_twisted.ensureDeferred
async def test_reply_timeout_drops_the_connection(net):
    fake = await net.fake()
    fake.hang_at = "MAIL"
    settings = ClientSettings(HOSTNAME, ClientTimeouts(mail=0.2))
    client = await net.ready(fake, settings=settings)
    result = await client.send(tx())
    assert result.error is not None and "timed out waiting for the reply to MAIL" in str(
        result.error
    )
    assert result.per_recipient()[0].reply is None
    await client.when_lost()
    await fake.wait_all_closed()
    assert fake.sessions[0].closed


@pytest_twisted.ensureDeferred
async def test_data_block_timeout_when_the_server_stops_reading(net):
    fake = await net.fake()
    fake.stall_at = "DATA"
    settings = ClientSettings(HOSTNAME, ClientTimeouts(data_block=0.3), data_chunk=64 * 1024)
    client = await net.ready(fake, settings=settings)
    big = (b"z" * 1022 + b"\r\n") * (32 * 1024)  # 32 MiB: more than the socket buffers
    result = await client.send(tx(content=big))
    assert result.error is not None and "take the message" in result.error.message
    assert not result.dot_sent
    assert [(r.reply, r.unknown) for r in result.per_recipient()] == [(None, False)]


@pytest_twisted.ensureDeferred
async def test_final_reply_timeout_is_unknown(net):
    fake = await net.fake()
    fake.hang_at = DOT
    settings = ClientSettings(HOSTNAME, ClientTimeouts(data_end=0.2))
    client = await net.ready(fake, settings=settings)
    result = await client.send(tx())
    assert result.per_recipient()[0].unknown
    assert "end of data" in str(result.error)


@pytest_twisted.ensureDeferred
async def test_unsolicited_reply_breaks_the_session(net):
    fake = await net.fake()
    client = await net.ready(fake)
    lost = client.when_lost()
    fake.say("421 4.4.2 idle timeout")  # the server speaks out of turn
    await lost
    assert not client.usable
    result = await client.send(tx())
    assert result.error is not None and result.mail is None


# -- several transactions ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_transactions_on_one_connection_with_rset_between(net):
    fake = await net.fake()
    client = await net.ready(fake)
    first = await client.send(tx("b@example.test", content=b"one\r\n"))
    second = await client.send(tx("c@example.test", content=b"two\r\n"))
    assert first.error is None and second.error is None
    assert len(fake.sessions) == 1
    assert [t.content for t in fake.transactions] == [b"one\r\n", b"two\r\n"]
    commands = [c.split(" ")[0] for c in fake.sessions[0].commands]
    assert commands == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"]


@pytest_twisted.ensureDeferred
async def test_rset_refused_breaks_the_session(net):
    fake = await net.fake()
    fake.replies["RSET"] = "500 5.5.1 what"
    client = await net.ready(fake)
    await client.send(tx())
    result = await client.send(tx())
    assert result.error is not None and result.mail is None
    assert not client.usable


# -- STARTTLS ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_starttls_may_encrypts_when_offered_and_ehlos_again(net):
    fake = await net.fake(tls=True)
    client = await net.ready(fake, tls="may")
    assert client.tls_active and "STARTTLS" not in client.keywords and "MTRK" in client.keywords
    result = await client.send(tx(content=b".\r\nover TLS\r\n"))
    assert result.error is None
    session = fake.sessions[0]
    assert session.tls and session.hellos == [f"EHLO {HOSTNAME}"] * 2
    assert fake.transactions[0].content == b".\r\nover TLS\r\n"


@pytest_twisted.ensureDeferred
async def test_replies_sent_in_clear_after_starttls_220_are_discarded(net):
    # STARTTLS response injection: a reply pipelined after 220 must not count under TLS.
    fake = await net.fake(tls=True)
    fake.replies["STARTTLS"] = "220 2.0.0 go ahead\n250-injected\n250 PIPELINING"
    client = await net.ready(fake, tls="may")
    assert client.tls_active and "MTRK" in client.keywords and "INJECTED" not in client.keywords
    assert (await client.send(tx())).error is None


@pytest_twisted.ensureDeferred
async def test_starttls_may_stays_plain_when_not_offered(net):
    fake = await net.fake()
    client = await net.ready(fake, tls="may")
    assert not client.tls_active and client.usable


@pytest_twisted.ensureDeferred
async def test_starttls_may_stays_plain_when_refused(net):
    fake = await net.fake(tls=True)
    fake.replies["STARTTLS"] = "454 4.7.0 TLS not available"
    client = await net.ready(fake, tls="may")
    assert not client.tls_active and client.usable
    assert (await client.send(tx())).error is None


@pytest_twisted.ensureDeferred
async def test_starttls_none_never_starts_tls(net):
    fake = await net.fake(tls=True)
    client = await net.ready(fake, tls="none")
    assert not client.tls_active and "STARTTLS" in client.keywords
    assert "STARTTLS" not in fake.sessions[0].commands


@pytest_twisted.ensureDeferred
async def test_starttls_encrypt_fails_when_not_offered(net):
    fake = await net.fake()
    client = await net.connect(fake, tls="encrypt")
    error = await ready_failure(client)
    assert error.status == "4.7.4" and "not offered" in error.message
    await client.close()
    assert fake.sessions[0].commands[-1] == "QUIT"
    assert not fake.transactions


@pytest_twisted.ensureDeferred
async def test_starttls_encrypt_fails_when_refused(net):
    fake = await net.fake(tls=True)
    fake.replies["STARTTLS"] = "454 4.7.0 TLS not available"
    error = await ready_failure(await net.connect(fake, tls="encrypt"))
    assert error.status == "4.7.4" and error.reply is not None and error.reply.code == 454


@pytest_twisted.ensureDeferred
async def test_starttls_handshake_failure_is_a_connection_failure(net):
    # A verifying context rejects the fake's self-signed certificate.
    fake = await net.fake(tls=True)
    settings = ClientSettings(
        HOSTNAME,
        FAST.timeouts,
        tls_context=lambda name: ssl.optionsForClientTLS(name, trustRoot=ssl.platformTrust()),
    )
    client = await net.connect(fake, tls="may", settings=settings)
    error = await ready_failure(client)
    assert error.status == "4.7.5" and "TLS handshake" in error.message
    await client.when_lost()


@pytest_twisted.ensureDeferred
async def test_starttls_encrypt_with_tls(net):
    fake = await net.fake(tls=True)
    client = await net.ready(fake, tls="encrypt")
    assert client.tls_active
    big = (b"y" * 1000 + b"\r\n") * 200
    result = await client.send(tx(content=big))
    assert result.error is None
    assert fake.transactions[0].content == big
