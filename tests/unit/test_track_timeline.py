"""The timeline of a followed trace: events across hops in time order, their texts, the
JSON shape, `mtrkmta track`'s rendering, --watch on a clock and the exit statuses."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.testing import MemoryReactorClock

from mtrkmta.cli import track
from mtrkmta.mtqp.client import Hop, Trace, recipient_paths
from mtrkmta.mtqp.timeline import entry_text, timeline, trace_json, utc_when
from mtrkmta.tracking.interfaces import Event, EventKind
from mtrkmta.tracking.status import (
    DELIVER_BY_FIELD,
    RecipientStatus,
    TrackingReport,
    TypedValue,
    event_fields,
    parse_related,
    render_related,
)

ENVID = "k2J9@client.example.test"
URI = f"mtqp://a.example/track/{ENVID}/AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
T0 = 1_772_366_400  # 2026-03-01 12:00:00 UTC
RCPT = "bob@dest.example"


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, timezone.utc)


def event(offset: int, kind: EventKind, index: int | None = 0, **detail: str) -> Event:
    return Event("Q", index, T0 + offset, kind, tuple(detail.items()))


def block(action: str, code: str, *events: Event, remote: str | None = None) -> RecipientStatus:
    return RecipientStatus(
        TypedValue("rfc822", RCPT),
        TypedValue("rfc822", RCPT),
        action,
        code,
        remote_mta=None if remote is None else TypedValue("dns", remote),
        last_attempt_date=at(0) if remote else None,
        extensions=event_fields(events),
    )


def answer(mta: str, status: RecipientStatus, *message_events: Event) -> TrackingReport:
    report = TrackingReport(
        ENVID, TypedValue("dns", mta), at(0), (status,), event_fields(message_events)
    )
    # Through the wire and the existing parser, as a client gets it.
    (parsed,) = parse_related(render_related([report]))
    return parsed


def two_hops(final: RecipientStatus | None = None, *second_events: Event) -> Trace:
    first = answer(
        "mx-a.example",
        block(
            "transferred",
            "2.4.0",
            event(
                5,
                EventKind.DEFERRED,
                status="4.4.1",
                relay="mx-b.example[127.0.0.1]:25",
                diagnostic="x-local; connect to mx-b[127.0.0.1]:25: Connection refused",
                next_attempt=str(T0 + 305),
            ),
            event(305, EventKind.TRANSFERRED, status="2.4.0", relay="mx-b.example[127.0.0.1]:25"),
            event(306, EventKind.DSN_SENT, action="delayed"),
            remote="mx-b.example",
        ),
        event(0, EventKind.ARRIVED, None, protocol="ESMTPSA", recipients="1"),
    )
    second = answer(
        "mx-b.example",
        final
        or block(
            "delivered",
            "2.1.5",
            event(307, EventKind.DELIVERED, status="2.1.5", relay="lmtp[127.0.0.1]:24"),
        ),
        event(305, EventKind.ARRIVED, None, protocol="ESMTP"),
        *second_events,
    )
    hops = (
        Hop("mx-a.example", reports=(first,)),
        Hop("mx-b.example", referred_by="mx-a.example", reports=(second,)),
    )
    return Trace(ENVID, hops, recipient_paths(hops))


def test_events_of_every_hop_in_time_order_with_plain_texts():
    entries = timeline(two_hops())
    assert [(e.hop, e.kind, e.time) for e in entries] == [
        (1, "arrived", at(0)),
        (1, "deferred", at(5)),
        (1, "transferred", at(305)),
        (2, "arrived", at(305)),
        (1, "dsn-sent", at(306)),
        (2, "delivered", at(307)),
    ]
    texts = [entry_text(e, utc_when) for e in entries]
    assert texts == [
        "accepted by mx-a.example over ESMTPSA",
        "attempt failed: 4.4.1 No answer from host (connect to mx-b[127.0.0.1]:25: Connection "
        "refused); next attempt 2026-03-01 12:05:05 UTC",
        "transferred to mx-b.example[127.0.0.1]:25, which tracks it on "
        "(2.4.0 Other or undefined network or routing status)",
        "accepted by mx-b.example over ESMTP",
        "delivery status notification sent to the sender (delayed)",
        "delivered by lmtp[127.0.0.1]:24: 2.1.5 Destination address valid",
    ]
    assert entries[1].recipient == RCPT and entries[0].recipient is None


def test_administrator_actions_are_said_as_such():
    bounced = block(
        "failed",
        "5.0.0",
        event(310, EventKind.HELD, None, reason="held by the administrator"),
        event(320, EventKind.RELEASED, None),
        event(
            330,
            EventKind.BOUNCED,
            status="5.0.0",
            diagnostic="x-local; connect to mx-c[127.0.0.1]:25: Connection refused",
            by="the administrator",
        ),
    )
    entries = timeline(two_hops(bounced))
    mine = [e for e in entries if e.hop == 2]
    assert [(e.kind, e.by_administrator, entry_text(e, utc_when)) for e in mine] == [
        ("arrived", False, "accepted by mx-b.example over ESMTP"),
        ("held", True, "held by the administrator"),
        ("released", True, "released by the administrator"),
        (
            "bounced",
            True,
            "bounced by the administrator: 5.0.0 Other or undefined status; the last attempt "
            "said: connect to mx-c[127.0.0.1]:25: Connection refused",
        ),
    ]


def test_a_block_without_the_extension_still_tracks():
    # Another MTA's answer: RFC 3886 fields only (RFC 3464 §2.4: no events to read).
    plain = TrackingReport(
        ENVID,
        TypedValue("dns", "legacy.example"),
        at(0),
        (
            RecipientStatus(
                TypedValue("rfc822", RCPT),
                TypedValue("rfc822", RCPT),
                "delayed",
                "4.2.2",
                remote_mta=TypedValue("dns", "mx.dest.example"),
                last_attempt_date=at(60),
                will_retry_until=at(86400),
                extensions=(("Diagnostic-Code", "smtp; 452 mailbox full"),),
            ),
        ),
    )
    hops = (Hop("legacy.example", reports=(plain,)),)
    trace = Trace(ENVID, hops, recipient_paths(hops))
    entries = timeline(trace)
    assert [(e.kind, e.time) for e in entries] == [("arrived", at(0)), ("deferred", at(60))]
    assert entry_text(entries[1], utc_when) == (
        "attempt failed: 4.2.2 Mailbox full (452 mailbox full); "
        "will retry until 2026-03-02 12:00:00 UTC"
    )
    assert track.exit_status(trace) == track.EXIT_INCOMPLETE


def test_trace_json_has_events_and_each_recipient_diagnostic():
    data = trace_json(two_hops())
    deferred = data["events"][1]
    assert deferred == {
        "time": "2026-03-01T12:00:05+00:00",
        "elapsed": 5,
        "hop": 1,
        "reporting_mta": "mx-a.example",
        "recipient": RCPT,
        "kind": "deferred",
        "status": "4.4.1",
        "meaning": "no answer from host",
        "diagnostic": "x-local; connect to mx-b[127.0.0.1]:25: Connection refused",
        "relay": "mx-b.example[127.0.0.1]:25",
        "next_attempt": "2026-03-01T12:05:05+00:00",
        "by_administrator": False,
        "text": (
            "attempt failed: 4.4.1 No answer from host (connect to mx-b[127.0.0.1]:25: "
            "Connection refused); next attempt 2026-03-01 12:05:05 UTC"
        ),
    }
    assert [e["elapsed"] for e in data["events"]] == [0, 5, 305, 305, 306, 307]
    assert data["events_omitted"] == 0
    assert data["recipients"][0]["diagnostic"] is None  # delivered: no Diagnostic-Code
    assert [h["reports"][0]["reporting_mta"] for h in data["hops"]] == [
        "dns; mx-a.example",
        "dns; mx-b.example",
    ]


def test_left_out_events_are_counted_not_listed():
    retries = [event(600 * n, EventKind.DEFERRED, status="4.4.1") for n in range(100)]
    trace = two_hops(block("delayed", "4.4.1", *retries))
    entries = timeline(trace)
    (gap,) = [e for e in entries if e.kind == "omitted"]
    assert entry_text(gap, utc_when) == "60 more events left out"
    data = trace_json(trace)
    assert data["events_omitted"] == 60
    assert all(e["kind"] != "omitted" for e in data["events"])


def test_render_timeline_with_elapsed_times_meanings_and_the_next_attempt():
    waiting = block(
        "delayed",
        "4.4.1",
        event(400, EventKind.DEFERRED, status="4.4.1", next_attempt=str(T0 + 1000)),
    )
    out = io.StringIO()
    track.render_timeline(two_hops(waiting), out, timezone.utc)
    assert out.getvalue() == (
        f"Envelope id {ENVID}\n"
        "\n"
        "Hop 1: mx-a.example\n"
        "Hop 2: mx-b.example, referred by mx-a.example\n"
        "\n"
        "Timeline\n"
        "  2026-03-01 12:00:00 +0000      +0s  hop 1  accepted by mx-a.example over ESMTPSA\n"
        "  2026-03-01 12:00:05 +0000      +5s  hop 1  bob@dest.example: attempt failed: 4.4.1 "
        "No answer from host (connect to mx-b[127.0.0.1]:25: Connection refused); "
        "next attempt 12:05:05\n"
        "  2026-03-01 12:05:05 +0000   +5m05s  hop 1  bob@dest.example: transferred to "
        "mx-b.example[127.0.0.1]:25, which tracks it on "
        "(2.4.0 Other or undefined network or routing status)\n"
        "  2026-03-01 12:05:05 +0000   +5m05s  hop 2  accepted by mx-b.example over ESMTP\n"
        "  2026-03-01 12:05:06 +0000   +5m06s  hop 1  bob@dest.example: delivery status "
        "notification sent to the sender (delayed)\n"
        "  2026-03-01 12:06:40 +0000   +6m40s  hop 2  bob@dest.example: attempt failed: 4.4.1 "
        "No answer from host; next attempt 12:16:40\n"
        "\n"
        "Result: not finished\n"
        "  bob@dest.example: still queued at mx-b.example (4.4.1: no answer from host), "
        "next attempt 2026-03-01 12:16:40 +0000, will retry until unknown\n"
    )


@pytest.mark.parametrize(
    ("marks", "said"),
    [
        (
            (event(400, EventKind.HELD, None, reason="held by the administrator"),),
            "held at mx-b.example by the administrator: not tried until it is released",
        ),
        (
            (event(400, EventKind.HELD, None, reason="internal error"),),
            "held at mx-b.example (internal error): not tried until it is released",
        ),
        (
            (
                event(400, EventKind.HELD, None, reason="held by the administrator"),
                event(500, EventKind.RELEASED, None),
            ),
            "still queued at mx-b.example (4.0.0: other or undefined status), "
            "will retry until unknown",
        ),
    ],
)
def test_a_held_message_is_said_held_not_delayed(marks, said):
    # RFC 3886 has no action for a hold: the answer says "delayed"; the events tell.
    waiting = block("delayed", "4.0.0")
    out = io.StringIO()
    track.render_timeline(two_hops(waiting, *marks), out, timezone.utc)
    assert out.getvalue().endswith(f"Result: not finished\n  bob@dest.example: {said}\n")


def test_elapsed_times():
    assert [track.elapsed(s) for s in (0, 59, 134, 3600 + 300, 2 * 86400 + 4 * 3600)] == [
        "+0s",
        "+59s",
        "+2m14s",
        "+1h05m",
        "+2d04h",
    ]


def test_exit_status_failed_wins_then_pending_then_done():
    delivered = two_hops()
    assert track.exit_status(delivered) == track.EXIT_COMPLETE == 0
    pending = two_hops(block("delayed", "4.4.1"))
    assert track.exit_status(pending) == track.EXIT_INCOMPLETE == 1
    failed = two_hops(block("failed", "5.1.1"))
    assert track.exit_status(failed) == track.EXIT_FAILED == 2
    other = RecipientStatus(
        TypedValue("rfc822", "carol@dest.example"),
        TypedValue("rfc822", "carol@dest.example"),
        "delayed",
        "4.4.1",
    )
    report = TrackingReport(
        ENVID, TypedValue("dns", "x.example"), at(0), (block("failed", "5.1.1"), other)
    )
    mixed = Trace(ENVID, (Hop("x.example", reports=(report,)),))
    mixed = Trace(ENVID, mixed.hops, recipient_paths(mixed.hops))
    assert track.exit_status(mixed) == 2  # failed wins over pending
    assert track.exit_status(Trace(ENVID, (Hop("x.example", error="noinfo"),))) == 1


def test_watch_interval_default_given_and_bounded():
    options = track.TrackOptions()
    options.parseOptions(["--watch", URI])
    assert options["interval"] == track.WATCH_DEFAULT == 30
    options = track.TrackOptions()
    options.parseOptions([URI, "--watch", "12"])
    assert (options["interval"], options["host"]) == (12, "a.example")
    options = track.TrackOptions()
    options.parseOptions([URI])
    assert options["interval"] is None


def result(d: Deferred) -> Any:
    found: list[Any] = []
    d.addBoth(found.append)
    assert found, "not fired"
    return found[0]


def test_watch_asks_again_on_the_clock_and_prints_each_new_event_once():
    clock = MemoryReactorClock()
    waiting = two_hops(block("delayed", "4.4.1", event(400, EventKind.DEFERRED, status="4.4.1")))
    answers = [waiting, waiting, two_hops()]
    asked: list[float] = []

    def follow() -> Deferred[Trace]:
        asked.append(clock.seconds())
        return succeed(answers.pop(0))

    out = io.StringIO()
    d = ensureDeferred(track.watch(follow, clock, out, 30, timezone.utc))
    assert asked == [0] and not d.called
    first = out.getvalue()
    assert first.count("hop 2  bob@dest.example: attempt failed") == 1
    clock.advance(29.9)
    assert asked == [0]
    clock.advance(0.1)
    assert asked == [0, 30] and out.getvalue() == first  # nothing new: nothing printed
    clock.advance(30)
    assert asked == [0, 30, 60]
    assert result(d) == 0
    new = out.getvalue()[len(first) :]
    assert new == (
        "  2026-03-01 12:05:07 +0000   +5m07s  hop 2  bob@dest.example: delivered by "
        "lmtp[127.0.0.1]:24: 2.1.5 Destination address valid\n"
        "\n"
        "Result: every recipient reached a final state\n"
        "  bob@dest.example: delivered (2.1.5: destination address valid) at mx-b.example\n"
    )
    assert out.getvalue().count("Hop 1: mx-a.example\n") == 1


def test_watch_ends_with_the_failed_status():
    clock = MemoryReactorClock()
    d = ensureDeferred(
        track.watch(lambda: succeed(two_hops(block("failed", "5.1.1"))), clock, io.StringIO(), 5)
    )
    assert result(d) == 2


@pytest.mark.parametrize("seconds", ["4", "0"])
def test_watch_more_often_than_every_5_seconds_is_refused(seconds):
    err = io.StringIO()
    assert track.main(["--watch", seconds, URI], out=io.StringIO(), err=err) == 64
    assert "--watch SECONDS is at least 5" in err.getvalue()


def test_a_hop_events_come_after_the_transfer_that_referred_to_it():
    # Whole seconds, or a clock behind: B's arrival says 12:05:04, A's transfer 12:05:05.
    trace = two_hops()
    late = answer(
        "mx-b.example",
        block("delivered", "2.1.5", event(304, EventKind.DELIVERED, status="2.1.5")),
        event(303, EventKind.ARRIVED, None),
    )
    hops = (trace.hops[0], Hop("mx-b.example", referred_by="mx-a.example", reports=(late,)))
    entries = timeline(Trace(ENVID, hops, recipient_paths(hops)))
    assert [(e.hop, e.kind) for e in entries] == [
        (1, "arrived"),
        (1, "deferred"),
        (1, "transferred"),
        (2, "arrived"),
        (2, "delivered"),
        (1, "dsn-sent"),
    ]
    assert entries[3].time == at(303)  # shown as the hop said


def test_queued_means_not_tried_yet_from_fields_and_put_back_from_an_event():
    untried = TrackingReport(
        ENVID,
        TypedValue("dns", "legacy.example"),
        at(0),
        (
            RecipientStatus(
                TypedValue("rfc822", RCPT), TypedValue("rfc822", RCPT), "delayed", "4.0.0"
            ),
        ),
    )
    hops = (Hop("legacy.example", reports=(untried,)),)
    (_, queued) = timeline(Trace(ENVID, hops, recipient_paths(hops)))
    assert (queued.kind, entry_text(queued, utc_when)) == (
        "queued",
        "waiting for its first attempt",
    )
    back = two_hops(block("delayed", "4.0.0", event(400, EventKind.QUEUED)))
    (requeued,) = [e for e in timeline(back) if e.kind == "queued"]
    assert entry_text(requeued, utc_when) == "put back in the queue"


def test_a_queued_recipient_says_its_deliver_by_time_and_a_bad_one_is_ignored():
    # RFC 2852: the hop reports the deadline of a queued recipient (X-Mtrkmta-Deliver-By).
    waiting = block("delayed", "4.4.1")
    deadline = replace(
        waiting,
        extensions=(*waiting.extensions, (DELIVER_BY_FIELD, "Sun, 01 Mar 2026 13:00:00 +0000")),
    )
    out = io.StringIO()
    track.render_timeline(two_hops(deadline), out, timezone.utc)
    assert out.getvalue().endswith(
        "will retry until unknown, to be delivered by 2026-03-01 13:00:00 +0000\n"
    )
    hostile = replace(waiting, extensions=((DELIVER_BY_FIELD, "tomorrow, I promise"),))
    out = io.StringIO()
    track.render_timeline(two_hops(hostile), out, timezone.utc)
    assert out.getvalue().endswith("will retry until unknown\n")
