"""The log observer of `mtrkmta serve`: twistd's text format, time stamps cached per second."""

from __future__ import annotations

import io

import pytest
from twisted.logger import (
    Logger,
    LogLevel,
    LogPublisher,
    formatEventAsClassicLogText,
    formatTime,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from mtrkmta.logfile import SecondStamps, classic_line, text_observer


def test_lines_are_those_of_twistds_default_observer():
    default, ours = io.StringIO(), io.StringIO()
    publish = LogPublisher(textFileLogObserver(default), text_observer(ours))
    times = (1_700_000_000.1, 1_700_000_000.9, 1_700_000_001.0, 1_699_999_999.5)
    for when in times:
        publish(
            {
                "log_format": "{queue_id}: to=<{to}>",
                "log_level": LogLevel.info,
                "log_namespace": "mtrkmta.queue.service",
                "log_time": when,
                "queue_id": "q1",
                "to": "a@b",
            }
        )
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        Logger("mtrkmta.queue", observer=publish).failure("{q}: run failed", Failure(), q="q2")
    assert ours.getvalue() == default.getvalue()
    lines = ours.getvalue().splitlines()
    # Each line's stamp is the second of its own event, whatever came before.
    assert [line.split(" ")[0] for line in lines[:4]] == [formatTime(int(t)) for t in times]
    assert len(set(formatTime(int(t)) for t in times)) == 3
    assert lines[0].endswith("[mtrkmta.queue.service#info] q1: to=<a@b>")
    assert "q2: run failed" in lines[4] and "ZeroDivisionError" in ours.getvalue()


def test_stamps_are_formatted_once_per_second():
    stamps = SecondStamps()
    first = stamps(1_700_000_000.2)
    assert stamps(1_700_000_000.7) is first
    assert stamps(1_700_000_001.0) != first
    assert stamps(None) == "-"


def test_a_worker_names_itself_in_every_line():
    out = io.StringIO()
    publish = text_observer(out, "worker 2")
    publish(
        {
            "log_format": "{q}: accepted",
            "log_level": LogLevel.info,
            "log_namespace": "mtrkmta.receive.receiver",
            "log_time": 1_700_000_000.0,
            "q": "q1",
        }
    )
    publish({"log_format": "legacy", "log_system": "-", "log_time": 1_700_000_000.0})
    first, second = out.getvalue().splitlines()
    assert first.endswith(" [worker 2 mtrkmta.receive.receiver#info] q1: accepted")
    assert second.endswith(" [-] legacy")


class Shouting:
    def __format__(self, spec: str) -> str:
        raise RuntimeError("cannot format")

    def __repr__(self) -> str:
        return "<Shouting>"

    def upper(self) -> str:
        return "LOUD"


WHEN = 1_700_000_000.0
EVENTS = [
    {"log_format": "{queue_id}: to=<{to}>", "queue_id": "q1", "to": "a@b"},
    {"log_format": "{n:>5} {r!r} {s!s} {a!a}", "n": 42, "r": "x", "s": b"y", "a": "é"},
    {"log_format": "{obj.real} {items[1]}", "obj": 3, "items": ["a", "b"]},
    {"log_format": "two\nlines", "log_system": "-"},
    {"log_format": "missing {nothing}"},
    {"log_format": "positional {}"},
    {"log_format": "called {obj.upper()}", "obj": Shouting()},
    {"log_format": "unformattable {v}", "v": Shouting()},
    {"log_format": "", "x": 1},
    {"log_format": None},
    {"log_text": "no format"},
    {"log_format": "system {x}", "x": 1, "log_system": 7},
    {"log_format": "no level", "log_level": None, "log_namespace": "ns"},
    {"log_format": "braces {{literal}} {x}", "x": "v"},
]


@pytest.mark.parametrize("event", EVENTS, ids=range(len(EVENTS)))
def test_each_line_is_twisteds_own(event):
    event = {"log_time": WHEN, "log_level": LogLevel.warn, "log_namespace": "mtrkmta.t", **event}
    stamps = SecondStamps()
    expected = formatEventAsClassicLogText(event, stamps)
    assert classic_line(event, stamps) == expected


def test_a_plain_event_does_not_need_twisteds_formatter(monkeypatch):
    def unused(*args: object) -> str:
        raise AssertionError("fell back to Twisted's formatter")

    monkeypatch.setattr("mtrkmta.logfile.formatEventAsClassicLogText", unused)
    event = {**EVENTS[0], "log_time": WHEN, "log_level": LogLevel.info, "log_namespace": "n"}
    assert classic_line(event, SecondStamps()) == f"{formatTime(WHEN)} [n#info] q1: to=<a@b>\n"


# -- a logged value never ends the line or forges another -----------------------------------

FORGED = "a\u2028" + "2024-01-01T00:00:00+0000 [mtrkmta.queue.service#info] Q1: delivered"
BREAKERS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() splits at


@pytest.mark.parametrize(
    "event",
    [
        {"log_format": "{q}: accepted from=<{sender}>", "q": "Q1", "sender": f'"{FORGED}"@x.test'},
        {"log_format": "{v!r} {v!s:>3} {v}", "v": "x" + BREAKERS},
        {"log_format": "{obj.args[0]}", "obj": OSError(f"no {BREAKERS} such")},
        {"log_format": "{items[0]}", "items": [BREAKERS]},
        # Twisted's formatter: the {f()} syntax, a flattened event, a non-text system.
        {"log_format": "called {f()}", "f": lambda: f"v{BREAKERS}"},
        {"log_format": "flat {v}", "log_flattened": {"v!s:": f"v{BREAKERS}", "v!:": "v"}},
        {"log_format": "system {v}", "v": BREAKERS, "log_system": 7},
        {"log_format": "{v}", "v": "x", "log_system": f"sys{BREAKERS}"},
    ],
    ids=range(8),
)
def test_a_value_never_makes_a_second_line(event):
    event = {"log_time": WHEN, "log_level": LogLevel.info, "log_namespace": "mtrkmta.t", **event}
    line = classic_line(event, SecondStamps())
    assert line is not None and line.endswith("\n")
    assert len(line.splitlines()) == 1, line
    assert not any(char in line[:-1] for char in BREAKERS + "\x00\x1b\x7f\x9b")


def test_escapes_name_the_characters():
    event = {"log_time": WHEN, "log_format": "<{v}>", "v": "a\u2028b\x0bc\x85d\x1b[2Je\tf"}
    line = classic_line(event, SecondStamps())
    assert line.endswith(" <a\\u2028b\\x0bc\\x85d\\x1b[2Je\\x09f>\n")


def test_the_format_and_a_traceback_keep_their_own_lines():
    # The line's own structure stays: the format's line break and a traceback's lines,
    # each continued with a tab. What a value brings in is escaped, in the traceback too.
    out = io.StringIO()
    log = Logger("mtrkmta.t", observer=text_observer(out))
    log.info("first\nsecond {v}", v="x\u2028y")
    try:
        raise ValueError("bad \u2028 name\x0b")
    except ValueError:
        log.failure("{q}: failed for {who}", Failure(), q="Q1", who="a\nb")
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("] first")
    assert lines[1] == "\tsecond x\\u2028y"
    assert lines[2].endswith("] Q1: failed for a\\x0ab")
    assert all(line.startswith("\t") for line in lines[3:])
    assert "\tbuiltins.ValueError: bad \\u2028 name\\x0b" in lines


def test_twisteds_chatter_is_left_out_and_its_warnings_kept():
    # A factory started or stopped, and the four lines of a DNS query's UDP port, as
    # Twisted logs them (new-style for factories, legacy log.msg for the UDP port).
    def legacy(text, level=LogLevel.info):
        return {
            "log_format": "{log_text}",
            "log_text": text,
            "log_level": level,
            "log_namespace": "log_legacy",
            "log_time": 0.0,
        }

    factory = {
        "log_format": "Starting factory {factory!r}",
        "factory": object(),
        "log_level": LogLevel.info,
        "log_namespace": "twisted.internet.endpoints",
        "log_time": 0.0,
    }
    chatter = [
        factory,
        {**factory, "log_format": "Stopping factory {factory!r}"},
        legacy("DNSDatagramProtocol starting on 40123"),
        legacy("Starting protocol <twisted.names.dns.DNSDatagramProtocol object at 0x7f00>"),
        legacy("(UDP Port 40123 Closed)"),
        legacy("Stopping protocol <twisted.names.dns.DNSDatagramProtocol object at 0x7f00>"),
        legacy("SMTPServerFactory starting on 25"),
        legacy("ControlFactory starting on '/var/lib/mtrkmta/control.sock'"),
        legacy("(TCP Port 25 Closed)"),
        legacy("(UNIX Port /var/lib/mtrkmta/control.sock Closed)"),
        legacy("/etc/resolv.conf changed, reparsing"),
        legacy("Resolver added ('10.255.255.53', 53) to server list"),
        legacy("Resolver removed ('10.255.255.53', 53) from server list"),
    ]
    kept = [
        {**factory, "log_level": LogLevel.warn},
        legacy("(UDP Port 40123 Closed)", LogLevel.error),
        legacy("SMTPServerFactory starting on 25", LogLevel.warn),
        {**factory, "log_namespace": "mtrkmta.service"},
    ]
    out = io.StringIO()
    observer = text_observer(out)
    for event in chatter:
        observer(event)
    assert out.getvalue() == ""
    for event in kept:
        observer(event)
    assert len(out.getvalue().splitlines()) == len(kept)
