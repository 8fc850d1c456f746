"""The ESMTP server core driven through StringTransport: bytes in, bytes out."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mtrkmta.smtp.command import AddressLimits
from mtrkmta.smtp.reply import Reply
from mtrkmta.smtp.server import HELD_REPLIES, IReceiver, ServerSettings, SMTPServerFactory


class MemorySink:
    """The content sink of one message: what the server core wrote, kept in a list."""

    def __init__(self, queue_id):
        self.queue_id = queue_id
        self.chunks: list[bytes] = []
        self.discarded = False
        self.wait: Deferred | None = None  # handed back by write: the spool is behind

    @property
    def content(self) -> bytes:
        return b"".join(self.chunks)

    def write(self, data):
        self.chunks.append(data)
        return self.wait

    def discard(self):
        self.discarded = True


@implementer(IReceiver)
class RecordingReceiver:
    """A receiver double that records what the server core hands it."""

    def __init__(self):
        self.accepted = []
        self.sinks: list[MemorySink] = []
        self.sender_checks: list[Deferred] | None = None
        self.refuse_rcpt: dict[str, Reply] = {}
        self.fail_accept = False
        self.pending_accepts: list[Deferred] | None = None

    def check_sender(self, session, sender, params):
        if self.sender_checks is not None:
            d = Deferred()
            self.sender_checks.append(d)
            return d
        return None

    def check_recipient(self, session, address, params, mail):
        return self.refuse_rcpt.get(address)

    def new_queue_id(self):
        return f"Q{len(self.sinks) + 1}"

    def incoming(self, queue_id):
        sink = MemorySink(queue_id)
        self.sinks.append(sink)
        return sink

    def accept(self, envelope, sink):
        assert sink.queue_id == envelope.queue_id and not sink.discarded
        if self.fail_accept:
            from twisted.internet.defer import fail

            return fail(OSError("disk on fire"))
        self.accepted.append((envelope, sink.content))
        if self.pending_accepts is not None:
            d = Deferred()
            self.pending_accepts.append(d)
            return d
        return succeed(None)


class Client:
    def __init__(self, factory, peer=("192.0.2.7", 40000)):
        from twisted.internet.address import IPv4Address

        self.proto = factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", *peer))
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> list[bytes]:
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.lines()

    def lines(self) -> list[bytes]:
        return self.transport.value().split(b"\r\n")[:-1]

    def close(self):
        self.proto.connectionLost(None)


def make_factory(receiver, clock, **settings):
    return SMTPServerFactory(
        ServerSettings(hostname="mx.example.test", **settings), receiver, clock
    )


def test_greeting_names_the_host(client):
    assert client.lines() == [b"220 mx.example.test ESMTP mtrkmta"]


def test_ehlo_keywords(client):
    # RFC 3885 §2, doc/conformance.rst 3885-P4: MTRK with DSN, ENHANCEDSTATUSCODES, PIPELINING
    # advertised.
    lines = client.send(b"EHLO client.example\r\n")
    assert lines == [
        b"250-mx.example.test",
        b"250-PIPELINING",
        b"250-SIZE 36700160",
        b"250-8BITMIME",
        b"250-CHUNKING",
        b"250-BINARYMIME",
        b"250-ENHANCEDSTATUSCODES",
        b"250-DSN",
        b"250-MTRK",
        b"250-SMTPUTF8",
        b"250 DELIVERBY",  # RFC 2852 §2: no min-by-time by default
    ]


def test_helo_session_refuses_esmtp_parameters(client):
    client.send(b"HELO client.example\r\n")
    assert client.send(b"MAIL FROM:<a@b.example> SIZE=10\r\n")[0].startswith(b"555 5.5.4")


def test_full_transaction_is_handed_to_receiver(client, receiver):
    mtrk = "VheLhqV/rCKJmplkGFwsyW59pYk=:3600"
    replies = client.send(
        b"EHLO c.example\r\n"
        + f"MAIL FROM:<s@c.example> MTRK={mtrk} ENVID=abc@c.example RET=HDRS\r\n".encode()
        + b"RCPT TO:<u@mx.example.test> NOTIFY=SUCCESS ORCPT=rfc822;u+40x@mx.example.test\r\n"
        + b"DATA\r\n"
    )
    assert replies[-3:] == [
        b"250 2.1.0 Ok",
        b"250 2.1.5 Ok",
        b"354 End data with <CR><LF>.<CR><LF>",
    ]
    replies = client.send(b"Subject: hi\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
    assert replies == [b"250 2.0.0 Ok: queued as Q1", b"221 2.0.0 mx.example.test Bye"]
    envelope, content = receiver.accepted[0]
    assert envelope.sender == "s@c.example"
    assert envelope.params.envid == "abc@c.example"
    assert envelope.params.mtrk.timeout == 3600
    assert envelope.recipients[0].params.orcpt.address == "u@x@mx.example.test"
    assert envelope.client.helo == "c.example"
    assert content.startswith(b"Received: from c.example ([192.0.2.7])\r\n")
    assert b"id Q1" in content
    assert content.endswith(b"Subject: hi\r\n\r\n.dot\r\n")


def test_received_field_date_is_utc_with_a_numeric_zone(receiver, clock):
    # RFC 5322 §3.3: "-0000" would mean the local zone is unknown; UTC is "+0000".
    clock.advance(1772366400)  # before the session starts, so that no timer runs out
    client = Client(make_factory(receiver, clock))
    client.send(b"EHLO c.example\r\nMAIL FROM:<s@c.example>\r\nRCPT TO:<u@x.example>\r\nDATA\r\n")
    client.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    _, content = receiver.accepted[0]
    assert content.startswith(
        b"Received: from c.example ([192.0.2.7])\r\n"
        b"\tby mx.example.test (mtrkmta) with ESMTP id Q1\r\n"
        b"\tfor <u@x.example>;\r\n"
        b"\tSun, 01 Mar 2026 12:00:00 +0000\r\n"
        b"Subject: hi\r\n"
    )


def test_pipelined_commands_wait_for_a_slow_check(client, receiver):
    # Strict PIPELINING: RCPT is not answered before the slow MAIL check has finished.
    receiver.sender_checks = []
    replies = client.send(
        b"EHLO c.example\r\nMAIL FROM:<s@c.example>\r\nRCPT TO:<u@x.example>\r\nNOOP\r\n"
    )
    assert replies[-1] == b"250 DELIVERBY"
    assert client.transport.producerState == "paused"
    client.transport.clear()
    receiver.sender_checks[0].callback(None)
    assert client.lines() == [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"250 2.0.0 Ok"]
    assert client.transport.producerState == "producing"


def test_unknown_and_out_of_order_commands(client):
    assert client.send(b"FOO\r\n") == [b"500 5.5.1 Command unrecognized"]
    assert client.send(b"RCPT TO:<a@b.example>\r\n")[0].startswith(b"503 5.5.1")
    assert client.send(b"MAIL FROM:<a@b.example>\r\n")[0].startswith(b"503 5.5.1")
    client.send(b"EHLO c\r\n")
    assert client.send(b"DATA\r\n")[0].startswith(b"503 5.5.1")


def test_commands_without_argument_refuse_one(client):
    # RFC 5321 §4.3.2: DATA, RSET and QUIT take no argument; one gets 501 and the
    # session goes on. NOOP and HELP may have one (§4.1.1.9, §4.1.1.8).
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@x.example>\r\n")
    assert client.send(b"QUIT oops\r\nRSET x\r\nDATA x\r\nNOOP x\r\n") == [
        b"501 5.5.4 Syntax: QUIT",
        b"501 5.5.4 Syntax: RSET",
        b"501 5.5.4 Syntax: DATA",
        b"250 2.0.0 Ok",
    ]
    assert client.send(b"HELP DATA\r\n")[0].startswith(b"214-2.0.0 Commands: ")
    assert client.send(b"QUIT\r\n") == [b"221 2.0.0 mx.example.test Bye"]
    assert client.transport.disconnecting


def test_expn_is_recognised_but_not_implemented_and_vrfy_gets_252(client):
    # RFC 5321 §3.5.2 / §7.3: a disabled EXPN answers 502, not "500 unrecognized";
    # §3.5.3: 252 for a VRFY the server will not verify but will accept mail for.
    client.send(b"EHLO c\r\n")
    assert client.send(b"EXPN staff\r\nEXPN\r\nVRFY bob\r\nVRFY\r\n") == [
        b"502 5.5.1 EXPN not implemented",
        b"502 5.5.1 EXPN not implemented",
        b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
        b"501 5.5.4 Syntax: VRFY address",
    ]


def test_overlong_command_line(client):
    # doc/conformance.rst 3885-P2: past 2048 octets -> 500 5.5.2, the session goes on.
    replies = client.send(b"EHLO c\r\nNOOP " + b"x" * 3000 + b"\r\nNOOP\r\n")
    assert replies[-2:] == [b"500 5.5.2 Line too long", b"250 2.0.0 Ok"]


def test_long_legal_mail_line_is_accepted(client):
    # RFC 3461 §5.4, RFC 3885 §2, doc/conformance.rst 3885-P2: MTRK + 100-char ENVID + RET +
    # SIZE fit in one command line.
    envid = "e" * 80 + "@" + "h" * 19
    line = (
        f"MAIL FROM:<{'s' * 64}@{'d' * 180}.example> SIZE=1000 BODY=8BITMIME RET=FULL "
        f"ENVID={envid} MTRK=VheLhqV/rCKJmplkGFwsyW59pYk=:999999999\r\n"
    ).encode()
    client.send(b"EHLO c\r\n")
    assert client.send(line) == [b"250 2.1.0 Ok"]


def test_size_declared_over_limit(receiver, clock):
    c = Client(make_factory(receiver, clock, message_size=1000))
    c.send(b"EHLO c\r\n")
    assert c.send(b"MAIL FROM:<a@b.example> SIZE=1001\r\n") == [
        b"552 5.3.4 Message size exceeds fixed maximum message size"
    ]
    c.close()


def test_size_exceeded_in_data(receiver, clock):
    c = Client(make_factory(receiver, clock, message_size=100))
    c.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@x.example>\r\nDATA\r\n")
    assert c.send(b"x" * 90 + b"\r\n" + b"y" * 90 + b"\r\n.\r\n") == [
        b"552 5.3.4 Message size exceeds fixed maximum message size"
    ]
    assert receiver.accepted == []
    c.close()


def test_overlong_data_line_rejected_without_smuggling(client, receiver):
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@x.example>\r\nDATA\r\n")
    smuggled = b"A" * 1500 + b"\r\nMAIL FROM:<evil@x.example>\r\n.\r\nNOOP\r\n"
    assert client.send(smuggled) == [
        b"500 5.5.2 Line too long (RFC 5321 limits lines to 998 octets)",
        b"250 2.0.0 Ok",
    ]
    assert receiver.accepted == []


def test_too_many_recipients(receiver, clock):
    c = Client(make_factory(receiver, clock, max_recipients=2))
    replies = c.send(
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n"
        + b"".join(f"RCPT TO:<u{i}@x.example>\r\n".encode() for i in range(3))
    )
    assert replies[-1] == b"452 4.5.3 Too many recipients"
    c.close()


def test_mail_loop_detected(client):
    # RFC 5321 §6.3: the loop threshold is "normally at least 100" Received: fields.
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@x.example>\r\nDATA\r\n")
    assert client.send(b"Received: x\r\n" * 101 + b"\r\nbody\r\n.\r\n") == [
        b"554 5.4.6 Too many Received: headers: mail loop detected"
    ]


def test_sixty_received_fields_are_no_loop(client, receiver):
    # RFC 5321 §6.3: a message that crossed 60 hops is not refused as a loop.
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@x.example>\r\nDATA\r\n")
    assert client.send(b"Received: x\r\n" * 60 + b"\r\nbody\r\n.\r\n") == [
        b"250 2.0.0 Ok: queued as Q1"
    ]
    assert receiver.accepted[0][1].count(b"Received: ") == 61


def test_refused_recipient_and_data_without_recipients(client, receiver):
    receiver.refuse_rcpt["u@far.example"] = Reply(554, "5.7.1", ("Relay access denied",))
    replies = client.send(
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@far.example>\r\nDATA\r\n"
    )
    assert replies[-2:] == [b"554 5.7.1 Relay access denied", b"503 5.5.1 No valid recipients"]


def test_acceptance_failure_is_a_temporary_error(client, receiver):
    receiver.fail_accept = True
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@x.example>\r\nDATA\r\n")
    assert client.send(b"hello\r\n.\r\n") == [
        b"451 4.3.0 Could not queue the message; try again later"
    ]


def test_rset_clears_transaction(client):
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    assert client.send(b"RSET\r\nRCPT TO:<u@x.example>\r\n") == [
        b"250 2.0.0 Ok",
        b"503 5.5.1 Need MAIL before RCPT",
    ]


def test_idle_timeout(receiver, clock):
    c = Client(make_factory(receiver, clock, idle_timeout=60))
    clock.advance(59)
    assert not c.transport.disconnecting
    c.send(b"NOOP\r\n")
    clock.advance(59)
    assert not c.transport.disconnecting
    clock.advance(2)
    assert c.lines()[-1] == b"421 4.4.2 mx.example.test Idle timeout, closing"
    assert c.transport.disconnecting
    c.close()


def test_connection_limits(receiver, clock):
    factory = make_factory(receiver, clock, max_connections=3, max_connections_per_ip=2)
    a = Client(factory, ("192.0.2.1", 1))
    b = Client(factory, ("192.0.2.1", 2))
    c = Client(factory, ("192.0.2.1", 3))
    assert c.lines() == [b"421 4.7.0 mx.example.test Too many connections from you"]
    d = Client(factory, ("192.0.2.2", 4))
    e = Client(factory, ("192.0.2.3", 5))
    assert e.lines() == [b"421 4.7.0 mx.example.test Too many connections"]
    for x in (a, b, c, d, e):
        x.close()
    assert factory.sessions == set()


def test_starttls_not_offered_without_certificate(client):
    assert client.send(b"STARTTLS\r\n") == [b"502 5.5.1 STARTTLS not available"]


def test_auth_not_offered_without_tls(receiver, clock):
    c = Client(make_factory(receiver, clock, checker=object()))
    assert b"AUTH" not in b"".join(c.send(b"EHLO c\r\n"))
    assert c.send(b"AUTH PLAIN AGEAYg==\r\n") == [
        b"538 5.7.11 Encryption required for requested authentication mechanism"
    ]
    c.close()


def test_submission_requires_auth(receiver, clock):
    c = Client(make_factory(receiver, clock, require_auth=True, listener="submission"))
    c.send(b"EHLO c\r\n")
    assert c.send(b"MAIL FROM:<a@b.example>\r\n") == [b"530 5.7.0 Authentication required"]
    c.close()


def test_shutdown_while_a_message_is_being_made_durable(client, receiver):
    # The message the server keeps gets its 250 before the 421, never a 421 alone.
    receiver.pending_accepts = []
    client.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@x.example>\r\nDATA\r\n")
    assert client.send(b"hello\r\n.\r\n") == []
    client.proto.shutdown()
    assert client.lines() == []
    assert not client.transport.disconnecting
    receiver.pending_accepts[0].callback(None)
    assert client.lines() == [
        b"250 2.0.0 Ok: queued as Q1",
        b"421 4.3.2 mx.example.test Service shutting down",
    ]
    assert client.transport.disconnecting


# -- what a client names: sizes (RFC 5321 §4.5.3.1), characters, SMTPUTF8 (RFC 6531) --------


@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
def test_overlong_hello_name_is_refused_before_it_reaches_received(client, receiver, verb):
    # RFC 5321 §4.5.3.1.2: a 1,500-character EHLO argument, accepted, made our own
    # Received: line longer than 998 octets (the next hop refused the message and the
    # sender got a bounce). It is refused at the command and the session has no name.
    assert client.send(verb + b" " + b"h" * 1500 + b"\r\n") == [
        b"501 5.5.2 " + verb + b" argument too long (RFC 5321 \xc2\xa74.5.3.1.2)"
    ]
    assert client.send(b"MAIL FROM:<s@c.example>\r\n")[0].startswith(b"503 5.5.1")
    assert receiver.accepted == []


@pytest.mark.parametrize(
    "name",
    [b"evil\x0bX-Injected:yes", b"evil\x1b[2J", b"evil\x7f", b"evil\xc2\x85", b"b\xc3\xbccher"],
)
def test_hello_name_with_a_control_character_is_refused(client, name):
    # A VT or an escape sequence was copied raw into the Received: header; C1 controls
    # and non-ASCII are no part of a domain or address literal either.
    assert client.send(b"EHLO " + name + b"\r\n") == [
        b"501 5.5.2 EHLO argument must be a domain or address literal in printable ASCII"
    ]
    assert client.send(b"MAIL FROM:<s@c.example>\r\n")[0].startswith(b"503 5.5.1")


def test_every_received_line_fits_in_998_octets(receiver, clock):
    # RFC 5322 §2.1.1: whatever EHLO name and recipient path a client gives, the
    # Received: field we add has no line over 998 octets (the names are refused first).
    rcpt = "r" * 64 + "@" + "d" * 181 + ".example"  # the longest path: 256 with brackets
    for length in (255, 256, 1500):
        c = Client(make_factory(receiver, clock))
        c.send(f"EHLO {'h' * length}\r\nMAIL FROM:<s@c.example>\r\nRCPT TO:<{rcpt}>\r\n".encode())
        c.send(b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        c.close()
    assert len(receiver.accepted) == 1  # only the 255-octet name was taken
    for _, content in receiver.accepted:
        received = content.split(b"\r\nSubject:")[0]
        assert rcpt.encode() in received
        assert max(len(line) for line in received.split(b"\r\n")) <= 998


def test_overlong_local_part_is_refused_at_rcpt(client, receiver):
    # RFC 5321 §4.5.3.1.1: a 300-character local part was accepted, then deferred five
    # days on ENAMETOOLONG. 64 octets is the limit, the sender's too.
    client.send(b"EHLO c\r\nMAIL FROM:<s@c.example>\r\n")
    assert client.send(b"RCPT TO:<" + b"a" * 300 + b"@x.test>\r\n") == [
        b"553 5.1.3 Local part too long (RFC 5321 \xc2\xa74.5.3.1.1)"
    ]
    assert client.send(b"RCPT TO:<" + b"a" * 64 + b"@x.test>\r\n") == [b"250 2.1.5 Ok"]
    client.send(b"RSET\r\n")
    assert client.send(b"MAIL FROM:<" + b"a" * 65 + b"@c.example>\r\n") == [
        b"553 5.1.7 Local part too long (RFC 5321 \xc2\xa74.5.3.1.1)"
    ]


def test_address_limits_come_from_the_settings(receiver, clock):
    limits = AddressLimits(local_part=100, helo=300, path=300)
    c = Client(make_factory(receiver, clock, address_limits=limits))
    assert c.send(b"EHLO " + b"h" * 300 + b"\r\n")[0] == b"250-mx.example.test"
    c.send(b"MAIL FROM:<s@c.example>\r\n")
    assert c.send(b"RCPT TO:<" + b"a" * 100 + b"@x.test>\r\n") == [b"250 2.1.5 Ok"]
    assert c.send(b"RCPT TO:<" + b"a" * 101 + b"@x.test>\r\n")[0].startswith(b"553 5.1.3")
    c.close()


def test_control_characters_in_addresses_are_refused(client):
    client.send(b"EHLO c\r\n")
    assert client.send(b"MAIL FROM:<a\x0bb@c.example> SMTPUTF8\r\n") == [
        b"553 5.1.7 Control character in sender address"
    ]
    client.send(b"MAIL FROM:<s@c.example> SMTPUTF8\r\n")
    assert client.send(b'RCPT TO:<"a\xc2\x9bb"@x.test>\r\n') == [
        b"553 5.1.3 Control character in recipient address"
    ]


def test_non_ascii_addresses_need_smtputf8(client, receiver):
    # RFC 6531 §3.5: without SMTPUTF8 on MAIL, a non-ASCII sender or recipient is
    # refused with 553 5.6.7; RCPT is judged by the transaction's MAIL.
    client.send(b"EHLO c\r\n")
    assert client.send("MAIL FROM:<j\u00f6rg@c.example>\r\n".encode()) == [
        b"553 5.6.7 Non-ASCII sender address not permitted without SMTPUTF8 (RFC 6531)"
    ]
    client.send(b"MAIL FROM:<s@c.example>\r\n")
    assert client.send("RCPT TO:<j\u00f6rg@x.test>\r\n".encode()) == [
        b"553 5.6.7 Non-ASCII recipient address not permitted without SMTPUTF8 (RFC 6531)"
    ]
    assert client.send("RCPT TO:<u@b\u00fccher.example>\r\n".encode())[0].startswith(b"553 5.6.7")
    client.send(b"RSET\r\n")
    assert client.send("MAIL FROM:<j\u00f6rg@c.example> SMTPUTF8\r\n".encode()) == [b"250 2.1.0 Ok"]
    assert client.send("RCPT TO:<j\u00f6rg@x.test>\r\n".encode()) == [b"250 2.1.5 Ok"]


def test_empty_local_part_is_refused_at_rcpt(client):
    client.send(b"EHLO c\r\nMAIL FROM:<s@c.example>\r\n")
    assert client.send(b'RCPT TO:<""@x.test>\r\n') == [
        b"553 5.1.3 Empty local part: no such mailbox"
    ]


class _CountingTransport(StringTransport):
    """A StringTransport that keeps every write apart."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.writes: list[bytes] = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)


def test_replies_to_a_pipelined_group_leave_in_one_write(receiver, clock):
    # RFC 2920 §3.2: the replies to commands received together go out together, in
    # order, once the group is answered (one write: one send, not one per reply).
    proto = make_factory(receiver, clock).buildProtocol(None)
    transport = _CountingTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    proto.makeConnection(transport)
    transport.writes.clear()
    proto.dataReceived(b"EHLO c.example\r\nMAIL FROM:<s@c.example>\r\nRCPT TO:<u@x.example>\r\n")
    assert len(transport.writes) == 1
    assert transport.writes[0].endswith(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    # A reply that had to wait leaves with the replies to what was pipelined after it.
    receiver.sender_checks = []
    transport.writes.clear()
    proto.dataReceived(b"RSET\r\nMAIL FROM:<s@c.example>\r\nRCPT TO:<u@x.example>\r\nNOOP\r\n")
    assert transport.writes == [b"250 2.0.0 Ok\r\n"]
    transport.writes.clear()
    receiver.sender_checks[0].callback(None)
    assert transport.writes == [b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n"]
    proto.connectionLost(None)


def test_a_long_pipelined_group_is_written_in_parts(receiver, clock):
    # The transport's buffer limit must still see the replies pile up when a client
    # pipelines many commands and reads nothing (sessionguard's output pause).
    proto = make_factory(receiver, clock).buildProtocol(None)
    transport = _CountingTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    proto.makeConnection(transport)
    transport.writes.clear()
    proto.dataReceived(b"NOOP\r\n" * (3 * HELD_REPLIES))
    assert len(transport.writes) == 3
    assert b"".join(transport.writes) == b"250 2.0.0 Ok\r\n" * (3 * HELD_REPLIES)
    proto.connectionLost(None)


def test_starttls_reply_is_written_before_tls_starts(receiver, clock):
    # RFC 3207 §4: the 220 goes in clear, then TLS starts; a held reply must not wait
    # for the end of the group and end up encrypted.
    events: list[object] = []

    @implementer(ITLSTransport)
    class TLSRecording(_CountingTransport):
        def write(self, data):
            events.append(data)
            super().write(data)

        def startTLS(self, context):
            events.append("startTLS")

    transport = TLSRecording(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    proto = make_factory(receiver, clock, tls=object()).buildProtocol(None)
    proto.makeConnection(transport)
    events.clear()
    proto.dataReceived(b"EHLO c.example\r\nSTARTTLS\r\n")
    assert events[-1] == "startTLS"
    assert events[-2].endswith(b"220 2.0.0 Ready to start TLS\r\n")
    proto.connectionLost(None)
