"""DSN rendering: MIME structure, every delivery-status field, RET handling, golden files."""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import replace
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtrkmta.dsn.render import (
    SUBJECTS,
    DsnFieldError,
    RecipientReport,
    format_date,
    random_boundary,
    random_message_id,
    render_dsn,
    smtp_diagnostic,
)
from mtrkmta.envelope import ClientInfo, OriginalRecipient
from mtrkmta.tracking.interfaces import (
    RecipientState,
    RecipientUpdate,
    StoredMessage,
    StoredRecipient,
)

GOLDEN = Path(__file__).parent / "dsn_golden"

ARRIVAL = 1_700_000_000  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = ARRIVAL + 301
BOUNDARY = "=_dsn_0123456789abcdef"
MTA = "mx.example.net"
SENDER = "alice@client.example.org"

CONTENT = (
    b"Return-Path: <alice@client.example.org>\r\n"
    b"Received: from client.example.org ([192.0.2.25])\r\n"
    b"\tby mx.example.net (mtrkmta) with ESMTP id 4XyZ7kQ2;\r\n"
    b"\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Alice <alice@client.example.org>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: Lunch on Friday\r\n"
    b"Date: Tue, 14 Nov 2023 23:13:19 +0100\r\n"
    b"Message-ID: <lunch.1@client.example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Hi Bob,\r\n"
    b"\r\n"
    b"shall we have lunch on Friday at noon?\r\n"
    b"\r\n"
    b"Alice\r\n"
)
HEADER = CONTENT[: CONTENT.index(b"\r\n\r\n") + 2]

USER_UNKNOWN = smtp_diagnostic(
    [
        "550-5.1.1 <bob@example.com>: Recipient address rejected:",
        "550 5.1.1 User unknown in virtual mailbox table",
    ]
)


def stored_message(**changes: object) -> StoredMessage:
    base = StoredMessage(
        queue_id="4XyZ7kQ2",
        node_id="node-1",
        envid="QQ314159@client.example.org",
        certifier=None,
        sender=SENDER,
        arrival=ARRIVAL,
        requested_timeout=None,
        expires_at=ARRIVAL + 9 * 86400,
        reporting_mta=MTA,
        size=len(CONTENT),
        ret="FULL",
        body=None,
        smtputf8=False,
        auth=None,
        client=ClientInfo(address="192.0.2.25", helo="client.example.org"),
        recipients=(),
    )
    return replace(base, **changes)


def failed_report(**changes: object) -> RecipientReport:
    base = RecipientReport(
        final_recipient="bob@example.com",
        original_recipient="rfc822;Bob@Example.COM",
        action="failed",
        status="5.1.1",
        remote_mta="dns; mx1.example.com",
        diagnostic=USER_UNKNOWN,
        last_attempt=ARRIVAL + 300,
    )
    return replace(base, **changes)


def delayed_report(**changes: object) -> RecipientReport:
    base = RecipientReport(
        final_recipient="carol@example.org",
        action="delayed",
        status="4.4.1",
        remote_mta="dns; mx.example.org",
        diagnostic="smtp; 421 4.4.1 mx.example.org: Service not available, try again later",
        last_attempt=ARRIVAL + 4 * 3600,
        will_retry_until=ARRIVAL + 5 * 86400,
    )
    return replace(base, **changes)


def render(
    reports: list[RecipientReport],
    *,
    message: StoredMessage | None = None,
    content: bytes | None = CONTENT,
    ret: str | None = "FULL",
    max_full_size: int = 10_000_000,
    eight_bit_ok: bool = False,
    reporting_mta: str = MTA,
) -> bytes:
    return render_dsn(
        message=message or stored_message(),
        recipients=reports,
        reporting_mta=reporting_mta,
        original_content=content,
        ret=ret,
        max_full_size=max_full_size,
        now=NOW,
        eight_bit_ok=eight_bit_ok,
        new_boundary=lambda: BOUNDARY,
        new_message_id=lambda domain: f"<dsn.4XyZ7kQ2.1@{domain}>",
    )


def parse(dsn: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(dsn, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def raw_parts(dsn: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Split the multipart/report by hand: (part headers, part body) per part."""
    body = dsn.split(b"\r\n\r\n", 1)[1]
    delimiter = b"\r\n--" + BOUNDARY.encode()
    chunks = body.split(delimiter)
    assert chunks[-1] == b"--\r\n", "missing or misplaced close delimiter"
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n")
        head, _, content = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append((headers, content))
    return parts


def delivery_status(dsn: bytes) -> list[dict[str, str]]:
    """The message/delivery-status body as blocks of unfolded fields (RFC 3464 §2.1)."""
    headers, body = raw_parts(dsn)[1]
    assert headers["Content-Type"] == "message/delivery-status"
    text = body.decode("ascii")
    assert text.endswith("\r\n") and not text.endswith("\r\n\r\n")
    blocks = []
    for block in text[:-2].split("\r\n\r\n"):
        unfolded = re.sub(r"\r\n(?=[ \t])", "", block)
        fields: dict[str, str] = {}
        for line in unfolded.split("\r\n"):
            name, value = line.split(":", 1)
            assert name not in fields, f"field {name} twice in one block"
            fields[name] = value.strip()
        blocks.append(fields)
    return blocks


def field_names(block: dict[str, str]) -> list[str]:
    return list(block)


# -- MIME structure ----------------------------------------------------------------------------


def test_multipart_report_with_three_parts():
    # RFC 6522 §3-§4, RFC 3464 §2, §2.1, RFC 3461 §6.2.
    dsn = render([failed_report()])
    message = parse(dsn)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message.get_boundary() == BOUNDARY
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]
    assert parts[1]["Content-Transfer-Encoding"] == "7bit"  # RFC 3464 §2.1
    assert message.defects == []
    assert all(part.defects == [] for part in parts)


def test_top_level_headers():
    # RFC 3461 §6.1: To = envelope return address, From = postmaster; numeric zone (RFC 3464
    # §2.2.5).
    message = parse(render([failed_report()]))
    assert message["From"] == f"Mail Delivery System <MAILER-DAEMON@{MTA}>"
    assert message["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{MTA}"
    assert message["To"].addresses[0].addr_spec == SENDER
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Date"] == "Tue, 14 Nov 2023 22:18:21 +0000"
    assert parsedate_to_datetime(message["Date"]).timestamp() == NOW
    assert message["Message-ID"] == f"<dsn.4XyZ7kQ2.1@{MTA}>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"


@pytest.mark.parametrize(
    ("report", "subject"),
    [
        (failed_report(), "Undelivered Mail Returned to Sender"),
        (delayed_report(), "Delayed Mail (still being retried)"),
        (failed_report(action="delivered", status="2.0.0"), "Successful Mail Delivery Report"),
        (failed_report(action="expanded", status="2.1.5"), "Successful Mail Delivery Report"),
        (failed_report(action="relayed", status="2.0.0"), "Relayed Mail Report"),
    ],
)
def test_subject_states_the_outcome(report, subject):
    assert parse(render([report]))["Subject"] == subject
    assert SUBJECTS[report.action] == subject


def test_mixed_report_is_named_after_its_failure():
    dsn = render([failed_report(action="delivered", status="2.0.0"), delayed_report()])
    assert parse(dsn)["Subject"] == "Delayed Mail (still being retried)"
    dsn = render([delayed_report(), failed_report()])
    assert parse(dsn)["Subject"] == "Undelivered Mail Returned to Sender"
    assert [b["Action"] for b in delivery_status(dsn)[1:]] == ["delayed", "failed"]


def test_crlf_line_ends_and_short_lines():
    dsn = render([failed_report(), delayed_report()])
    assert b"\n" not in dsn.replace(b"\r\n", b"")
    assert b"\r" not in dsn.replace(b"\r\n", b"")
    lines = dsn.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    assert dsn.isascii()


def test_human_readable_part_says_what_happened_to_whom_and_why():
    # RFC 6522 §3: part 1 is a human-readable explanation.
    text = parse(render([failed_report(), delayed_report()])).get_body(("plain",))
    assert text is not None
    content = " ".join(text.get_content().split())
    assert "<bob@example.com>: delivery failed" in content
    assert "Status: 5.1.1 (bad destination mailbox address)" in content
    assert "Mail server: mx1.example.com" in content
    # The remote server's reply is quoted.
    assert (
        "The server said: 550-5.1.1 <bob@example.com>: Recipient address rejected:"
        " 550 5.1.1 User unknown in virtual mailbox table" in content
    )
    assert "<carol@example.org>: delivery delayed" in content
    assert "Will keep trying until: Sun, 19 Nov 2023 22:13:20 +0000" in content
    assert "Your message is attached below." in content


# -- message/delivery-status fields --------------------------------------------------------------


def test_every_field_of_a_failed_report():
    # RFC 3464 §2.2-§2.3, RFC 3461 §6.3.
    per_message, per_recipient = delivery_status(render([failed_report()]))
    assert per_message == {
        "Original-Envelope-Id": "QQ314159@client.example.org",
        "Reporting-MTA": "dns; mx.example.net",
        "Received-From-MTA": "dns; client.example.org ([192.0.2.25])",
        "Arrival-Date": "Tue, 14 Nov 2023 22:13:20 +0000",
    }
    assert per_recipient == {
        "Original-Recipient": "rfc822;Bob@Example.COM",
        "Final-Recipient": "rfc822; bob@example.com",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx1.example.com",
        "Diagnostic-Code": "smtp; 550-5.1.1 <bob@example.com>: Recipient address rejected:"
        " 550 5.1.1 User unknown in virtual mailbox table",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 22:18:20 +0000",
    }
    # RFC 3464 ABNF order.
    assert field_names(per_message) == [
        "Original-Envelope-Id",
        "Reporting-MTA",
        "Received-From-MTA",
        "Arrival-Date",
    ]
    assert field_names(per_recipient) == [
        "Original-Recipient",
        "Final-Recipient",
        "Action",
        "Status",
        "Remote-MTA",
        "Diagnostic-Code",
        "Last-Attempt-Date",
    ]


def test_every_field_of_a_delayed_report():
    per_recipient = delivery_status(render([delayed_report()]))[1]
    assert per_recipient == {
        "Final-Recipient": "rfc822; carol@example.org",
        "Action": "delayed",
        "Status": "4.4.1",
        "Remote-MTA": "dns; mx.example.org",
        "Diagnostic-Code": "smtp; 421 4.4.1 mx.example.org: Service not available, try again later",
        "Last-Attempt-Date": "Wed, 15 Nov 2023 02:13:20 +0000",
        "Will-Retry-Until": "Sun, 19 Nov 2023 22:13:20 +0000",
    }
    assert field_names(per_recipient)[-1] == "Will-Retry-Until"


def test_email_package_reads_the_same_fields():
    dsn = render([failed_report(), delayed_report()])
    status_part = list(parse(dsn).iter_parts())[1]
    blocks = status_part.get_payload()
    assert isinstance(blocks, list)
    ours = delivery_status(dsn)
    assert len(blocks) == len(ours) == 3
    for theirs, mine in zip(blocks, ours, strict=True):
        assert {k: " ".join(str(v).split()) for k, v in theirs.items()} == {
            k: " ".join(v.split()) for k, v in mine.items()
        }


def test_one_block_per_recipient_in_order():
    # RFC 3461 §5.2.8: one DSN may cover several recipients.
    reports = [
        failed_report(final_recipient=f"user{i}@example.com", original_recipient=None)
        for i in range(3)
    ]
    blocks = delivery_status(render(reports))
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        f"rfc822; user{i}@example.com" for i in range(3)
    ]


def test_no_original_envelope_id_without_envid():
    # RFC 3464 §2.2.1, RFC 3461 §6.3 (a): MUST NOT without ENVID.
    per_message = delivery_status(render([failed_report()], message=stored_message(envid=None)))[0]
    assert "Original-Envelope-Id" not in per_message
    assert next(iter(per_message)) == "Reporting-MTA"


def test_original_envelope_id_is_the_decoded_envid_case_kept():
    # RFC 3461 §6.3 (a), RFC 3464 §2.2.1: the xtext-decoded value (stored decoded), case kept.
    message = stored_message(envid="Msg+2B1=Odd Case")
    assert delivery_status(render([failed_report()], message=message))[0][
        "Original-Envelope-Id"
    ] == ("Msg+2B1=Odd Case")


def test_original_recipient_only_with_orcpt():
    # RFC 3461 §6.3 (d), RFC 3464 §2.3.1: present iff ORCPT was received.
    with_orcpt, without = delivery_status(
        render([failed_report(), failed_report(original_recipient=None)])
    )[1:]
    assert with_orcpt["Original-Recipient"] == "rfc822;Bob@Example.COM"
    assert "Original-Recipient" not in without
    assert next(iter(without)) == "Final-Recipient"


def test_will_retry_until_only_for_delayed():
    # RFC 3464 §2.3.9: MUST NOT appear in other DSNs.
    until = ARRIVAL + 5 * 86400
    reports = [
        failed_report(will_retry_until=until),
        delayed_report(),
        failed_report(action="delivered", status="2.0.0", will_retry_until=until),
        failed_report(action="relayed", status="2.0.0", will_retry_until=until),
        failed_report(action="expanded", status="2.1.5", will_retry_until=until),
    ]
    blocks = delivery_status(render(reports))[1:]
    assert ["Will-Retry-Until" in b for b in blocks] == [False, True, False, False, False]


def test_diagnostic_code_and_remote_mta_for_remote_failures():
    # RFC 3461 §6.3 (h)-(i), §9.2.
    block = delivery_status(render([failed_report()]))[1]
    assert block["Remote-MTA"] == "dns; mx1.example.com"
    assert block["Diagnostic-Code"].startswith("smtp; 550-5.1.1 ")


def test_local_failure_has_no_remote_mta_or_diagnostic():
    report = failed_report(remote_mta=None, diagnostic=None, status="5.1.10", last_attempt=None)
    block = delivery_status(render([report]))[1]
    assert "Remote-MTA" not in block
    assert "Diagnostic-Code" not in block
    assert "Last-Attempt-Date" not in block  # RFC 3464 §2.3.7: MUST NOT when unknown
    assert block["Status"] == "5.1.10"


def test_bare_remote_host_gets_the_dns_type():
    block = delivery_status(render([failed_report(remote_mta="mx1.example.com")]))[1]
    assert block["Remote-MTA"] == "dns; mx1.example.com"


def test_remote_mta_address_is_a_domain_literal_even_in_old_records():
    # RFC 3461 §9.3: Remote-MTA is "a domain name or a domain-literal"; records stored
    # before the transports wrote [address] still render as one (RFC 5321 §4.1.3 form).
    for stored, shown in (
        ("dns; 127.0.0.1", b"Remote-MTA: dns; [127.0.0.1]\r\n"),
        ("dns; [127.0.0.1]", b"Remote-MTA: dns; [127.0.0.1]\r\n"),
        ("DNS;2001:db8::1", b"Remote-MTA: DNS; [IPv6:2001:db8::1]\r\n"),
        ("192.0.2.9", b"Remote-MTA: dns; [192.0.2.9]\r\n"),
        ("x-local; 127.0.0.1", b"Remote-MTA: x-local; 127.0.0.1\r\n"),
    ):
        dsn = render([failed_report(remote_mta=stored)])
        assert shown in dsn, stored
        assert b"Mail server: " + shown.split(b"; ", 1)[1].rstrip() + b"\r\n" in dsn


def test_untyped_diagnostic_gets_a_type():
    # RFC 3464 §2.3.6: diagnostic-type ";" *text; a stored value without one still renders.
    block = delivery_status(render([failed_report(diagnostic="550 5.1.1 User unknown")]))[1]
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    block = delivery_status(render([failed_report(diagnostic="disk on fire")]))[1]
    assert block["Diagnostic-Code"] == "x-local; disk on fire"


def test_multi_line_reply_joined_with_a_space_and_folded():
    # RFC 3461 §9.2: a SPACE before each continuation line.
    lines = [f"550-5.7.1 line {i} of a long policy explanation from the far side" for i in range(6)]
    lines.append("550 5.7.1 the end")
    diagnostic = smtp_diagnostic(lines)
    assert diagnostic == "smtp; " + " ".join(lines)
    dsn = render([failed_report(diagnostic=diagnostic, status="5.7.1")])
    assert delivery_status(dsn)[1]["Diagnostic-Code"] == diagnostic
    _, body = raw_parts(dsn)[1]
    assert all(len(line) <= 78 for line in body.split(b"\r\n"))
    assert body.count(b"\r\n ") >= len(diagnostic) // 78


def test_smtp_diagnostic_joins_embedded_line_breaks_and_escapes_controls():
    assert smtp_diagnostic(["250 ok\r\n"]) == "smtp; 250 ok"
    assert smtp_diagnostic(["550 a\r\n550 b"]) == "smtp; 550 a 550 b"
    assert smtp_diagnostic(["550 5.1.1 bad\x01user"]) == "smtp; 550 5.1.1 bad\\x{01}user"


@given(
    st.lists(
        st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120),
        min_size=1,
        max_size=6,
    )
)
def test_folding_is_transparent(texts):
    diagnostic = "smtp; " + " ".join(f"550-{text}" for text in texts)
    dsn = render([failed_report(diagnostic=diagnostic)])
    raw = raw_parts(dsn)[1][1].decode("ascii")
    unfolded = re.sub(r"\r\n(?=[ \t])", "", raw)
    assert f"Diagnostic-Code: {diagnostic}\r\n" in unfolded


def test_status_without_leading_zeros_and_fallbacks():
    # RFC 3464 §2.3.4 (status-code; fallback 4.0.0 / 5.0.0).
    blocks = delivery_status(
        render(
            [
                failed_report(status="5.01.001"),
                failed_report(status=None),
                delayed_report(status=None),
                failed_report(action="relayed", status=None),
                failed_report(action="delivered", status=None),
            ]
        )
    )[1:]
    assert [b["Status"] for b in blocks] == ["5.1.1", "5.0.0", "4.0.0", "2.1.9", "2.1.5"]


@pytest.mark.parametrize(
    ("action", "status"),
    [("failed", "2.0.0"), ("delayed", "5.1.1"), ("delivered", "4.4.1"), ("failed", "5.1")],
)
def test_status_that_does_not_fit_the_action_gives_way_to_the_default(action, status):
    # RFC 3464 §2.3.4: a stored code that cannot go with the Action
    # never stops the DSN; the Action's default code is reported instead.
    block = delivery_status(render([failed_report(action=action, status=status)]))[1]
    assert block["Status"] == {"failed": "5.0.0", "delayed": "4.0.0", "delivered": "2.1.5"}[action]


def test_failed_may_carry_a_persistent_transient_status():
    # The queue fails a recipient whose lifetime ran out with 4.4.7 (RFC 3886 §3.3.3).
    block = delivery_status(render([failed_report(status="4.4.7")]))[1]
    assert block["Status"] == "4.4.7"


def test_reporting_mta_without_a_domain_name():
    # RFC 3464 §2.2.2, RFC 3461 §6.3 (b): not "dns" when the FQDN is unknown.
    dsn = render([failed_report()], reporting_mta="localhost")
    assert delivery_status(dsn)[0]["Reporting-MTA"] == "x-local-hostname; localhost"


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (("192.0.2.25", "client.example.org"), "dns; client.example.org ([192.0.2.25])"),
        (("2001:db8::25", "v6.example.org"), "dns; v6.example.org ([2001:db8::25])"),
        (("192.0.2.25", ""), "dns; [192.0.2.25]"),
        (("", "local.example.net"), "dns; local.example.net"),
        (("", ""), None),
    ],
)
def test_received_from_mta(client, expected):
    # RFC 3464 §2.2.4: EHLO name, client address as a comment.
    client = ClientInfo(address=client[0], helo=client[1])
    per_message = delivery_status(render([failed_report()], message=stored_message(client=client)))[
        0
    ]
    assert per_message.get("Received-From-MTA") == expected


def test_non_ascii_final_recipient_uses_the_utf_8_type():
    # RFC 6533 §3: message/delivery-status stays 7-bit.
    report = failed_report(final_recipient="jösé+x@exämple.org", original_recipient=None)
    dsn = render([report])
    assert delivery_status(dsn)[1]["Final-Recipient"] == (
        r"utf-8; j\x{F6}s\x{E9}\x{2B}x@ex\x{E4}mple.org"
    )
    text = parse(dsn).get_body(("plain",))
    assert text is not None
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert "<jösé+x@exämple.org>: delivery failed" in text.get_content()
    assert dsn.isascii()


def test_dates_have_numeric_zones():
    # RFC 3464 §2.2.5, §2.3.7, §2.3.9.
    dsn = render([delayed_report()])
    dates = [
        value
        for block in delivery_status(dsn)
        for name, value in block.items()
        if name.endswith("Date") or name == "Will-Retry-Until"
    ]
    dates.append(parse(dsn)["Date"])
    assert len(dates) == 4
    for value in dates:
        assert re.fullmatch(r"\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}", value)
        assert not value.endswith("-0000")
    assert format_date(ARRIVAL + 0.9) == "Tue, 14 Nov 2023 22:13:20 +0000"


# -- returned content (RET) ---------------------------------------------------------------------


def returned(dsn: bytes) -> tuple[str, bytes] | None:
    parts = raw_parts(dsn)
    if len(parts) < 3:
        return None
    headers, body = parts[2]
    return headers["Content-Type"], body


def test_ret_full_failure_returns_the_whole_message():
    # RFC 3461 §4.3, §6.2: FULL -> whole message on failure DSNs.
    kind, body = returned(render([failed_report()], ret="FULL")) or ("", b"")
    assert kind == "message/rfc822"
    assert body == CONTENT
    inner = list(parse(render([failed_report()])).iter_parts())[2]
    attached = inner.get_content()
    assert attached["Message-ID"] == "<lunch.1@client.example.org>"


def test_no_ret_failure_returns_the_whole_message():
    # RFC 3461 §4.3: RET absent -> either; RFC 6522 §3 leans to full (doc/conformance.rst 6522-P1).
    assert returned(render([failed_report()], ret=None)) == ("message/rfc822", CONTENT)


@pytest.mark.parametrize("ret", ["HDRS", "hdrs"])
def test_ret_hdrs_gives_text_rfc822_headers(ret):
    # RFC 6522 §3-§4, RFC 3461 §4.3, §6.2.
    dsn = render([failed_report()], ret=ret)
    assert returned(dsn) == ("text/rfc822-headers", HEADER)
    assert list(parse(dsn).iter_parts())[2].get_content_type() == "text/rfc822-headers"
    text = parse(dsn).get_body(("plain",))
    assert text is not None and "The header of your message is attached" in text.get_content()


def test_ret_full_over_the_size_limit_falls_back_to_headers():
    # RFC 3461 §6.2: MAY return only the headers when too large.
    assert returned(render([failed_report()], max_full_size=len(CONTENT) - 1)) == (
        "text/rfc822-headers",
        HEADER,
    )
    assert returned(render([failed_report()], max_full_size=len(CONTENT))) == (
        "message/rfc822",
        CONTENT,
    )


@pytest.mark.parametrize("ret", ["FULL", None])
@pytest.mark.parametrize(
    "report",
    [
        delayed_report(),
        failed_report(action="delivered", status="2.0.0"),
        failed_report(action="relayed", status="2.0.0"),
        failed_report(action="expanded", status="2.1.5"),
    ],
)
def test_reports_without_a_failure_return_headers_only(ret, report):
    # RFC 3461 §6.2: no failure -> SHOULD return only the headers.
    assert returned(render([report], ret=ret)) == ("text/rfc822-headers", HEADER)


def test_a_failure_among_successes_returns_the_message():
    dsn = render([failed_report(action="delivered", status="2.0.0"), failed_report()])
    assert returned(dsn) == ("message/rfc822", CONTENT)


def test_no_content_no_third_part():
    dsn = render([failed_report()], content=None)
    assert [p.get_content_type() for p in parse(dsn).iter_parts()] == [
        "text/plain",
        "message/delivery-status",
    ]


def test_bare_lf_content_is_returned_with_crlf():
    content = CONTENT.replace(b"\r\n", b"\n")
    assert returned(render([failed_report()], content=content)) == ("message/rfc822", CONTENT)


EIGHT_BIT_BODY = CONTENT.replace(b"Alice\r\n", "Alice, Grüße\r\n".encode())
EIGHT_BIT_HEADER = CONTENT.replace(b"Subject: Lunch", "Subject: Mittagessen für".encode())


def test_eight_bit_body_on_a_seven_bit_path_returns_headers():
    # RFC 6522 §3 (our choice of its two options): headers only, the DSN stays 7-bit.
    dsn = render([failed_report()], content=EIGHT_BIT_BODY)
    assert returned(dsn) == ("text/rfc822-headers", HEADER)
    assert dsn.isascii()


def test_eight_bit_body_on_an_eight_bit_path_returns_the_message():
    dsn = render([failed_report()], content=EIGHT_BIT_BODY, eight_bit_ok=True)
    parts = raw_parts(dsn)
    assert parts[2] == (
        {
            "Content-Description": "Undelivered message",
            "Content-Type": "message/rfc822",
            "Content-Transfer-Encoding": "8bit",
        },
        EIGHT_BIT_BODY,
    )
    assert parse(dsn)["Content-Transfer-Encoding"] == "8bit"


def test_eight_bit_header_on_a_seven_bit_path_leaves_the_content_out():
    dsn = render([failed_report()], content=EIGHT_BIT_HEADER)
    assert returned(dsn) is None
    assert dsn.isascii()


def test_eight_bit_header_on_an_eight_bit_path_with_ret_hdrs():
    dsn = render([failed_report()], content=EIGHT_BIT_HEADER, ret="HDRS", eight_bit_ok=True)
    headers, body = raw_parts(dsn)[2]
    assert headers["Content-Type"] == "text/rfc822-headers"
    assert headers["Content-Transfer-Encoding"] == "8bit"
    assert body == EIGHT_BIT_HEADER[: EIGHT_BIT_HEADER.index(b"\r\n\r\n") + 2]


def test_bad_ret_is_refused():
    with pytest.raises(ValueError, match="RET"):
        render([failed_report()], ret="BOTH")


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["transferred", "opaque", "Failed", "bounced"])
def test_actions_a_dsn_cannot_carry_are_refused(action):
    # RFC 3464 §2.3.3, doc/conformance.rst 3886-P4: never transferred/opaque in a DSN.
    with pytest.raises(ValueError, match="cannot appear in a DSN"):
        render([failed_report(action=action)])


@pytest.mark.parametrize("sender", ["", "<>"])
def test_null_sender_gets_no_dsn(sender):
    # RFC 3461 §5.2.
    with pytest.raises(ValueError, match="null reverse-path"):
        render([failed_report()], message=stored_message(sender=sender))


def test_no_recipients_no_dsn():
    with pytest.raises(ValueError, match="at least one recipient"):
        render([])


def assert_safe_dsn(dsn: bytes) -> EmailMessage:
    """The DSN parses, its delivery-status part parses into blocks, and every line is at
    most 998 octets with no bare CR or LF and no control character but HTAB (RFC 5322
    §2.1.1, §2.2; RFC 3464 §2.1)."""
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", dsn) is None, "bare CR or LF"
    for line in dsn.split(b"\r\n"):
        assert len(line) <= 998
        assert re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", line) is None, line
    message = parse(dsn)
    assert not message.defects
    assert "Bcc" not in message
    (status,) = [p for p in message.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2
    for block in blocks:
        assert not block.defects
        assert "Bcc" not in block
    delivery_status(dsn)  # and by hand: every line of every block is a field
    return message


@pytest.mark.parametrize("bad", ["\r\n", "\n", "\r", "\x00", "\x01", "\x1b", "\x7f"])
@pytest.mark.parametrize(
    "where",
    [
        "diagnostic",
        "final_recipient",
        "original_recipient",
        "remote_mta",
        "envid",
        "sender",
        "helo",
        "reporting_mta",
    ],
)
def test_control_characters_in_values_are_escaped(where, bad):
    # RFC 3464 §2.1 (fields are header lines): no header injection into the DSN, and no
    # value stops it.
    value = f"x{bad}Bcc: victim@example.com"
    report = failed_report()
    message = stored_message()
    reporting_mta = MTA
    if where in ("diagnostic", "final_recipient", "original_recipient", "remote_mta"):
        prefix = {"diagnostic": "smtp; ", "original_recipient": "rfc822;"}.get(where, "")
        report = replace(report, **{where: prefix + value})
    elif where in ("envid", "sender"):
        message = replace(message, **{where: value})
    elif where == "helo":
        message = replace(message, client=ClientInfo(address="192.0.2.1", helo=value))
    elif where == "reporting_mta":
        reporting_mta = value
    dsn = render([report], message=message, reporting_mta=reporting_mta)
    assert_safe_dsn(dsn)
    escaped = "".join(f"\\x{{{ord(c):02X}}}" for c in bad)
    assert f"x{escaped}Bcc".encode() in dsn.replace(b"\r\n ", b" ")


def test_reproduction_helo_with_a_control_character():
    # The first reproduction: EHLO evil\x01host (stored before the command
    # refused it), then NOTIFY=SUCCESS to a local recipient.
    message = stored_message(client=ClientInfo(address="192.0.2.1", helo="evil\x01host"))
    report = failed_report(action="delivered", status="2.0.0", diagnostic=None)
    dsn = render([report], message=message)
    assert_safe_dsn(dsn)
    assert delivery_status(dsn)[0]["Received-From-MTA"] == ("dns; evil\\x{01}host ([192.0.2.1])")


def test_reproduction_next_hop_reply_with_a_control_character():
    # The second reproduction: RCPT answered with 550 5.1.1 bad\x01user.
    diagnostic = smtp_diagnostic(["550 5.1.1 bad\x01user"])
    dsn = render([failed_report(diagnostic=diagnostic)])
    assert_safe_dsn(dsn)
    assert delivery_status(dsn)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 bad\\x{01}user"
    # A reply stored raw (by an older version) renders the same way.
    dsn = render([failed_report(diagnostic="smtp; 550 5.1.1 bad\x01user")])
    assert delivery_status(dsn)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 bad\\x{01}user"
    assert "bad\\x{01}user" in parse(dsn).get_body(("plain",)).get_content()


def test_message_id_factory_with_a_control_character_is_a_programming_error():
    with pytest.raises(DsnFieldError):
        render_dsn(
            message=stored_message(),
            recipients=[failed_report()],
            reporting_mta=MTA,
            original_content=CONTENT,
            ret=None,
            max_full_size=10_000_000,
            now=NOW,
            new_message_id=lambda domain: f"<x\r\nBcc: v@example.com@{domain}>",
        )


_ANY_TEXT = st.text(st.characters(codec=None), max_size=300) | st.text(
    st.sampled_from("a \t\r\n\x00\x01\x7f()\\;=+é€😀"), max_size=2500
)


@given(
    helo=_ANY_TEXT,
    address=_ANY_TEXT,
    sender=_ANY_TEXT,
    envid=_ANY_TEXT,
    final=_ANY_TEXT,
    original=_ANY_TEXT,
    remote=_ANY_TEXT,
    diagnostic=_ANY_TEXT,
    status=st.none() | _ANY_TEXT,
)
def test_any_stored_values_render_a_dsn_that_parses(
    helo, address, sender, envid, final, original, remote, diagnostic, status
):
    message = stored_message(
        client=ClientInfo(address=address, helo=helo), sender="s" + sender, envid=envid
    )
    report = failed_report(
        final_recipient=final or "f",
        original_recipient=original,
        remote_mta=remote,
        diagnostic=diagnostic,
        status=status,
    )
    assert_safe_dsn(render([report, delayed_report()], message=message))


def test_tab_is_allowed_in_values():
    block = delivery_status(render([failed_report(diagnostic="smtp; 550 5.1.1 tab\there")]))[1]
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 tab\there"


def test_dsn_field_error_is_a_value_error():
    assert issubclass(DsnFieldError, ValueError)


# -- boundary and Message-ID ------------------------------------------------------------------


def test_boundary_found_in_the_content_is_replaced():
    content = CONTENT + b"--" + BOUNDARY.encode() + b"\r\n"
    choices = iter([BOUNDARY, "=_dsn_other"])
    dsn = render_dsn(
        message=stored_message(),
        recipients=[failed_report()],
        reporting_mta=MTA,
        original_content=content,
        ret="FULL",
        max_full_size=10_000_000,
        now=NOW,
        new_boundary=lambda: next(choices),
    )
    message = parse(dsn)
    assert message.get_boundary() == "=_dsn_other"
    assert len(list(message.iter_parts())) == 3


@pytest.mark.parametrize("boundary", ["", 'has"quote', "x" * 71, "trailing "])
def test_invalid_boundary_is_refused(boundary):
    with pytest.raises(ValueError, match="boundary"):
        render_dsn(
            message=stored_message(),
            recipients=[failed_report()],
            reporting_mta=MTA,
            original_content=CONTENT,
            ret="FULL",
            max_full_size=10_000_000,
            now=NOW,
            new_boundary=lambda: boundary,
        )


def test_default_factories_are_random_and_valid():
    assert random_boundary() != random_boundary()
    assert re.fullmatch(r"<dsn\.[0-9a-f]{32}@mx\.example\.net>", random_message_id(MTA))
    dsn = render_dsn(
        message=stored_message(),
        recipients=[failed_report()],
        reporting_mta=MTA,
        original_content=CONTENT,
        ret=None,
        max_full_size=10_000_000,
        now=NOW,
    )
    message = parse(dsn)
    assert message.get_boundary() is not None
    assert len(list(message.iter_parts())) == 3


# -- from the tracking store ------------------------------------------------------------------


def stored_recipient(**changes: object) -> StoredRecipient:
    base = StoredRecipient(
        index=0,
        address="Bob@Example.COM",
        orcpt=OriginalRecipient("rfc822", "Bob@Example.COM"),
        notify=frozenset({"FAILURE"}),
        final_recipient="bob@example.com",
        state=RecipientState.DEFERRED,
        action="delayed",
        status="4.4.1",
        remote_mta="dns; old.example.com",
        diagnostic="smtp; 421 4.4.1 old",
        last_attempt=ARRIVAL + 60,
        will_retry_until=ARRIVAL + 86400,
    )
    return replace(base, **changes)


def test_report_from_an_update():
    update = RecipientUpdate(
        index=0,
        state=RecipientState.FAILED,
        status="5.1.1",
        action="failed",
        remote_mta="dns; mx1.example.com",
        diagnostic=USER_UNKNOWN,
        last_attempt=ARRIVAL + 300.5,
    )
    report = RecipientReport.from_stored(stored_recipient(), "failed", update)
    assert report == RecipientReport(
        final_recipient="bob@example.com",
        action="failed",
        status="5.1.1",
        original_recipient="rfc822;Bob@Example.COM",
        remote_mta="dns; mx1.example.com",
        diagnostic=USER_UNKNOWN,
        last_attempt=ARRIVAL + 300.5,
        will_retry_until=None,
    )


def test_report_from_the_stored_state_without_orcpt():
    report = RecipientReport.from_stored(stored_recipient(orcpt=None), "delayed")
    assert report.original_recipient is None
    assert report.status == "4.4.1"
    assert report.remote_mta == "dns; old.example.com"
    assert report.will_retry_until == ARRIVAL + 86400


# -- golden files -------------------------------------------------------------------------------


def golden_failed() -> bytes:
    return render([failed_report()], ret="FULL")


def golden_delayed() -> bytes:
    return render([delayed_report()], message=stored_message(envid=None, ret=None), ret=None)


def golden_delivered() -> bytes:
    report = RecipientReport(
        final_recipient="bob@example.com",
        original_recipient="rfc822;Bob@Example.COM",
        action="delivered",
        status="2.0.0",
        remote_mta="dns; lmtp.example.net",
        diagnostic="smtp; 250 2.0.0 <bob@example.com> Ok: saved",
        last_attempt=ARRIVAL + 1,
    )
    return render([report], message=stored_message(ret="HDRS"), ret="HDRS")


def golden_relayed() -> bytes:
    reports = [
        RecipientReport(
            final_recipient=address,
            action="relayed",
            status="2.0.0",
            remote_mta="dns; legacy.example.com",
            diagnostic="smtp; 250 2.1.5 Ok",
            last_attempt=ARRIVAL + 2,
        )
        for address in ("dave@legacy.example.com", "erin@legacy.example.com")
    ]
    return render(reports, message=stored_message(envid="lunch-2023-11"), ret=None)


@pytest.mark.parametrize(
    ("name", "build"),
    [
        ("failed.eml", golden_failed),
        ("delayed.eml", golden_delayed),
        ("delivered.eml", golden_delivered),
        ("relayed.eml", golden_relayed),
    ],
)
def test_golden(name, build):
    expected = (GOLDEN / name).read_bytes()
    assert build() == expected


def test_deliver_by_date_follows_arrival_date_when_the_message_had_by():
    # RFC 2852 §5: per-message deliver-by-date-field, after the arrival-date-field.
    message = stored_message(deliver_by=ARRIVAL + 120)
    per_message = delivery_status(render([failed_report(status="5.4.7")], message=message))[0]
    assert per_message["Deliver-By-Date"] == "Tue, 14 Nov 2023 22:15:20 +0000"
    assert list(per_message)[-2:] == ["Arrival-Date", "Deliver-By-Date"]
    plain = delivery_status(render([failed_report()]))[0]
    assert "Deliver-By-Date" not in plain
