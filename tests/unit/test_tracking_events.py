"""The events of a message's timeline: detail values bounded and escaped, encoded and read back."""

from __future__ import annotations

from mtrkmta.tracking.events import (
    MAX_ADDRESSES,
    MAX_VALUE,
    arrival_event,
    bounded,
    decode_detail,
    detail,
    encode_detail,
    event_row,
    outcome_event,
    row_event,
)
from mtrkmta.tracking.interfaces import Event, EventKind, RecipientState, RecipientUpdate


def test_a_value_from_the_wire_is_cut_to_a_bound_then_escaped():
    assert bounded("x" * MAX_VALUE) == "x" * MAX_VALUE
    long = bounded("y" * (10 * MAX_VALUE))
    assert long.replace(" ", "") == "y" * MAX_VALUE + "..."  # spaces break long runs
    # A line break or a control character cannot end or forge a line where it is shown.
    assert bounded("250 ok\r\nX-Forged: 1\x00\u2028") == (
        "250 ok\\x{0D}\\x{0A}X-Forged: 1\\x{00}\\x{2028}"
    )
    assert bounded("Zoë") == "Zoë"  # printable non-ASCII letters stay
    assert bounded(42) == "42"


def test_detail_keeps_the_order_given_and_leaves_out_what_is_not_there():
    assert detail(status="4.2.1", relay=None, diagnostic="", next_attempt=7) == (
        ("status", "4.2.1"),
        ("next_attempt", "7"),
    )


def test_detail_round_trips_through_json_and_garbage_reads_as_one_value():
    pairs = detail(status="5.1.1", diagnostic='smtp; 550 "no" \\ such')
    assert decode_detail(encode_detail(pairs)) == pairs
    assert decode_detail(None) == ()
    assert decode_detail("not json\n") == (("detail", "not json\\x{0A}"),)
    assert decode_detail('["a list"]') == (("detail", '["a list"]'),)
    # Stored text is bounded again when read, whatever wrote it.
    assert decode_detail('{"k": "' + "z" * (2 * MAX_VALUE) + '\\u0007"}') == (
        ("k", bounded("z" * (2 * MAX_VALUE))),
    )


def test_an_arrival_names_the_client_and_the_transaction_escaped():
    row = {
        "queue_id": "Q1",
        "client_helo": "evil\r\nhelo",
        "client_address": "192.0.2.9",
        "client_port": 2525,
        "client_listener": "smtp",
        "client_protocol": "ESMTPS",
        "client_authenticated_as": None,
        "sender": "a@b.example",
        "envid": None,
        "size": 10,
    }
    event = arrival_event(row, 3, 1_700_000_000.9)
    assert (event.queue_id, event.recipient, event.time, event.kind) == (
        "Q1",
        None,
        1_700_000_000,
        EventKind.ARRIVED,
    )
    assert event.get("client") == "evil\\x{0D}\\x{0A}helo [192.0.2.9]:2525"
    assert event.get("authenticated_as") is None
    assert event.get("recipients") == "3"


def test_an_outcome_event_follows_the_state_unless_told_its_kind():
    deferred = RecipientUpdate(
        2,
        RecipientState.DEFERRED,
        "4.4.1",
        remote_mta="dns; mx.example",
        next_attempt=100.7,
    )
    event = outcome_event("Q", deferred, 50.0)
    assert (event.kind, event.recipient, event.time) == (EventKind.DEFERRED, 2, 50)
    assert dict(event.detail) == {
        "status": "4.4.1",
        "relay": "dns; mx.example",
        "next_attempt": "100",
    }
    bounced = RecipientUpdate(0, RecipientState.FAILED, "5.0.0", event=EventKind.BOUNCED)
    assert outcome_event("Q", bounced, 1).kind is EventKind.BOUNCED
    many = tuple(f"t{i}@example.org" for i in range(MAX_ADDRESSES + 3))
    expanded = RecipientUpdate(0, RecipientState.EXPANDED, "2.1.5", produced=many)
    produced = outcome_event("Q", expanded, 1).get("produced")
    assert produced is not None and produced.endswith(
        f"t{MAX_ADDRESSES - 1}@example.org (and 3 more)"
    )


def test_an_event_row_reads_back_as_the_event():
    event = Event("Q", 1, 99, EventKind.DSN_SENT, (("action", "failed"),))
    assert row_event(event_row(event)) == event
    assert event_row(event)["detail"] == '{"action":"failed"}'
