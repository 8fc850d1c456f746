"""DSN policy: the rules of RFC 3461 §5.2.2-§5.2.7, null senders, delay warnings and batching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtrkmta.dsn.policy import (
    BATCH_ORDER,
    DSN_ACTIONS,
    Batch,
    DsnEvent,
    delay_warning_due,
    event_for_state,
    group,
    is_null_sender,
    notification_for,
)
from mtrkmta.tracking.interfaces import RecipientState

SENDER = "alice@client.example.org"

ABSENT = None
NEVER = frozenset({"NEVER"})
SUCCESS = frozenset({"SUCCESS"})
FAILURE = frozenset({"FAILURE"})
DELAY = frozenset({"DELAY"})
FAILURE_DELAY = frozenset({"FAILURE", "DELAY"})
SUCCESS_DELAY = frozenset({"SUCCESS", "DELAY"})
SUCCESS_FAILURE = frozenset({"SUCCESS", "FAILURE"})
ALL = frozenset({"SUCCESS", "FAILURE", "DELAY"})

D = DsnEvent

TABLE = [
    # -- delivered to mailbox or LDA ---------------------------------------------------
    # RFC 3461 §5.2.3 (c)
    pytest.param(D.DELIVERED, ABSENT, None, id="delivered-absent"),
    # RFC 3461 §5.2.3 (b)
    pytest.param(D.DELIVERED, NEVER, None, id="delivered-never"),
    # RFC 3461 §5.2.3 (a)
    pytest.param(D.DELIVERED, SUCCESS, "delivered", id="delivered-has"),
    # RFC 3461 §5.2.3 (a)
    pytest.param(D.DELIVERED, ALL, "delivered", id="delivered-has-all"),
    # RFC 3461 §5.2.3 (b)
    pytest.param(D.DELIVERED, FAILURE_DELAY, None, id="delivered-lacks"),
    # -- accepted by a list exploder -----------------------------------------------------
    # RFC 3461 §5.2.7.1, §5.2.3 (c)
    pytest.param(D.LIST_ACCEPTED, ABSENT, None, id="list-absent"),
    # RFC 3461 §5.2.7.1, §5.2.3 (b)
    pytest.param(D.LIST_ACCEPTED, NEVER, None, id="list-never"),
    # RFC 3461 §5.2.7.1
    pytest.param(D.LIST_ACCEPTED, SUCCESS, "delivered", id="list-has"),
    # RFC 3461 §5.2.7.1, §5.2.3 (b)
    pytest.param(D.LIST_ACCEPTED, FAILURE, None, id="list-lacks"),
    # -- relayed to a non-DSN SMTP server, RCPT got 2xx ----------------------------------------
    # RFC 3461 §5.2.2 (e)
    pytest.param(D.RELAYED, ABSENT, None, id="relayed-absent"),
    # RFC 3461 §5.2.2 (d)
    pytest.param(D.RELAYED, NEVER, None, id="relayed-never"),
    # RFC 3461 §5.2.2 (b)
    pytest.param(D.RELAYED, SUCCESS, "relayed", id="relayed-has"),
    # RFC 3461 §5.2.2 (b)
    pytest.param(D.RELAYED, SUCCESS_DELAY, "relayed", id="relayed-has-2"),
    # RFC 3461 §5.2.2 (b)
    pytest.param(D.RELAYED, FAILURE_DELAY, None, id="relayed-lacks"),
    # -- relayed to a non-DSN SMTP server, RCPT got 5xx ----------------------------------------
    # RFC 3461 §5.2.2 (f)
    pytest.param(D.RELAY_REJECTED, ABSENT, "failed", id="rejected-absent"),
    # RFC 3461 §5.2.2 (d)
    pytest.param(D.RELAY_REJECTED, NEVER, None, id="rejected-never"),
    # RFC 3461 §5.2.2 (c)
    pytest.param(D.RELAY_REJECTED, FAILURE, "failed", id="rejected-has"),
    # RFC 3461 §5.2.2 (c)
    pytest.param(D.RELAY_REJECTED, ALL, "failed", id="rejected-has-all"),
    # RFC 3461 §5.2.6 (b)
    pytest.param(D.RELAY_REJECTED, SUCCESS_DELAY, None, id="rejected-lacks"),
    # -- gatewayed, the foreign side cannot confirm ---------------------------------------------
    # RFC 3461 §5.2.4 (d)
    pytest.param(D.GATEWAYED, ABSENT, None, id="gatewayed-absent"),
    # RFC 3461 §5.2.4 (c)
    pytest.param(D.GATEWAYED, NEVER, None, id="gatewayed-never"),
    # RFC 3461 §5.2.4 (b)
    pytest.param(D.GATEWAYED, SUCCESS, "relayed", id="gatewayed-has"),
    # RFC 3461 §5.2.4 (b)
    pytest.param(D.GATEWAYED, FAILURE, None, id="gatewayed-lacks"),
    # -- failed here ----------------------------------------------------------------------------
    # RFC 3461 §5.2.6 (c)
    pytest.param(D.FAILED, ABSENT, "failed", id="failed-absent"),
    # RFC 3461 §5.2.6 (b)
    pytest.param(D.FAILED, NEVER, None, id="failed-never"),
    # RFC 3461 §5.2.6 (a)
    pytest.param(D.FAILED, FAILURE, "failed", id="failed-has"),
    # RFC 3461 §5.2.6 (a)
    pytest.param(D.FAILED, SUCCESS_FAILURE, "failed", id="failed-has-2"),
    # RFC 3461 §5.2.6 (b)
    pytest.param(D.FAILED, SUCCESS_DELAY, None, id="failed-lacks"),
    # RFC 3461 §5.2.6 (b)
    pytest.param(D.FAILED, DELAY, None, id="failed-lacks-2"),
    # -- delayed unusually long (a MAY; we send when allowed, doc/conformance.rst 3461-P1) ---
    # RFC 3461 §5.2.5 (b)
    pytest.param(D.DELAYED, ABSENT, "delayed", id="delayed-absent"),
    # RFC 3461 §4.1, §5.2.5 (c)
    pytest.param(D.DELAYED, NEVER, None, id="delayed-never"),
    # RFC 3461 §5.2.5 (a)
    pytest.param(D.DELAYED, DELAY, "delayed", id="delayed-has"),
    # RFC 3461 §5.2.5 (a)
    pytest.param(D.DELAYED, FAILURE_DELAY, "delayed", id="delayed-has-2"),
    # RFC 3461 §5.2.5 (c)
    pytest.param(D.DELAYED, SUCCESS_FAILURE, None, id="delayed-lacks"),
    # -- multi-recipient alias, option (c), doc/conformance.rst 3461-P2 ----------------------------
    # RFC 3461 §5.2.7.3 (c), doc/conformance.rst 3461-P2
    pytest.param(D.EXPANDED, ABSENT, None, id="expanded-absent"),
    # RFC 3461 §4.1, §5.2.7.3 (c), doc/conformance.rst 3461-P2
    pytest.param(D.EXPANDED, NEVER, None, id="expanded-never"),
    # RFC 3461 §5.2.7.3 (c), doc/conformance.rst 3461-P2
    pytest.param(D.EXPANDED, SUCCESS, "expanded", id="expanded-has"),
    # RFC 3461 §5.2.7.3 (c), doc/conformance.rst 3461-P2
    pytest.param(D.EXPANDED, FAILURE_DELAY, None, id="expanded-lacks"),
]


@pytest.mark.parametrize(("event", "notify", "expected"), TABLE)
def test_notification_table_by_event_and_notify(event, notify, expected):
    assert notification_for(event, notify, sender=SENDER, dsn_passed=False) == expected


def test_table_covers_every_event_and_column():
    seen = {(case.values[0], _column(case.values[0], case.values[1])) for case in TABLE}
    columns = {"absent", "never", "has", "lacks"}
    assert seen == {(event, column) for event in DsnEvent for column in columns}


_KEYWORD = {
    D.DELIVERED: "SUCCESS",
    D.LIST_ACCEPTED: "SUCCESS",
    D.RELAYED: "SUCCESS",
    D.GATEWAYED: "SUCCESS",
    D.EXPANDED: "SUCCESS",
    D.RELAY_REJECTED: "FAILURE",
    D.FAILED: "FAILURE",
    D.DELAYED: "DELAY",
}


def _column(event: DsnEvent, notify: frozenset[str] | None) -> str:
    if notify is None:
        return "absent"
    if "NEVER" in notify:
        return "never"
    return "has" if _KEYWORD[event] in notify else "lacks"


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (D.DELIVERED, None),  # RFC 3461 §5.2.1: the DSN-capable LDA reports delivery itself
        (D.LIST_ACCEPTED, None),  # RFC 3461 §5.2.1: duty passed on
        (D.RELAYED, None),  # RFC 3461 §5.2.1: relay to a DSN server, no `relayed`
        (D.GATEWAYED, None),  # RFC 3461 §5.2.4 (a): foreign side will notify
        (D.EXPANDED, "expanded"),  # doc/conformance.rst 3461-P2: SUCCESS stripped
        (D.RELAY_REJECTED, "failed"),  # RFC 3461 §5.2.2 (c): not accepted
        (D.FAILED, "failed"),  # RFC 3461 §5.2.6 (a)
        (D.DELAYED, "delayed"),  # RFC 3461 §5.2.5 (a): still in our queue
    ],
)
def test_dsn_passed_on_suppresses_only_success_reports(event, expected):
    assert notification_for(event, ALL, sender=SENDER, dsn_passed=True) == expected


@pytest.mark.parametrize("sender", ["", "<>", " "])
@pytest.mark.parametrize("event", list(DsnEvent))
@pytest.mark.parametrize("notify", [ABSENT, ALL, FAILURE])
def test_null_sender_never_gets_a_dsn(sender, event, notify):
    # RFC 3461 §5.2 NOTE: MUST NOT for MAIL FROM:<>.
    assert notification_for(event, notify, sender=sender, dsn_passed=False) is None


def test_is_null_sender():
    assert is_null_sender("")
    assert is_null_sender("<>")
    assert not is_null_sender("a@b.example")


def test_notify_keywords_in_any_case():
    # RFC 3461 §4.1: NOTIFY keywords are case-insensitive.
    assert notification_for(D.DELIVERED, frozenset({"success"}), sender=SENDER, dsn_passed=False)
    assert notification_for(D.FAILED, frozenset({"never"}), sender=SENDER, dsn_passed=False) is None


notify_values = st.one_of(
    st.none(),
    st.just(NEVER),
    st.frozensets(st.sampled_from(["SUCCESS", "FAILURE", "DELAY"]), min_size=1),
)


@given(event=st.sampled_from(list(DsnEvent)), notify=notify_values, passed=st.booleans())
def test_action_is_a_dsn_action_and_fits_the_request(event, notify, passed):
    action = notification_for(event, notify, sender=SENDER, dsn_passed=passed)
    # RFC 3464 §2.3.3, doc/conformance.rst 3886-P4: never transferred/opaque in a DSN.
    assert action is None or action in DSN_ACTIONS
    if notify == NEVER:
        assert action is None  # 3461 §4.1: NEVER means no DSN at all
    if action in ("delivered", "relayed", "expanded"):
        # RFC 3464 §2.3.3: success reports only when SUCCESS was asked (RFC 3461 §5.2.3, §5.2.2).
        assert notify is not None and "SUCCESS" in notify
    if notify is not None and "FAILURE" in notify and event in (D.FAILED, D.RELAY_REJECTED):
        assert action == "failed"  # 3461 §5.2.6 (a): MUST


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (RecipientState.DELIVERED, D.DELIVERED),
        (RecipientState.RELAYED, D.RELAYED),
        (RecipientState.TRANSFERRED, D.RELAYED),
        (RecipientState.EXPANDED, D.EXPANDED),
        (RecipientState.FAILED, D.FAILED),
        (RecipientState.DEFERRED, D.DELAYED),
        (RecipientState.QUEUED, None),
        (RecipientState.INFLIGHT, None),
    ],
)
def test_event_for_state(state, event):
    assert event_for_state(state) is event


def test_every_state_is_mapped_or_in_queue():
    for state in RecipientState:
        assert (event_for_state(state) is None) == (
            state in (RecipientState.QUEUED, RecipientState.INFLIGHT)
        )


# -- delay warnings --------------------------------------------------------------------------

ARRIVAL = 1_700_000_000.0
FOUR_HOURS = 4 * 3600.0


def test_delay_warning_not_before_the_threshold():
    assert not delay_warning_due(ARRIVAL, ARRIVAL + FOUR_HOURS - 1, False, FOUR_HOURS)


def test_delay_warning_due_at_and_after_the_threshold():
    assert delay_warning_due(ARRIVAL, ARRIVAL + FOUR_HOURS, False, FOUR_HOURS)
    assert delay_warning_due(ARRIVAL, ARRIVAL + 3 * FOUR_HOURS, False, FOUR_HOURS)


def test_delay_warning_only_once():
    assert not delay_warning_due(ARRIVAL, ARRIVAL + 3 * FOUR_HOURS, True, FOUR_HOURS)


@pytest.mark.parametrize("setting", [0.0, -1.0])
def test_delay_warning_disabled(setting):
    assert not delay_warning_due(ARRIVAL, ARRIVAL + 10 * FOUR_HOURS, False, setting)


@given(
    elapsed=st.floats(min_value=0, max_value=1e7),
    threshold=st.floats(min_value=1, max_value=1e7),
    warned=st.booleans(),
)
def test_delay_warning_property(elapsed, threshold, warned):
    due = delay_warning_due(ARRIVAL, ARRIVAL + elapsed, warned, threshold)
    assert due == (not warned and (ARRIVAL + elapsed) - ARRIVAL >= threshold)


# -- batching --------------------------------------------------------------------------------


def test_group_leaves_out_recipients_that_did_not_ask():
    # RFC 3461 §5.2.8: no information on recipients that did not ask.
    batches = group([("a", "failed"), ("b", None), ("c", "failed")])
    assert batches == [Batch("failed", ("a", "c"))]


def test_group_one_batch_per_action_bad_news_first():
    batches = group(
        [
            ("r1", "relayed"),
            ("d1", "delivered"),
            ("f1", "failed"),
            ("w1", "delayed"),
            ("d2", "delivered"),
            ("e1", "expanded"),
            ("f2", "failed"),
        ]
    )
    assert batches == [
        Batch("failed", ("f1", "f2")),
        Batch("delayed", ("w1",)),
        Batch("delivered", ("d1", "d2")),
        Batch("expanded", ("e1",)),
        Batch("relayed", ("r1",)),
    ]
    assert [b.action for b in batches] == list(BATCH_ORDER)


def test_group_of_nothing():
    assert group([]) == []
    assert group([("a", None)]) == []


@pytest.mark.parametrize("action", ["transferred", "opaque", "bogus"])
def test_group_refuses_actions_a_dsn_cannot_carry(action):
    # RFC 3464 §2.3.3, doc/conformance.rst 3886-P4.
    with pytest.raises(ValueError, match="cannot appear in a DSN"):
        group([("a", action)])


@given(
    st.lists(st.tuples(st.integers(), st.sampled_from([None, *sorted(DSN_ACTIONS)])), max_size=30)
)
def test_group_partitions_exactly_the_asking_recipients(items):
    batches = group(items)
    flattened = [(r, b.action) for b in batches for r in b.recipients]
    assert sorted(flattened, key=repr) == sorted(
        [(r, a) for r, a in items if a is not None], key=repr
    )
    assert len({b.action for b in batches}) == len(batches)
