"""mtrkmta.faults: fault plans parsed from MTRKMTA_FAULTS, and when the SMTP server reports
that a 250 was sent."""

from __future__ import annotations

import errno

import pytest
from test_smtp_server import Client, RecordingReceiver
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from mtrkmta.faults import POINTS, FaultPlan, FaultSpecError, IFaults, NoFaults, from_environment
from mtrkmta.smtp.server import ServerSettings, SMTPServerFactory


def test_no_faults_by_default():
    faults = from_environment({})
    assert isinstance(faults, NoFaults)
    assert verifyObject(IFaults, faults)
    for point in POINTS:
        faults.reached(point)  # nothing happens


@pytest.mark.parametrize(
    ("spec", "plan"),
    [
        ("spool.renamed:crash", FaultPlan("spool.renamed", "crash", 1)),
        ("spool.write:enospc", FaultPlan("spool.write", "enospc", 1)),
        ("tracking.write:eio:3", FaultPlan("tracking.write", "eio", 3)),
    ],
)
def test_parse(spec, plan):
    parsed = from_environment({"MTRKMTA_FAULTS": spec})
    assert verifyObject(IFaults, parsed)
    assert (parsed.point, parsed.action, parsed.hit) == (plan.point, plan.action, plan.hit)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "spool.nowhere:crash",
            "MTRKMTA_FAULTS: unknown point 'spool.nowhere'; known: spool.write",
        ),
        (
            "spool.write:explode",
            "MTRKMTA_FAULTS: unknown action 'explode'; known: crash, enospc, eio",
        ),
        ("spool.write", "MTRKMTA_FAULTS='spool.write': expected point:action[:hit]"),
        ("spool.write:eio:0", "MTRKMTA_FAULTS: hit count '0' is not a number >= 1"),
    ],
)
def test_a_bad_spec_is_one_line(spec, message):
    with pytest.raises(FaultSpecError) as caught:
        FaultPlan.parse(spec)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_an_error_is_raised_once_at_the_nth_time_only():
    plan = FaultPlan.parse("maildir.write:eio:2")
    plan.reached("maildir.write")
    plan.reached("spool.write")  # other points do not count
    with pytest.raises(OSError) as caught:
        plan.reached("maildir.write")
    assert caught.value.errno == errno.EIO
    assert "injected at maildir.write" in str(caught.value)
    plan.reached("maildir.write")  # once only: the retry succeeds


def test_enospc():
    with pytest.raises(OSError) as caught:
        FaultPlan.parse("spool.write:enospc").reached("spool.write")
    assert caught.value.errno == errno.ENOSPC


class Recorder:
    def __init__(self) -> None:
        self.points: list[str] = []

    def reached(self, point: str) -> None:
        self.points.append(point)


def test_reply_sent_is_reached_after_the_250_was_written():
    clock = MemoryReactorClock()
    faults = Recorder()
    factory = SMTPServerFactory(
        ServerSettings(hostname="mx.example.test"), RecordingReceiver(), clock, faults
    )
    client = Client(factory)
    lines = client.send(
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@x.example>\r\nDATA\r\n"
        b"Subject: x\r\n\r\nbody\r\n.\r\n"
    )
    assert lines[-1].startswith(b"250 2.0.0 Ok: queued as ")
    # Written to the transport, which the reactor sends on its next pass: the point comes
    # from a timed call that schedules another (a real reactor polls the socket between).
    assert faults.points == []
    assert len(clock.getDelayedCalls()) >= 1
    clock.advance(0)
    assert faults.points == ["smtp.reply_sent"]
    client.close()


def test_no_reply_sent_point_after_a_refusal():
    clock = MemoryReactorClock()
    faults = Recorder()
    receiver = RecordingReceiver()
    receiver.fail_accept = True
    factory = SMTPServerFactory(ServerSettings(hostname="mx.example.test"), receiver, clock, faults)
    client = Client(factory)
    lines = client.send(
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@x.example>\r\nDATA\r\n"
        b"Subject: x\r\n\r\nbody\r\n.\r\n"
    )
    assert lines[-1].startswith(b"451 4.3.0")
    clock.advance(0)
    clock.advance(0)
    assert faults.points == []
    client.close()
