"""Tests for mtrkmta.tracking.status: MTSN from the store, rendering, parsing (RFC 3886)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrkmta.envelope import ClientInfo, OriginalRecipient
from mtrkmta.tracking.events import arrival_event, outcome_event
from mtrkmta.tracking.interfaces import (
    Event,
    EventKind,
    RecipientState,
    RecipientUpdate,
    StoredMessage,
    StoredRecipient,
)
from mtrkmta.tracking.status import (
    ACTIONS,
    DEFAULT_STATUS,
    EVENTS_FIRST,
    EVENTS_LAST,
    OMITTED,
    RecipientStatus,
    ReportedEvent,
    TrackingReport,
    TrackingStatusError,
    TypedValue,
    event_field,
    event_fields,
    parse_event,
    parse_related,
    parse_status,
    render_related,
    render_status,
    report_from_store,
    report_from_transactions,
    reported_events,
)

# Every vector here is our own; the RFC 3887 examples are not used (they
# break RFC 3886's own ABNF: field order, missing colons).
EST = timezone(timedelta(hours=-5))
UTC = timezone.utc
ARRIVAL = 1_700_000_000  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = ARRIVAL + 3600


def recipient(index: int = 0, **changes: object) -> StoredRecipient:
    values: dict[str, object] = {
        "index": index,
        "address": f"user{index}@dest.example",
        "orcpt": None,
        "notify": None,
        "final_recipient": f"user{index}@dest.example",
        "state": RecipientState.QUEUED,
    }
    values.update(changes)
    return StoredRecipient(**values)  # type: ignore[arg-type]


def message(*recipients: StoredRecipient, **changes: object) -> StoredMessage:
    values: dict[str, object] = {
        "queue_id": "Q1",
        "node_id": "n1",
        "envid": "k7Xq-0001@origin.example",
        "certifier": b"\x01" * 20,
        "sender": "sender@origin.example",
        "arrival": ARRIVAL,
        "requested_timeout": None,
        "expires_at": ARRIVAL + 9 * 86400,
        "reporting_mta": "mta.relay.example",
        "size": 100,
        "ret": None,
        "body": None,
        "smtputf8": False,
        "auth": None,
        "client": ClientInfo(address="192.0.2.7"),
        "recipients": recipients or (recipient(),),
    }
    values.update(changes)
    return StoredMessage(**values)  # type: ignore[arg-type]


def only(report: TrackingReport) -> RecipientStatus:
    assert len(report.recipients) == 1
    return report.recipients[0]


def field_names(block: bytes) -> list[str]:
    return [line.split(b":", 1)[0].decode() for line in block.split(b"\r\n") if line]


def sample_report() -> TrackingReport:
    return TrackingReport(
        original_envelope_id="tk-0042@origin.example",
        reporting_mta=TypedValue("dns", "mta.example.net"),
        arrival_date=datetime(2024, 3, 5, 8, 9, 10, tzinfo=EST),
        recipients=(
            RecipientStatus(
                original_recipient=TypedValue("rfc822", "Ann@Example.org"),
                final_recipient=TypedValue("rfc822", "ann@example.org"),
                action="delayed",
                status="4.4.1",
                remote_mta=TypedValue("dns", "mx1.example.org"),
                last_attempt_date=datetime(2024, 3, 5, 9, 0, 0, tzinfo=EST),
                will_retry_until=datetime(2024, 3, 10, 8, 9, 10, tzinfo=EST),
            ),
            RecipientStatus(
                original_recipient=TypedValue("rfc822", "bob@example.org"),
                final_recipient=TypedValue("rfc822", "bob@example.org"),
                action="transferred",
                status="2.4.0",
                remote_mta=TypedValue("dns", "mx2.example.org"),
                last_attempt_date=datetime(2024, 3, 5, 9, 0, 5, tzinfo=EST),
                extensions=(("X-Note", "second hop"),),
            ),
        ),
    )


SAMPLE_BYTES = (
    b"Original-Envelope-Id: tk-0042@origin.example\r\n"
    b"Reporting-MTA: dns; mta.example.net\r\n"
    b"Arrival-Date: Tue, 05 Mar 2024 08:09:10 -0500\r\n"
    b"\r\n"
    b"Original-Recipient: rfc822; Ann@Example.org\r\n"
    b"Final-Recipient: rfc822; ann@example.org\r\n"
    b"Action: delayed\r\n"
    b"Status: 4.4.1\r\n"
    b"Remote-MTA: dns; mx1.example.org\r\n"
    b"Last-Attempt-Date: Tue, 05 Mar 2024 09:00:00 -0500\r\n"
    b"Will-Retry-Until: Sun, 10 Mar 2024 08:09:10 -0500\r\n"
    b"\r\n"
    b"Original-Recipient: rfc822; bob@example.org\r\n"
    b"Final-Recipient: rfc822; bob@example.org\r\n"
    b"Action: transferred\r\n"
    b"Status: 2.4.0\r\n"
    b"Remote-MTA: dns; mx2.example.org\r\n"
    b"Last-Attempt-Date: Tue, 05 Mar 2024 09:00:05 -0500\r\n"
    b"X-Note: second hop\r\n"
)


# --- rendering: layout ---------------------------------------------------------------------


class TestRenderLayout:
    def test_own_vector(self):
        # RFC 3886 §3.1-§3.3, RFC 3464 §2.1.1: exact bytes of a two-recipient report
        assert render_status(sample_report()) == SAMPLE_BYTES

    def test_crlf_and_7bit(self):
        # RFC 3886 §3, §3.1: 7bit; every line ends in CRLF
        body = render_status(sample_report())
        assert all(octet < 0x80 for octet in body)
        assert b"\n" not in body.replace(b"\r\n", b"")
        assert body.endswith(b"\r\n")

    def test_blank_line_before_each_recipient_block(self):
        # RFC 3886 §3.1, RFC 3464 §2.1.1: per-message block, then blocks each preceded by a
        # blank line
        blocks = render_status(sample_report()).split(b"\r\n\r\n")
        assert len(blocks) == 3
        assert field_names(blocks[0]) == ["Original-Envelope-Id", "Reporting-MTA", "Arrival-Date"]

    def test_fields_in_abnf_order(self):
        # RFC 3886 §3.1: generators emit fields in ABNF order, extensions last
        blocks = render_status(sample_report()).split(b"\r\n\r\n")
        assert field_names(blocks[1]) == [
            "Original-Recipient",
            "Final-Recipient",
            "Action",
            "Status",
            "Remote-MTA",
            "Last-Attempt-Date",
            "Will-Retry-Until",
        ]
        assert field_names(blocks[2])[-1] == "X-Note"

    def test_per_message_extensions_follow_the_three_fields(self):
        # RFC 3886 §3.1; RFC 3464 §2.1.1: *( extension-field CRLF ) after arrival-date-field
        report = sample_report()
        report = TrackingReport(
            report.original_envelope_id,
            report.reporting_mta,
            report.arrival_date,
            report.recipients,
            (("X-Chained", "no"),),
        )
        first = render_status(report).split(b"\r\n\r\n")[0]
        assert field_names(first) == [
            "Original-Envelope-Id",
            "Reporting-MTA",
            "Arrival-Date",
            "X-Chained",
        ]

    def test_dates_have_numeric_zones(self):
        # RFC 3886 §3.2 (Arrival-Date): RFC 2822 date-time with a numeric zone
        body = render_status(sample_report()).decode()
        dates = re.findall(r"(?:Arrival-Date|Last-Attempt-Date|Will-Retry-Until): (.*)\r\n", body)
        assert len(dates) == 4
        for date in dates:
            assert re.fullmatch(
                r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}", date
            )

    def test_utc_zone_is_plus_0000(self):
        report = sample_report()
        utc = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
        report = TrackingReport("e@h", report.reporting_mta, utc, report.recipients)
        assert b"Arrival-Date: Tue, 02 Jan 2024 03:04:05 +0000\r\n" in render_status(report)

    def test_action_written_lower_case(self):
        # RFC 3886 §3.3.3: Action is case-insensitive; we write the canonical spelling
        status = sample_report().recipients[1]
        report = _with_recipient(status, action="TRANSFERRED")
        assert b"Action: transferred\r\n" in render_status(report)

    def test_empty_envelope_id(self):
        # envelope-id = *text: an empty value renders as a bare field
        report = sample_report()
        report = TrackingReport("", report.reporting_mta, report.arrival_date, report.recipients)
        assert render_status(report).startswith(b"Original-Envelope-Id:\r\n")
        assert parse_status(render_status(report)).original_envelope_id == ""


def _with_recipient(base_status: RecipientStatus, /, **changes: object) -> TrackingReport:
    values = {
        "original_recipient": base_status.original_recipient,
        "final_recipient": base_status.final_recipient,
        "action": base_status.action,
        "status": base_status.status,
        "remote_mta": base_status.remote_mta,
        "last_attempt_date": base_status.last_attempt_date,
        "will_retry_until": base_status.will_retry_until,
        "extensions": base_status.extensions,
    }
    values.update(changes)
    base = sample_report()
    return TrackingReport(
        base.original_envelope_id,
        base.reporting_mta,
        base.arrival_date,
        (RecipientStatus(**values),),  # type: ignore[arg-type]
    )


PLAIN = RecipientStatus(
    original_recipient=TypedValue("rfc822", "a@b.example"),
    final_recipient=TypedValue("rfc822", "a@b.example"),
    action="delivered",
    status="2.1.5",
)


# --- rendering: validation -----------------------------------------------------------------


class TestRenderValidation:
    @pytest.mark.parametrize(
        "status",
        ["2.1", "2.1.5.0", "2.01.5", "2.1.05", "2.1000.5", "2.1.1000", "2 .1.5", "2.1.5 ", "x.1.5"],
    )
    def test_status_code_syntax(self, status):
        # RFC 3464 §2.3.4 (Status): DIGIT "." 1*3DIGIT "." 1*3DIGIT, no leading zeros/spaces
        with pytest.raises(TrackingStatusError):
            render_status(_with_recipient(PLAIN, status=status))

    @pytest.mark.parametrize("status", ["1.0.0", "3.1.5", "6.0.0"])
    def test_status_class_is_2_4_or_5(self, status):
        with pytest.raises(TrackingStatusError):
            render_status(_with_recipient(PLAIN, status=status))

    @pytest.mark.parametrize("status", ["2.0.0", "4.4.1", "5.1.1", "5.999.999", "2.10.0"])
    def test_status_code_accepted(self, status):
        assert f"Status: {status}\r\n".encode() in render_status(
            _with_recipient(PLAIN, status=status)
        )

    @pytest.mark.parametrize("action", ["", "bounced", "deliver", "read", "delayed "])
    def test_unknown_action(self, action):
        # RFC 3886 §3.3.3 (Action): one of the seven values
        with pytest.raises(TrackingStatusError):
            render_status(_with_recipient(PLAIN, action=action))

    @pytest.mark.parametrize("action", sorted(ACTIONS))
    def test_seven_actions_accepted(self, action):
        # doc/conformance.rst 3886-P4: RFC 3464 §2.3.3's grammar is extended by transferred and
        # opaque
        status = "2.1.9" if action == "relayed" else DEFAULT_STATUS[action]
        body = render_status(_with_recipient(PLAIN, action=action, status=status))
        assert f"Action: {action}\r\n".encode() in body

    @pytest.mark.parametrize("action", sorted(ACTIONS - {"relayed"}))
    def test_2_1_9_only_with_relayed(self, action):
        # RFC 3886 §3.3.4: 2.1.9 appears with no other Action
        with pytest.raises(TrackingStatusError):
            render_status(_with_recipient(PLAIN, action=action, status="2.1.9"))

    def test_opaque_has_no_remote_mta_or_dates(self):
        # RFC 3886 §3.3.5-§3.3.7: no Remote-MTA, Last-Attempt-Date, Will-Retry-Until for opaque
        when = datetime(2024, 1, 1, tzinfo=timezone.utc)
        opaque = {"action": "opaque", "status": "2.0.0"}
        for extra in (
            {"remote_mta": TypedValue("dns", "mx.example"), "last_attempt_date": when},
            {"last_attempt_date": when},
            {"will_retry_until": when},
        ):
            with pytest.raises(TrackingStatusError):
                render_status(_with_recipient(PLAIN, **opaque, **extra))

    @pytest.mark.parametrize("action", sorted(ACTIONS - {"delayed"}))
    def test_will_retry_until_only_while_queued(self, action):
        # RFC 3886 §3.3.7: Will-Retry-Until only for a recipient still in our queue
        status = "2.1.9" if action == "relayed" else DEFAULT_STATUS[action]
        later = datetime(2024, 1, 9, tzinfo=timezone.utc)
        with pytest.raises(TrackingStatusError):
            render_status(
                _with_recipient(PLAIN, action=action, status=status, will_retry_until=later)
            )

    def test_remote_mta_needs_an_attempt(self):
        # RFC 3886 §3.3.5: Remote-MTA absent without an attempt, which has a Last-Attempt-Date
        with pytest.raises(TrackingStatusError):
            render_status(_with_recipient(PLAIN, remote_mta=TypedValue("dns", "mx.example")))

    def test_no_recipients(self):
        # RFC 3886 §3.1, RFC 3464 §2.1.1: 1*( CRLF per-recipient-fields )
        base = sample_report()
        report = TrackingReport("e@h", base.reporting_mta, base.arrival_date, ())
        with pytest.raises(TrackingStatusError):
            render_status(report)

    @pytest.mark.parametrize(
        "bad", ["a\r\nb@c", "a\nb@c", "a\rb@c", "j\u00f6rg@c", "a\x00b@c", " a@c"]
    )
    def test_values_are_single_line_7bit(self, bad):
        # RFC 3886 §3.1, doc/conformance.rst 3461-P5: no CR/LF or 8-bit characters can break a field
        with pytest.raises(TrackingStatusError):
            render_status(_with_recipient(PLAIN, final_recipient=TypedValue("rfc822", bad)))
        base = sample_report()
        with pytest.raises(TrackingStatusError):
            render_status(
                TrackingReport(bad, base.reporting_mta, base.arrival_date, base.recipients)
            )
        with pytest.raises(TrackingStatusError):
            render_status(_with_recipient(PLAIN, extensions=(("X-Info", bad),)))

    @pytest.mark.parametrize("kind", ["", "rfc 822", "rfc822;", "a(b)", "\u00fc"])
    def test_type_must_be_an_atom(self, kind):
        with pytest.raises(TrackingStatusError):
            render_status(_with_recipient(PLAIN, original_recipient=TypedValue(kind, "a@b")))

    @pytest.mark.parametrize("name", ["mx.example (10.0.0.1)", "mx(", "(mx)"])
    def test_mta_name_must_read_back_the_same(self, name):
        # comments are dropped from MTA names on parsing, so none may be written
        base = sample_report()
        report = TrackingReport("e@h", TypedValue("dns", name), base.arrival_date, base.recipients)
        with pytest.raises(TrackingStatusError):
            render_status(report)

    def test_naive_date_rejected(self):
        # RFC 3886 §3.2: numeric zones are required, so the zone must be known
        base = sample_report()
        report = TrackingReport("e@h", base.reporting_mta, datetime(2024, 1, 1), base.recipients)
        with pytest.raises(TrackingStatusError):
            render_status(report)

    def test_second_offset_rejected(self):
        base = sample_report()
        odd = datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=1, seconds=30)))
        report = TrackingReport("e@h", base.reporting_mta, odd, base.recipients)
        with pytest.raises(TrackingStatusError):
            render_status(report)

    @pytest.mark.parametrize(
        "name", ["Action", "STATUS", "original-envelope-id", "X Bad", "X:Y", ""]
    )
    def test_extension_names(self, name):
        # RFC 3886 §3.3, §3.4: Diagnostic-Code etc. only as extensions; never a known field twice
        with pytest.raises(TrackingStatusError):
            render_status(_with_recipient(PLAIN, extensions=((name, "v"),)))

    def test_line_limit(self):
        base = sample_report()
        report = TrackingReport(
            "e" * 990 + "@h", base.reporting_mta, base.arrival_date, base.recipients
        )
        with pytest.raises(TrackingStatusError):
            render_status(report)


# --- multipart/related ---------------------------------------------------------------------


class TestRenderRelated:
    def test_container(self):
        # RFC 3886 §3, RFC 3887 §4: multipart/related, type="message/tracking-status"
        entity = render_related([sample_report()], boundary="b0und4ry")
        head, _sep, body = entity.partition(b"\r\n\r\n")
        unfolded = head.replace(b"\r\n ", b" ")
        assert unfolded == (
            b'Content-Type: multipart/related; type="message/tracking-status"; boundary="b0und4ry"'
        )
        assert body == (
            b"--b0und4ry\r\nContent-Type: message/tracking-status\r\n\r\n"
            + SAMPLE_BYTES
            + b"\r\n--b0und4ry--\r\n"
        )

    def test_blank_line_before_boundary(self):
        # RFC 3886 §3.1, RFC 3464 §2.1.1: the field's CRLF plus the delimiter's CRLF
        entity = render_related([sample_report()], boundary="zz")
        assert b"X-Note: second hop\r\n\r\n--zz--\r\n" in entity

    def test_several_parts(self):
        # RFC 3886 §3: chained answers are several message/tracking-status parts
        first = sample_report()
        second = TrackingReport(
            "tk-0042@origin.example",
            TypedValue("dns", "mx2.example.org"),
            datetime(2024, 3, 5, 14, 0, 6, tzinfo=timezone.utc),
            (_with_recipient(PLAIN).recipients[0],),
        )
        entity = render_related([first, second], boundary="cut-here")
        assert entity.count(b"\r\n--cut-here\r\n") == 2
        assert entity.count(b"\r\n--cut-here--\r\n") == 1
        assert entity.count(b"Content-Type: message/tracking-status\r\n") == 2
        assert parse_related(entity) == [first, second]

    def test_derived_boundary_is_legal_and_quoted(self):
        entity = render_related([sample_report()])
        match = re.search(rb'boundary="([^"]+)"', entity)
        assert match is not None
        boundary = match.group(1)
        assert re.fullmatch(rb"[0-9A-Za-z'()+_,\-./:=?]{1,70}", boundary)
        assert entity.endswith(b"--" + boundary + b"--\r\n")

    @pytest.mark.parametrize("boundary", ["", "a" * 71, "%%%%", "ends with space ", "b\u00e9"])
    def test_illegal_boundary(self, boundary):
        # RFC 2046 bchars; the RFC 3887 examples' '%%%%' is not one
        with pytest.raises(TrackingStatusError):
            render_related([sample_report()], boundary=boundary)

    def test_boundary_inside_a_part(self):
        report = _with_recipient(PLAIN, extensions=(("--sep-x", "v"),))
        with pytest.raises(TrackingStatusError):
            render_related([report], boundary="sep")

    def test_no_reports(self):
        with pytest.raises(TrackingStatusError):
            render_related([])


# --- building from the store ---------------------------------------------------------------


class TestPerMessageFromStore:
    def test_three_required_fields(self):
        # RFC 3886 §3.2: Original-Envelope-Id, Reporting-MTA, Arrival-Date
        report = report_from_store(message(), now=NOW)
        assert report.original_envelope_id == "k7Xq-0001@origin.example"
        assert report.reporting_mta == TypedValue("dns", "mta.relay.example")
        assert report.arrival_date == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
        assert report.extensions == ()

    def test_envid_case_and_decoding_kept(self):
        # RFC 3886 §3.2.1, RFC 3464 §2.2.1: the decoded ENVID, case kept
        report = report_from_store(message(envid="AbC+x=y@Host.Example"), now=NOW)
        assert b"Original-Envelope-Id: AbC+x=y@Host.Example\r\n" in render_status(report)

    def test_reporting_mta_with_type_kept(self):
        report = report_from_store(message(reporting_mta="x-local-hostname; box"), now=NOW)
        assert report.reporting_mta == TypedValue("x-local-hostname", "box")

    def test_no_envid(self):
        with pytest.raises(TrackingStatusError):
            report_from_store(message(envid=None), now=NOW)

    def test_recipients_in_rcpt_order(self):
        report = report_from_store(message(recipient(0), recipient(1), recipient(2)), now=NOW)
        finals = [r.final_recipient.value for r in report.recipients]
        assert finals == ["user0@dest.example", "user1@dest.example", "user2@dest.example"]


class TestPerRecipientFromStore:
    def test_original_recipient_from_orcpt(self):
        # RFC 3886 §3.3.1: Original-Recipient carries ORCPT (decoded) when it came
        orcpt = OriginalRecipient("rfc822", "Carol+list@Origin.Example")
        status = only(report_from_store(message(recipient(orcpt=orcpt)), now=NOW))
        assert status.original_recipient == TypedValue("rfc822", "Carol+list@Origin.Example")

    def test_original_recipient_without_orcpt(self):
        # doc/conformance.rst 3886-P2: no ORCPT -> rfc822; <RCPT address as received>
        r = recipient(address="Dave@Dest.Example", final_recipient="dave@dest.example")
        status = only(report_from_store(message(r), now=NOW))
        assert status.original_recipient == TypedValue("rfc822", "Dave@Dest.Example")
        assert status.final_recipient == TypedValue("rfc822", "dave@dest.example")
        assert b"Original-Recipient: rfc822; Dave@Dest.Example\r\n" in render_status(
            report_from_store(message(r), now=NOW)
        )

    def test_non_ascii_address_escaped(self):
        # RFC 3886 §3.1: 7bit; an SMTPUTF8 address becomes a utf-8 address (RFC 6533)
        r = recipient(address="j\u00f6rg@dest.example", final_recipient="j\u00f6rg@dest.example")
        status = only(report_from_store(message(r, smtputf8=True), now=NOW))
        assert status.final_recipient == TypedValue("utf-8", "j\\x{F6}rg@dest.example")
        assert status.original_recipient == TypedValue("utf-8", "j\\x{F6}rg@dest.example")
        render_status(report_from_store(message(r), now=NOW))  # renders as 7bit

    def test_queued_without_attempt(self):
        # RFC 3886 §3.3.5-§3.3.6: no Remote-MTA and no Last-Attempt-Date before any attempt;
        # doc/conformance.rst 3886-P3: delayed, 4.0.0
        status = only(report_from_store(message(recipient()), now=NOW))
        assert (status.action, status.status) == ("delayed", "4.0.0")
        assert status.remote_mta is None
        assert status.last_attempt_date is None
        assert status.will_retry_until is None

    def test_queued_will_retry_until_fallback(self):
        # RFC 3886 §3.3.7: Will-Retry-Until present while queued (a SHOULD)
        until = ARRIVAL + 5 * 86400
        status = only(report_from_store(message(recipient()), now=NOW, retry_until=until))
        assert status.will_retry_until == datetime.fromtimestamp(until, tz=timezone.utc)

    def test_deferred(self):
        # RFC 3886 §3.3.3: delayed with the 4.x.x of the last attempt
        r = recipient(
            state=RecipientState.DEFERRED,
            status="4.4.1",
            remote_mta="dns; mx.dest.example",
            diagnostic="smtp; 421 4.4.1 busy",
            last_attempt=ARRIVAL + 60,
            will_retry_until=ARRIVAL + 5 * 86400,
            attempts=1,
        )
        status = only(report_from_store(message(r), now=NOW, retry_until=ARRIVAL + 86400))
        assert (status.action, status.status) == ("delayed", "4.4.1")
        assert status.remote_mta == TypedValue("dns", "mx.dest.example")
        assert status.last_attempt_date == datetime.fromtimestamp(ARRIVAL + 60, tz=timezone.utc)
        # the stored value wins over the fallback
        assert status.will_retry_until == datetime.fromtimestamp(
            ARRIVAL + 5 * 86400, tz=timezone.utc
        )
        assert status.extensions == (("Diagnostic-Code", "smtp; 421 4.4.1 busy"),)

    def test_a_held_message_is_delayed(self):
        # RFC 3886 §3.3.3: "waiting in the MTA queue", whatever the hold's reason; the
        # reason (a fault of this MTA) is the administrator's, not the tracker's.
        r = recipient(state=RecipientState.DEFERRED, status="4.4.1", diagnostic="smtp; 451 busy")
        held = message(r, held=True, hold_reason="internal error: ValueError: boom")
        status = only(report_from_store(held, now=NOW))
        assert (status.action, status.status) == ("delayed", "4.4.1")
        assert b"boom" not in render_status(report_from_store(held, now=NOW))

    def test_inflight_is_delayed(self):
        r = recipient(state=RecipientState.INFLIGHT)
        assert only(report_from_store(message(r), now=NOW)).action == "delayed"

    def test_will_retry_until_in_the_past_omitted(self):
        r = recipient(state=RecipientState.DEFERRED, status="4.4.1", will_retry_until=NOW - 1)
        assert only(report_from_store(message(r), now=NOW)).will_retry_until is None
        r = recipient(state=RecipientState.DEFERRED, status="4.4.1", will_retry_until=NOW)
        assert only(report_from_store(message(r), now=NOW)).will_retry_until is None

    @pytest.mark.parametrize(
        "state",
        [
            RecipientState.DELIVERED,
            RecipientState.TRANSFERRED,
            RecipientState.RELAYED,
            RecipientState.EXPANDED,
            RecipientState.FAILED,
        ],
    )
    def test_no_will_retry_until_once_out_of_queue(self, state):
        # RFC 3886 §3.3.7: absent when the message is no longer in our queue
        r = recipient(
            state=state,
            last_attempt=ARRIVAL + 60,
            remote_mta="dns; mx.dest.example",
            will_retry_until=ARRIVAL + 86400,
        )
        status = only(report_from_store(message(r), now=NOW, retry_until=ARRIVAL + 86400))
        assert status.will_retry_until is None
        assert status.last_attempt_date is not None
        assert status.remote_mta == TypedValue("dns", "mx.dest.example")
        assert b"Will-Retry-Until" not in render_status(report_from_store(message(r), now=NOW))

    def test_remote_mta_address_is_a_domain_literal(self):
        # RFC 3461 §9.3: a domain name or a domain-literal; records stored before the
        # transports wrote "dns; [127.0.0.1]" are reported in that form too.
        for stored, shown in (
            ("dns; 127.0.0.1", b"Remote-MTA: dns; [127.0.0.1]\r\n"),
            ("dns; [127.0.0.1]", b"Remote-MTA: dns; [127.0.0.1]\r\n"),
            ("dns; ::1", b"Remote-MTA: dns; [IPv6:::1]\r\n"),
        ):
            r = recipient(
                state=RecipientState.RELAYED,
                status="2.1.9",
                last_attempt=ARRIVAL + 60,
                remote_mta=stored,
            )
            body = render_status(report_from_store(message(r), now=NOW))
            assert shown in body, stored
            assert parse_status(body).recipients[0].remote_mta == TypedValue(
                "dns", shown[17:-2].decode()
            )

    def test_remote_mta_needs_an_attempt(self):
        # RFC 3886 §3.3.5: Remote-MTA absent if no delivery attempt yet
        r = recipient(state=RecipientState.DEFERRED, remote_mta="dns; mx.dest.example")
        status = only(report_from_store(message(r), now=NOW))
        assert status.remote_mta is None
        assert status.last_attempt_date is None

    def test_local_delivery_without_remote_mta(self):
        r = recipient(state=RecipientState.DELIVERED, status="2.0.0", last_attempt=ARRIVAL + 1)
        status = only(report_from_store(message(r), now=NOW))
        assert status.remote_mta is None
        assert status.last_attempt_date is not None

    def test_opaque(self):
        # RFC 3886 §3.3.3, doc/conformance.rst 3886-P3: opaque -> 2.0.0, no Remote-MTA, no dates
        r = recipient(
            state=RecipientState.DELIVERED,
            action="opaque",
            status="2.1.5",
            remote_mta="dns; mx.dest.example",
            last_attempt=ARRIVAL + 60,
            will_retry_until=ARRIVAL + 86400,
        )
        status = only(report_from_store(message(r), now=NOW))
        assert (status.action, status.status) == ("opaque", "2.0.0")
        assert status.remote_mta is None
        assert status.last_attempt_date is None
        assert status.will_retry_until is None
        assert status.extensions == ()

    def test_diagnostic_sanitised(self):
        r = recipient(
            state=RecipientState.FAILED,
            status="5.1.1",
            diagnostic="smtp; 550 5.1.1 nobody\r\n  here \u2603",
            last_attempt=ARRIVAL + 60,
        )
        status = only(report_from_store(message(r), now=NOW))
        assert status.extensions == (("Diagnostic-Code", "smtp; 550 5.1.1 nobody here"),)
        body = render_status(report_from_store(message(r), now=NOW))
        assert body.index(b"Last-Attempt-Date") < body.index(b"Diagnostic-Code")

    def test_no_diagnostic_for_success(self):
        r = recipient(state=RecipientState.DELIVERED, diagnostic="smtp; 250 ok", last_attempt=1)
        assert only(report_from_store(message(r), now=NOW)).extensions == ()

    def test_report_renders(self):
        rs = (
            recipient(0),
            recipient(1, state=RecipientState.FAILED, status="5.1.1", last_attempt=ARRIVAL + 5),
            recipient(2, state=RecipientState.RELAYED, status="2.1.9", last_attempt=ARRIVAL + 5),
        )
        report = report_from_store(message(*rs), now=NOW)
        assert parse_status(render_status(report)) == report


class TestStatusDefaults:
    @pytest.mark.parametrize(
        ("state", "stored", "expected"),
        [
            # doc/conformance.rst 3886-P3: the project defaults when the store has no fitting Status
            (RecipientState.QUEUED, None, ("delayed", "4.0.0")),
            (RecipientState.DEFERRED, None, ("delayed", "4.0.0")),
            (RecipientState.DEFERRED, "4.4.1", ("delayed", "4.4.1")),
            (RecipientState.DEFERRED, "5.1.1", ("delayed", "4.0.0")),
            (RecipientState.DELIVERED, None, ("delivered", "2.1.5")),
            (RecipientState.DELIVERED, "2.6.0", ("delivered", "2.6.0")),
            (RecipientState.EXPANDED, None, ("expanded", "2.1.5")),
            (RecipientState.RELAYED, None, ("relayed", "2.1.9")),
            (RecipientState.RELAYED, "2.1.9", ("relayed", "2.1.9")),
            (RecipientState.TRANSFERRED, None, ("transferred", "2.4.0")),
            (RecipientState.TRANSFERRED, "2.4.0", ("transferred", "2.4.0")),
            (RecipientState.FAILED, None, ("failed", "5.0.0")),
            (RecipientState.FAILED, "5.2.2", ("failed", "5.2.2")),
            (RecipientState.FAILED, "4.4.7", ("failed", "4.4.7")),
            (RecipientState.FAILED, "2.0.0", ("failed", "5.0.0")),
            (RecipientState.DELIVERED, "5.0.0", ("delivered", "2.1.5")),
            (RecipientState.DELIVERED, "2.01.0", ("delivered", "2.1.5")),
        ],
    )
    def test_defaults(self, state, stored, expected):
        status = only(report_from_store(message(recipient(state=state, status=stored)), now=NOW))
        assert (status.action, status.status) == expected

    @pytest.mark.parametrize(
        ("state", "expected"),
        [
            (RecipientState.DELIVERED, "2.1.5"),
            (RecipientState.EXPANDED, "2.1.5"),
            (RecipientState.TRANSFERRED, "2.4.0"),
        ],
    )
    def test_2_1_9_never_leaks_to_other_actions(self, state, expected):
        # RFC 3886 §3.3.4: 2.1.9 only with relayed
        status = only(report_from_store(message(recipient(state=state, status="2.1.9")), now=NOW))
        assert status.status == expected


class TestConfidentiality:
    def test_confidential_forwarding_target_hidden(self):
        # RFC 3886 §4.2: never show the target in Final-Recipient/Remote-MTA/extensions
        r = recipient(
            address="alias@dest.example",
            final_recipient="secret-pager@hidden.example",
            state=RecipientState.DELIVERED,
            status="2.0.0",
            remote_mta="dns; mx.hidden.example",
            diagnostic="smtp; 250 secret-pager@hidden.example ok",
            last_attempt=ARRIVAL + 60,
        )
        report = report_from_store(message(r), now=NOW, hide=lambda rcpt: True)
        status = only(report)
        assert status.final_recipient == TypedValue("rfc822", "alias@dest.example")
        assert status.remote_mta is None
        assert status.action == "delivered"
        assert b"hidden.example" not in render_status(report)

    def test_transferred_to_hidden_target_reported_relayed(self):
        # RFC 3886 §4.2 (a): relayed, so nobody tracks further
        r = recipient(
            address="alias@dest.example",
            final_recipient="secret@hidden.example",
            state=RecipientState.TRANSFERRED,
            status="2.4.0",
            remote_mta="dns; mx.hidden.example",
            last_attempt=ARRIVAL + 60,
        )
        status = only(report_from_store(message(r), now=NOW, hide=lambda rcpt: True))
        assert (status.action, status.status) == ("relayed", "2.1.9")
        assert status.remote_mta is None

    def test_list_members_never_appear(self):
        # RFC 3886 §4.2: expanded, and no member list
        members = tuple(
            recipient(
                index,
                address="team@dest.example",
                final_recipient=f"member{index}@elsewhere.example",
                state=state,
                remote_mta="dns; mx.elsewhere.example",
                last_attempt=ARRIVAL + index,
            )
            for index, state in enumerate(
                [RecipientState.DELIVERED, RecipientState.DEFERRED, RecipientState.FAILED]
            )
        )
        visible = recipient(3, address="bob@dest.example", final_recipient="bob@dest.example")
        report = report_from_store(
            message(*members, visible),
            now=NOW,
            hide=lambda rcpt: rcpt.address == "team@dest.example",
        )
        assert len(report.recipients) == 2
        team, bob = report.recipients
        assert team.final_recipient == TypedValue("rfc822", "team@dest.example")
        assert (team.action, team.status) == ("expanded", "2.1.5")
        assert team.remote_mta is None
        assert team.last_attempt_date == datetime.fromtimestamp(ARRIVAL + 2, tz=timezone.utc)
        assert bob.final_recipient == TypedValue("rfc822", "bob@dest.example")
        body = render_status(report)
        assert b"member" not in body
        assert b"elsewhere" not in body

    def test_hide_nothing_by_default(self):
        r = recipient(final_recipient="shown@dest.example")
        status = only(report_from_store(message(r), now=NOW))
        assert status.final_recipient.value == "shown@dest.example"


# --- parsing ---------------------------------------------------------------------------------


class TestParse:
    def test_own_vector(self):
        assert parse_status(SAMPLE_BYTES) == sample_report()

    def test_any_field_order(self):
        # project decision, doc/conformance.rst 3886-P1: parsers accept any order
        text = (
            b"Arrival-Date: Tue, 05 Mar 2024 08:09:10 -0500\r\n"
            b"Reporting-MTA: dns; mta.example.net\r\n"
            b"Original-Envelope-Id: tk-0042@origin.example\r\n"
            b"\r\n"
            b"Will-Retry-Until: Sun, 10 Mar 2024 08:09:10 -0500\r\n"
            b"Status: 4.4.1\r\n"
            b"Last-Attempt-Date: Tue, 05 Mar 2024 09:00:00 -0500\r\n"
            b"Remote-MTA: dns; mx1.example.org\r\n"
            b"Action: delayed\r\n"
            b"Final-Recipient: rfc822; ann@example.org\r\n"
            b"Original-Recipient: rfc822; Ann@Example.org\r\n"
            b"\r\n"
            b"X-Note: second hop\r\n"
            b"Last-Attempt-Date: Tue, 05 Mar 2024 09:00:05 -0500\r\n"
            b"Remote-MTA: dns; mx2.example.org\r\n"
            b"Status: 2.4.0\r\n"
            b"Action: transferred\r\n"
            b"Original-Recipient: rfc822; bob@example.org\r\n"
            b"Final-Recipient: rfc822; bob@example.org\r\n"
        )
        assert parse_status(text) == sample_report()

    def test_folding_comments_case_and_lf(self):
        # RFC 3464 §2.1.1: folding, comments, case-insensitive names; LF line ends too
        text = (
            b"original-envelope-id:\n tk-0042@origin.example\n"
            b"REPORTING-MTA: DNS (our name) ;\n\tmta.example.net (198.51.100.1)\n"
            b"Arrival-Date: Tue, 05 Mar 2024 08:09:10\n -0500 (EST)\n"
            b"\n"
            b"Original-Recipient: rfc822;Ann@Example.org\n"
            b"final-recipient: rfc822; ann@example.org\n"
            b"ACTION: Delayed (still trying)\n"
            b"status: 4.4.1 (No answer (at all) from host)\n"
            b"Remote-Mta: dns; mx1.example.org\n"
            b"Last-Attempt-Date: Tue,  5 Mar 2024 09:00:00 -0500\n"
            b"Will-Retry-Until: Sun, 10 Mar 2024 08:09:10 -0500\n"
        )
        report = parse_status(text)
        assert report.original_envelope_id == "tk-0042@origin.example"
        assert report.reporting_mta == TypedValue("DNS", "mta.example.net")
        assert report.arrival_date == datetime(2024, 3, 5, 8, 9, 10, tzinfo=EST)
        status = only(report)
        assert status.original_recipient == TypedValue("rfc822", "Ann@Example.org")
        assert (status.action, status.status) == ("delayed", "4.4.1")
        assert status.last_attempt_date == datetime(2024, 3, 5, 9, 0, 0, tzinfo=EST)
        assert status.last_attempt_date.utcoffset() == timedelta(hours=-5)

    def test_unknown_fields_are_extensions(self):
        text = SAMPLE_BYTES.replace(
            b"Action: delayed\r\n",
            b"Action: delayed\r\nDiagnostic-Code: smtp; 421 4.4.1 (try later)\r\n",
        ).replace(b"Arrival-Date", b"Received-From-MTA: dns; a.example\r\nArrival-Date")
        report = parse_status(text)
        assert report.extensions == (("Received-From-MTA", "dns; a.example"),)
        assert report.recipients[0].extensions == (
            ("Diagnostic-Code", "smtp; 421 4.4.1 (try later)"),
        )

    def test_addresses_and_envid_kept_verbatim(self):
        # 3464 §2.2.1 / §2.3.2: exact spelling; parentheses stay in these values
        text = SAMPLE_BYTES.replace(b"tk-0042@origin.example", b"tk(7)@origin.example").replace(
            b"rfc822; ann@example.org", b'rfc822; "a (b)"@example.org'
        )
        report = parse_status(text)
        assert report.original_envelope_id == "tk(7)@origin.example"
        assert report.recipients[0].final_recipient.value == '"a (b)"@example.org'
        assert parse_status(render_status(report)) == report

    def test_extra_blank_lines_tolerated(self):
        text = b"\r\n" + SAMPLE_BYTES.replace(b"\r\n\r\n", b"\r\n\r\n\r\n") + b"\r\n\r\n"
        assert parse_status(text) == sample_report()

    def test_minus_0000_read_as_utc(self):
        text = SAMPLE_BYTES.replace(b"08:09:10 -0500\r\n\r\n", b"13:09:10 -0000\r\n\r\n", 1)
        assert parse_status(text).arrival_date == datetime(
            2024, 3, 5, 13, 9, 10, tzinfo=timezone.utc
        )

    def test_transferred_and_opaque_actions_parsed(self):
        # doc/conformance.rst 3886-P4: the extended grammar
        for action in ("transferred", "opaque", "OPAQUE"):
            text = SAMPLE_BYTES.replace(b"Action: delayed", b"Action: " + action.encode())
            assert parse_status(text).recipients[0].action == action.lower()

    @pytest.mark.parametrize(
        ("old", "new"),
        [
            (b"Status: 4.4.1\r\n", b"Status 4.4.1\r\n"),  # no colon
            (b"Status: 4.4.1\r\n", b"Status: 4.4\r\n"),
            (b"Status: 4.4.1\r\n", b"Status: 4.4.1x\r\n"),
            (b"Status: 4.4.1\r\n", b""),  # missing required field
            (b"Action: delayed\r\n", b"Action: bounced\r\n"),
            (b"Action: delayed\r\n", b""),
            (b"Final-Recipient: rfc822; ann@example.org\r\n", b""),
            (b"Original-Recipient: rfc822; Ann@Example.org\r\n", b""),
            (b"Original-Recipient: rfc822; Ann", b"Original-Recipient: Ann"),  # no type
            (b"Original-Envelope-Id: tk-0042@origin.example\r\n", b""),
            (b"Reporting-MTA: dns; mta.example.net\r\n", b""),
            (b"Arrival-Date: Tue, 05 Mar 2024 08:09:10 -0500", b"Arrival-Date: yesterday"),
            (b"Action: delayed\r\n", b"Action: delayed\r\nAction: failed\r\n"),  # repeated
            (b"Status: 4.4.1\r\n", b"Status: 4.4.1\r\nReporting-MTA: dns; x\r\n"),  # misplaced
            (b"Arrival-Date", b"Action: delayed\r\nArrival-Date"),
            (b"Status: 4.4.1\r\n", b"Status: 4.4.1 (unterminated\r\n"),
            (b"Status: 4.4.1\r\n", b"Status: (only a comment)\r\n"),
            (b"Original-Recipient: rfc822", b"Original-Recipient: rfc 822"),
        ],
    )
    def test_malformed(self, old, new):
        assert old in SAMPLE_BYTES
        with pytest.raises(TrackingStatusError):
            parse_status(SAMPLE_BYTES.replace(old, new, 1))

    def test_continuation_without_field(self):
        with pytest.raises(TrackingStatusError):
            parse_status(b" folded\r\n" + SAMPLE_BYTES)

    def test_no_recipient_block(self):
        with pytest.raises(TrackingStatusError):
            parse_status(SAMPLE_BYTES.split(b"\r\n\r\n")[0] + b"\r\n")

    def test_empty(self):
        with pytest.raises(TrackingStatusError):
            parse_status(b"\r\n\r\n")

    def test_parser_reads_2_1_9_with_other_action(self):
        # generator rule only (RFC 3886 §3.3.4, doc/conformance.rst 3886-P5); foreign data is
        # shown as it came (RFC 3886 §4.1)
        text = SAMPLE_BYTES.replace(b"Status: 4.4.1", b"Status: 2.1.9")
        assert parse_status(text).recipients[0].status == "2.1.9"


class TestParseRelated:
    def test_round_trip(self):
        report = sample_report()
        assert parse_related(render_related([report, report])) == [report, report]

    def test_lenient_container(self):
        # unquoted boundary, case-insensitive header names and types, LF ends,
        # preamble and epilogue, a folded Content-Type
        entity = (
            b"content-type: Multipart/Related;\n boundary=frontier (x); type=whatever\n"
            b"\n"
            b"preamble text\n"
            b"--frontier\n"
            b"CONTENT-TYPE: Message/Tracking-Status\n"
            b"Content-Transfer-Encoding: 7BIT\n"
            b"\n" + SAMPLE_BYTES.replace(b"\r\n", b"\n") + b"\n--frontier--  \n"
            b"epilogue\n"
        )
        assert parse_related(entity) == [sample_report()]

    @pytest.mark.parametrize(
        "entity",
        [
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n--b--\r\n",
            b"Content-Type: multipart/related\r\n\r\n--b\r\n--b--\r\n",
            b"Content-Type: multipart/related; boundary=b\r\n\r\n",
            b"Content-Type: multipart/related; boundary=b\r\n\r\n--b--\r\n",
            b"Content-Type: multipart/related; boundary=b\r\n",
            b"Content-Type: multipart/related; boundary=b\r\n\r\n--b\r\n"
            b"Content-Type: text/plain\r\n\r\nhello\r\n--b--\r\n",
            b"Content-Type: multipart/related; boundary=b\r\n\r\n--b\r\n"
            b"\r\nOriginal-Envelope-Id: x\r\n--b--\r\n",
            b"Content-Type: multipart/related; boundary=b\r\n\r\n--b\r\n"
            b"Content-Type: message/tracking-status\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\nT3JpZw==\r\n--b--\r\n",
            b"Bad header line\r\n\r\n",
        ],
    )
    def test_malformed(self, entity):
        with pytest.raises(TrackingStatusError):
            parse_related(entity)

    def test_missing_close_delimiter(self):
        entity = render_related([sample_report()], boundary="bb")
        with pytest.raises(TrackingStatusError):
            parse_related(entity.replace(b"--bb--", b"--bb"))


# --- properties ------------------------------------------------------------------------------

_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(
    lambda s: s.strip(" ")
)
_INNER = st.text(st.sampled_from(" \t"), max_size=2)
_VALUE = st.builds(lambda a, gap, b: (a + gap + b).strip(" \t"), _TEXT, _INNER, _TEXT)
_ATOM = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9+\-_]{0,11}", fullmatch=True)
_HOST = st.from_regex(
    r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?(?:\.[a-z0-9]{1,8}){0,3}", fullmatch=True
)
_ZONES = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
_DATES = st.datetimes(
    min_value=datetime(1900, 1, 2), max_value=datetime(2200, 12, 30), timezones=_ZONES
).map(lambda d: d.replace(microsecond=0))
_KNOWN = {
    "original-envelope-id",
    "reporting-mta",
    "arrival-date",
    "original-recipient",
    "final-recipient",
    "action",
    "status",
    "remote-mta",
    "last-attempt-date",
    "will-retry-until",
}
_EXT_NAME = st.from_regex(r"[A-Za-z][A-Za-z0-9\-]{0,15}", fullmatch=True).filter(
    lambda n: n.lower() not in _KNOWN
)
_EXTENSIONS = st.lists(st.tuples(_EXT_NAME, _VALUE), max_size=3).map(tuple)
_CODE = st.integers(0, 999)


@st.composite
def _recipients(draw: st.DrawFn) -> RecipientStatus:
    action = draw(st.sampled_from(sorted(ACTIONS)))
    klass = draw(st.sampled_from("245"))
    status = f"{klass}.{draw(_CODE)}.{draw(_CODE)}"
    if action == "relayed" and draw(st.booleans()):
        status = "2.1.9"
    elif status == "2.1.9" and action != "relayed":
        status = "2.1.5"
    last = remote = retry = None
    if action != "opaque":
        last = draw(st.none() | _DATES)
        if last is not None:
            remote = draw(st.none() | st.builds(TypedValue, _ATOM, _HOST))
        if action == "delayed":
            retry = draw(st.none() | _DATES)
    return RecipientStatus(
        original_recipient=TypedValue(draw(_ATOM), draw(_VALUE)),
        final_recipient=TypedValue(draw(_ATOM), draw(_VALUE)),
        action=action,
        status=status,
        remote_mta=remote,
        last_attempt_date=last,
        will_retry_until=retry,
        extensions=draw(_EXTENSIONS),
    )


_REPORTS = st.builds(
    TrackingReport,
    original_envelope_id=_VALUE,
    reporting_mta=st.builds(TypedValue, _ATOM, _HOST),
    arrival_date=_DATES,
    recipients=st.lists(_recipients(), min_size=1, max_size=3).map(tuple),
    extensions=_EXTENSIONS,
)


def _offsets(report: TrackingReport) -> list[timedelta | None]:
    dates = [report.arrival_date]
    for r in report.recipients:
        dates += [r.last_attempt_date, r.will_retry_until]
    return [d.utcoffset() if d is not None else None for d in dates]


@settings(max_examples=100, deadline=None)
@given(_REPORTS)
def test_render_parse_round_trip(report):
    # RFC 3886 §3-§3.3: what we render reads back identically, zones included
    body = render_status(report)
    parsed = parse_status(body)
    assert parsed == report
    assert _offsets(parsed) == _offsets(report)
    assert render_status(parsed) == body


@settings(max_examples=100, deadline=None)
@given(_REPORTS, st.randoms(use_true_random=False))
def test_any_order_and_folding_read_the_same(report, rnd):
    # project decision, doc/conformance.rst 3886-P1: any field order within a block; folded lines
    blocks = render_status(report).decode("ascii").split("\r\n\r\n")
    shuffled = []
    for block in blocks:
        lines = [line for line in block.split("\r\n") if line]
        extensions = [line for line in lines if line.split(":")[0].lower() not in _KNOWN]
        rnd.shuffle(lines)
        ext_iter = iter(extensions)  # extensions keep their relative order
        lines = [
            next(ext_iter) if line.split(":")[0].lower() not in _KNOWN else line for line in lines
        ]
        folded = []
        for line in lines:
            out = []
            for index, char in enumerate(line):
                nxt = line[index + 1] if index + 1 < len(line) else ""
                if char == " " and nxt not in ("", " ", "\t") and rnd.random() < 0.3:
                    out.append("\r\n")
                out.append(char)
            folded.append("".join(out))
        shuffled.append("\r\n".join(folded) + "\r\n")
    assert parse_status("\r\n".join(shuffled).encode("ascii")) == report


@settings(max_examples=100, deadline=None)
@given(st.lists(_REPORTS, min_size=1, max_size=3))
def test_related_round_trip(reports):
    # RFC 3887 §4, RFC 3886 §3: one part per report, in order
    assert parse_related(render_related(reports)) == reports


# -- any stored value gives a report that renders and parses (RFC 3886 §3, RFC 6533 §3) ----

_ANY_TEXT = st.text(st.characters(codec=None), max_size=200) | st.text(
    st.sampled_from('a \t\r\n\x00\x01\x7f()\\;=+"é€😀'), max_size=2500
)


def test_remote_mta_with_a_comment_or_control_renders_and_reads_back():
    # It used to raise "MTA name would read back differently" and stop the report.
    stored = message(
        recipient(
            state=RecipientState.FAILED,
            remote_mta="dns; evil (x)\x01host",
            last_attempt=ARRIVAL + 60,
            diagnostic="smtp; 550 5.1.1 bad\x01user",
        ),
        reporting_mta="mx (me)",
    )
    body = render_status(report_from_store(stored, now=NOW))
    parsed = parse_status(body)
    assert str(parsed.reporting_mta) == "dns; mx\\x{20}\\x{28}me\\x{29}"
    (block,) = parsed.recipients
    assert str(block.remote_mta) == "dns; evil\\x{20}\\x{28}x\\x{29}\\x{01}host"
    assert dict(block.extensions)["Diagnostic-Code"] == "smtp; 550 5.1.1 bad user"


@settings(max_examples=150)
@given(
    envid=_ANY_TEXT,
    reporting=_ANY_TEXT,
    address=_ANY_TEXT,
    final=_ANY_TEXT,
    orcpt_type=_ANY_TEXT,
    orcpt=_ANY_TEXT,
    remote=_ANY_TEXT,
    diagnostic=_ANY_TEXT,
    state=st.sampled_from(list(RecipientState)),
)
def test_any_stored_values_give_a_report_that_parses(
    envid, reporting, address, final, orcpt_type, orcpt, remote, diagnostic, state
):
    stored = message(
        recipient(
            address=address,
            final_recipient=final,
            orcpt=OriginalRecipient(orcpt_type, orcpt),
            state=state,
            remote_mta=remote,
            last_attempt=ARRIVAL + 60,
            diagnostic=diagnostic,
        ),
        envid=envid,
        reporting_mta=reporting,
    )
    body = render_status(report_from_store(stored, now=NOW))
    assert all(len(line) <= 998 for line in body.split(b"\r\n"))
    assert re.fullmatch(rb"[\t\r\n -~]*", body)
    assert len(parse_status(body).recipients) == 1


# -- events as X-Mtrkmta-Event extension fields (RFC 3464 §2.4) ---


def arrived(queue_id: str = "Q1", when: int = ARRIVAL) -> Event:
    row = {
        "queue_id": queue_id,
        "client_helo": "laptop.origin.example",
        "client_address": "198.51.100.23",
        "client_port": 50123,
        "client_listener": "submission",
        "client_protocol": "ESMTPSA",
        "client_authenticated_as": "alice",
        "sender": "sender@origin.example",
        "envid": "k7Xq-0001@origin.example",
        "size": 100,
    }
    return arrival_event(row, 1, when)


def deferred(when: int, index: int = 0) -> Event:
    update = RecipientUpdate(
        index,
        RecipientState.DEFERRED,
        "4.4.1",
        diagnostic='x-local; connect to mx-b[127.0.0.1]:25: Connection "refused" \\ é\r\n',
        next_attempt=when + 600,
        relay="mx-b.dest.example[127.0.0.1]:25",
    )
    return outcome_event("Q1", update, when)


def test_events_travel_in_their_blocks_and_the_existing_parser_reads_them():
    waiting = recipient(state=RecipientState.DEFERRED, last_attempt=ARRIVAL + 5)
    events = {"Q1": [arrived(), deferred(ARRIVAL + 5)]}
    report = report_from_transactions([message(waiting)], now=NOW, events=events)
    wire = render_related([report])
    (back,) = parse_related(wire)
    assert back.extensions == report.extensions
    (arrival,) = reported_events(back.extensions)
    assert (arrival.kind, arrival.time) == ("arrived", datetime.fromtimestamp(ARRIVAL, UTC))
    assert arrival.detail == (("protocol", "ESMTPSA"), ("recipients", "1"))
    (attempt,) = reported_events(only(back).extensions)
    assert attempt.kind == "deferred"
    assert attempt.get("status") == "4.4.1"
    assert attempt.get("relay") == "mx-b.dest.example[127.0.0.1]:25"
    # The stored escapes survive, the quotes and backslash come back, non-ASCII is 7bit.
    assert attempt.get("diagnostic") == (
        'x-local; connect to mx-b[127.0.0.1]:25: Connection "refused" \\ \\x{E9}\\x{0D}\\x{0A}'
    )
    assert attempt.get("next_attempt") == "Tue, 14 Nov 2023 22:23:25 +0000"
    # RFC 3885 §4.2: the client that brought the message is not the reader's business.
    for secret in (b"198.51.100.23", b"laptop", b"alice", b"50123", b"submission", b"sender@"):
        assert secret not in wire


def test_event_field_grammar_reads_back_and_malformed_fields_are_skipped():
    name, value = event_field(deferred(ARRIVAL))
    assert name == "X-Mtrkmta-Event"
    assert value.startswith('Tue, 14 Nov 2023 22:13:20 +0000; deferred; status="4.4.1"; relay=')
    assert parse_event(value).detail == reported_events([(name, value)])[0].detail
    assert parse_event('Tue, 14 Nov 2023 22:13:20 +0000 (UTC); Held ; reason="a;b=\\"c\\""') == (
        ReportedEvent(datetime.fromtimestamp(ARRIVAL, UTC), "held", (("reason", 'a;b="c"'),))
    )
    for bad in ("no date", "Tue, 14 Nov 2023 22:13:20 +0000; a b", "Tue, 14 Nov 2023; x"):
        with pytest.raises(TrackingStatusError):
            parse_event(bad)
    with pytest.raises(TrackingStatusError):
        parse_event("Tue, 14 Nov 2023 22:13:20 +0000; held; reason=unquoted")
    assert reported_events([("X-Mtrkmta-Event", "garbage"), ("X-Other", "1")]) == ()


def test_a_recipient_retried_for_days_sends_a_bounded_number_of_events():
    many = [deferred(ARRIVAL + 600 * n) for n in range(100)]
    fields = event_fields(many)
    assert len(fields) == EVENTS_FIRST + 1 + EVENTS_LAST
    events = reported_events(fields)
    gap = events[EVENTS_FIRST]
    assert (gap.kind, gap.get("count")) == (OMITTED, str(100 - EVENTS_FIRST - EVENTS_LAST))
    assert gap.time == datetime.fromtimestamp(ARRIVAL + 600 * EVENTS_FIRST, UTC)
    assert events[-1].time == datetime.fromtimestamp(ARRIVAL + 600 * 99, UTC)
    waiting = recipient(state=RecipientState.DEFERRED, last_attempt=ARRIVAL)
    report = report_from_transactions([message(waiting)], now=NOW, events={"Q1": many})
    body = render_status(report)
    assert body.count(b"X-Mtrkmta-Event:") == EVENTS_FIRST + 1 + EVENTS_LAST
    assert max(len(line) for line in body.split(b"\r\n")) <= 998  # RFC 5322 §2.1.1


def test_an_expansion_says_how_many_addresses_never_which():
    update = RecipientUpdate(
        0, RecipientState.EXPANDED, "2.1.5", produced=tuple(f"m{n}@list.example" for n in range(25))
    )
    (_, value) = event_field(outcome_event("Q1", update, ARRIVAL))
    assert parse_event(value).get("produced") == "25"
    assert "m1@list.example" not in value


def test_a_hidden_recipient_events_name_no_next_hop_or_diagnostic():
    # RFC 3886 §4.2: a confidential forwarding target shows neither the hop nor its reply.
    target = recipient(
        state=RecipientState.DEFERRED, final_recipient="secret@hidden.example", last_attempt=NOW
    )
    events = {"Q1": [deferred(ARRIVAL + 5)]}
    report = report_from_transactions(
        [message(target)], now=NOW, hide=lambda r: True, events=events
    )
    (event,) = reported_events(only(report).extensions)
    assert event.detail == (
        ("status", "4.4.1"),
        ("next_attempt", "Tue, 14 Nov 2023 22:23:25 +0000"),
    )
    assert b"mx-b" not in render_status(report)


def test_an_internal_error_hold_keeps_its_text_for_the_log():
    held = Event(
        "Q1", None, ARRIVAL, EventKind.HELD, (("reason", "internal error: KeyError: 'x'"),)
    )
    assert parse_event(event_field(held)[1]).detail == (("reason", "internal error"),)
    by_admin = Event(
        "Q1", None, ARRIVAL, EventKind.HELD, (("reason", "held by the administrator"),)
    )
    assert parse_event(event_field(by_admin)[1]).detail == (
        ("reason", "held by the administrator"),
    )


def test_an_event_field_never_outgrows_its_line_whatever_its_values():
    # Quotes and backslashes double on the wire; the line still fits RFC 5322 §2.1.1.
    update = RecipientUpdate(
        0,
        RecipientState.DEFERRED,
        "4.4.1",
        diagnostic='"\\' * 400,
        relay="r" * 600,
        final_recipient="f" * 600,
        next_attempt=ARRIVAL + 60,
    )
    name, value = event_field(outcome_event("Q1", update, ARRIVAL))
    assert len(f"{name}: {value}") <= 998
    back = parse_event(value)
    assert [key for key, _ in back.detail] == [
        "status",
        "relay",
        "diagnostic",
        "next_attempt",
        "final_recipient",
    ]
    assert back.get("final_recipient").endswith("...")  # what room was left
    assert back.get("diagnostic").startswith('"\\"\\') and back.get("diagnostic").endswith("...")
    waiting = recipient(state=RecipientState.DEFERRED, last_attempt=ARRIVAL)
    report = report_from_transactions(
        [message(waiting)], now=NOW, events={"Q1": [outcome_event("Q1", update, ARRIVAL)]}
    )
    (parsed,) = parse_related(render_related([report]))
    assert reported_events(only(parsed).extensions) == (back,)


def test_deliver_by_time_shows_while_the_recipient_waits_and_time_remains():
    # RFC 2852 §4: the deliver-by-time, as an extension field (RFC 3464 §2.4).
    waiting = message(recipient(0, state=RecipientState.DEFERRED), deliver_by=NOW + 60)
    (block,) = report_from_store(waiting, now=NOW).recipients
    assert ("X-Mtrkmta-Deliver-By", "Tue, 14 Nov 2023 23:14:20 +0000") in block.extensions
    assert b"X-Mtrkmta-Deliver-By: Tue, 14 Nov 2023 23:14:20 +0000" in render_status(
        report_from_store(waiting, now=NOW)
    )
    for stored, now in [
        (waiting, NOW + 60),  # no time left
        (message(recipient(0, state=RecipientState.RELAYED), deliver_by=NOW + 60), NOW),
        (message(recipient(0, state=RecipientState.DEFERRED)), NOW),  # no BY=
    ]:
        (block,) = report_from_store(stored, now=now).recipients
        assert all(name != "X-Mtrkmta-Deliver-By" for name, _ in block.extensions)
