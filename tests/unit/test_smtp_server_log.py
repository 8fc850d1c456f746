"""The log lines of the SMTP/LMTP server core, as the text observer writes them."""

from __future__ import annotations

import io
import re

import pytest
from test_smtp_server import Client, make_factory
from twisted.logger import globalLogPublisher

from mtrkmta.lmtp.server import LMTPServerFactory
from mtrkmta.logfile import text_observer
from mtrkmta.smtp.reply import Reply
from mtrkmta.smtp.server import ServerSettings

STAMP = r"\S+ \[mtrkmta\.smtp\.server#info\] "


@pytest.fixture
def log():
    """What the server logs, as text lines without the time stamp and [system]."""
    out = io.StringIO()
    observer = text_observer(out)
    globalLogPublisher.addObserver(observer)

    def lines() -> list[str]:
        return [re.sub(f"^{STAMP}", "", line) for line in out.getvalue().splitlines()]

    yield lines
    globalLogPublisher.removeObserver(observer)


def test_content_refused_after_data_is_logged_with_its_queue_id(receiver, clock, log):
    client = Client(make_factory(receiver, clock))
    client.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@x.example>\r\nDATA\r\n")
    client.send(b"Received: x\r\n" * 101 + b"\r\nbody\r\n.\r\nQUIT\r\n")
    client.close()
    assert log() == [
        "smtp connect from [192.0.2.7]:40000",
        "smtp Q1: reject: END-OF-MESSAGE from unknown[192.0.2.7]: 554 5.4.6 Too many Received:"
        " headers: mail loop detected; from=<a@b.example> proto=ESMTP helo=<c.example>",
        "smtp disconnect from unknown[192.0.2.7] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5",
    ]


def test_a_refused_mail_names_the_sender_it_was_given(receiver, clock, log):
    client = Client(make_factory(receiver, clock))
    client.send(b"MAIL FROM:<a@b.example> SIZE=10\r\nXYZZY\r\nHELO c\r\nNOOP\r\n")
    client.close()
    assert log()[1:] == [
        "smtp NOQUEUE: reject: MAIL from unknown[192.0.2.7]: 503 5.5.1 Send EHLO first;"
        " from=<a@b.example> proto=SMTP helo=<>",
        "smtp disconnect from unknown[192.0.2.7] mail=0/1 unknown=0/1 helo=1 noop=1 commands=2/4",
    ]


def test_a_connection_over_the_limit_is_logged_as_refused(receiver, clock, log):
    factory = make_factory(receiver, clock, max_connections_per_ip=1)
    first, second = Client(factory), Client(factory, ("192.0.2.7", 40001))
    second.close()
    first.close()
    assert log()[2:4] == [
        "smtp NOQUEUE: reject: CONNECT from unknown[192.0.2.7]:"
        " 421 4.7.0 mx.example.test Too many connections from you",
        "smtp disconnect from unknown[192.0.2.7] commands=0",
    ]


def test_lmtp_refusals_name_the_listener_and_protocol(receiver, clock, log):
    receiver.refuse_rcpt["u@far.example"] = Reply(550, "5.1.1", ("No such user",))
    settings = ServerSettings(hostname="mx.example.test", listener="lmtp")
    client = Client(LMTPServerFactory(settings, receiver, clock))
    client.send(b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<u@far.example>\r\nDATA\r\n")
    client.close()
    assert log()[1:] == [
        "lmtp NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 550 5.1.1 No such user;"
        " from=<> to=<u@far.example> proto=LMTP helo=<c>",
        "lmtp NOQUEUE: reject: DATA from unknown[192.0.2.7]: 503 5.5.1 No valid recipients;"
        " from=<> proto=LMTP helo=<c>",
        "lmtp disconnect from unknown[192.0.2.7] lhlo=1 mail=1 rcpt=0/1 data=0/1 commands=2/4",
    ]
