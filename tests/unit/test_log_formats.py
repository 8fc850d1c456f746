"""The JSON-lines log and the syslog observer (mtrkmta.logfile): the same event as the
text line, one object per event; syslog over a real unix datagram socket."""

from __future__ import annotations

import io
import json
import os
import re
import socket
from pathlib import Path

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from mtrkmta.config import Logging
from mtrkmta.logfile import (
    SyslogObserver,
    configured_observer,
    json_observer,
    text_observer,
)
from mtrkmta.queue.deliverylog import FORMAT

WHEN = 1_800_000_000.25  # 2027-01-15T08:00:00.250Z
DELIVERY = {
    "log_format": FORMAT,
    "log_level": LogLevel.info,
    "log_namespace": "mtrkmta.queue.service",
    "log_time": WHEN,
    "queue_id": "1k1sx4tyq21wvqc3nwqm",
    "event": "delivery",
    "to": "carol@relay.example",
    "relay": "mx.relay.example[192.0.2.7]:25",
    "delay": 1.25,
    "delays": "1.00/0.05/0.20",
    "dsn": "2.1.9",
    "status": "relayed",
    "reply": "250 2.0.0 Ok: queued as FAKE",
}
CHATTER = {
    "log_format": "Starting factory {factory!r}",
    "log_level": LogLevel.info,
    "log_namespace": "twisted.internet.protocol.ClientFactory",
    "log_time": WHEN,
    "factory": object(),
}


def test_a_json_line_has_the_fields_of_the_text_line():
    text, lines = io.StringIO(), io.StringIO()
    publish = LogPublisher(text_observer(text), json_observer(lines))
    publish(dict(DELIVERY))
    publish(dict(CHATTER))
    (line,) = lines.getvalue().splitlines()
    assert json.loads(line) == {
        "time": "2027-01-15T08:00:00.250+00:00",
        "level": "info",
        "system": "mtrkmta.queue.service#info",
        "queue_id": "1k1sx4tyq21wvqc3nwqm",
        "event": "delivery",
        "text": text.getvalue().split("] ", 1)[1].rstrip("\n"),
        "to": "carol@relay.example",
        "relay": "mx.relay.example[192.0.2.7]:25",
        "delay": 1.25,
        "delays": "1.00/0.05/0.20",
        "dsn": "2.1.9",
        "status": "relayed",
        "reply": "250 2.0.0 Ok: queued as FAKE",
    }


def test_an_event_without_a_name_is_named_by_its_format_and_a_failure_has_its_traceback():
    lines = io.StringIO()
    log = Logger("mtrkmta.queue.service", observer=json_observer(lines, "worker 2"))
    log.info("queue: {n} message(s) to resume", n=3)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.failure("{queue_id}: queue run failed", Failure(), queue_id="Q7")
    resume, failed = (json.loads(line) for line in lines.getvalue().splitlines())
    assert resume["event"] == "queue: {n} message(s) to resume"
    assert resume["n"] == 3 and resume["queue_id"] is None
    assert resume["system"] == "worker 2 mtrkmta.queue.service#info"
    assert failed["queue_id"] == "Q7" and failed["level"] == "critical"
    assert failed["text"] == "Q7: queue run failed"
    assert "ZeroDivisionError: division by zero" in failed["traceback"]


def test_a_hostile_value_stays_inside_its_json_line():
    lines = io.StringIO()
    forged = 'x\n{"queue_id": "FORGED"}\u2028\r'
    json_observer(lines)({**DELIVERY, "to": forged})
    (line,) = lines.getvalue().splitlines()  # str.splitlines splits at U+2028 too
    assert json.loads(line)["to"] == forged


@pytest.fixture
def syslog_socket(tmp_path: Path):
    """A unix datagram socket bound where the observer is told syslog listens."""
    path = tmp_path / "log"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    yield path, server
    server.close()


def test_syslog_gets_the_text_line_under_facility_mail_and_the_prefix(syslog_socket):
    path, server = syslog_socket
    observer = configured_observer(Logging(syslog=True, prefix="mta", syslog_socket=path))
    assert isinstance(observer, SyslogObserver)
    observer(dict(CHATTER))
    observer(dict(DELIVERY))
    observer({**DELIVERY, "log_level": LogLevel.error})
    info = server.recv(65536).decode()
    # <22>: facility mail (2) * 8 + severity info (6), RFC 5424 §6.2.1; then syslog(3)'s
    # "Mmm dd hh:mm:ss TAG[PID]: ".
    assert re.fullmatch(
        rf"<22>\w{{3}} [ \d]\d \d\d:\d\d:\d\d mta\[{os.getpid()}\]: "
        r"\[mtrkmta\.queue\.service#info\] 1k1sx4tyq21wvqc3nwqm: to=<carol@relay\.example>,"
        r" relay=mx\.relay\.example\[192\.0\.2\.7\]:25, .*",
        info,
    )
    assert server.recv(65536).decode().startswith("<19>")  # mail.err; the chatter never came
    observer.close()


def test_syslog_sends_each_line_of_a_traceback_and_json_when_asked(syslog_socket):
    path, server = syslog_socket
    text = SyslogObserver(path, "mtrkmta", process="worker 1", pid=42)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        Logger("mtrkmta.queue", observer=text).failure("Q7: run failed", Failure())
    first = server.recv(65536).decode()
    assert first.endswith("mtrkmta[42]: [worker 1 mtrkmta.queue#critical] Q7: run failed")
    rest = []
    server.setblocking(False)
    while True:
        try:
            rest.append(server.recv(65536).decode())
        except BlockingIOError:
            break
    assert rest[0].endswith("mtrkmta[42]: Traceback (most recent call last):")
    assert rest[-1].endswith("mtrkmta[42]: builtins.ZeroDivisionError: division by zero")
    server.setblocking(True)
    SyslogObserver(path, "mtrkmta", json_format=True, pid=42)(dict(DELIVERY))
    message = server.recv(65536).decode()
    assert json.loads(message.split("mtrkmta[42]: ", 1)[1])["queue_id"] == DELIVERY["queue_id"]


def test_syslog_away_drops_the_message_and_comes_back(tmp_path):
    path = tmp_path / "log"
    observer = SyslogObserver(path, "mtrkmta")
    observer(dict(DELIVERY))  # nobody listens: dropped, no error
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    try:
        observer(dict(DELIVERY))
        assert "1k1sx4tyq21wvqc3nwqm: to=<carol" in server.recv(65536).decode()
    finally:
        server.close()
        observer.close()
