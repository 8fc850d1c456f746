"""Tests for the DELIVERBY extension's BY= parameter and EHLO line (RFC 2852 §2-§4)."""

from __future__ import annotations

import json

import pytest
from test_smtp_params import ALL
from test_smtp_server import Client, RecordingReceiver, make_factory
from twisted.internet.testing import MemoryReactorClock

from mtrkmta.envelope import DeliverBy, Envelope, MailParams, RcptParams, Recipient
from mtrkmta.smtp.command import parse_mail
from mtrkmta.smtp.deliverby import (
    DeliverByError,
    ehlo_line,
    parse_by,
    parse_min_by_time,
    render_by,
)
from mtrkmta.smtp.outbound import (
    deliver_by_relayed_dsn,
    deliverby_refusal,
    mail_parameters,
    n_mode_adds_delay,
    rcpt_parameters,
    remaining_by_time,
)
from mtrkmta.smtp.params import parse_mail_params
from mtrkmta.smtp.reply import SMTPError
from mtrkmta.spool.codec import decode_envelope, encode_envelope

WITH_BY = ALL | {"DELIVERBY"}


def mail(params: str, advertised: frozenset[str] = WITH_BY, min_by_time: int = 0) -> MailParams:
    _, raw = parse_mail(f"FROM:<a@b.example> {params}")
    return parse_mail_params(raw, advertised=advertised, min_by_time=min_by_time)


def mail_error(params: str, advertised: frozenset[str] = WITH_BY, minimum: int = 0) -> str:
    with pytest.raises(SMTPError) as info:
        mail(params, advertised, minimum)
    reply = info.value.reply
    return f"{reply.code} {reply.enhanced} {reply.lines[0]}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120;R", DeliverBy(120, "R", False)),
        ("+120;RT", DeliverBy(120, "R", True)),
        ("999999999;N", DeliverBy(999_999_999, "N", False)),
        ("-999999999;NT", DeliverBy(-999_999_999, "N", True)),
        ("0;N", DeliverBy(0, "N", False)),
        ("-5;n", DeliverBy(-5, "N", False)),
        ("1;rt", DeliverBy(1, "R", True)),
    ],
)
def test_by_values_of_the_grammar_decode(value: str, expected: DeliverBy) -> None:
    """RFC 2852 §4: by-value = by-time ";" by-mode [by-trace], by-time ±1*9digit."""
    assert parse_by(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "1000000000;R",
        "120",
        "120;",
        ";R",
        "120;X",
        "120;RTT",
        "120;TR",
        "12 0;R",
        "+-1;N",
        "0;R",
        "-1;R",
        "-0;RT",
        "120;R ",
        "١٢;R",
    ],
)
def test_malformed_or_non_positive_r_values_are_refused(value: str) -> None:
    """RFC 2852 §4: at most 9 digits; R with a zero or negative by-time is a syntax error."""
    with pytest.raises(DeliverByError):
        parse_by(value)


def test_mail_by_is_stored_on_the_params() -> None:
    assert mail("BY=60;NT").deliver_by == DeliverBy(60, "N", True)
    assert mail("SIZE=10").deliver_by is None


def test_mail_by_errors_carry_the_rfc_codes() -> None:
    assert mail_error("BY=0;R") == "501 5.5.4 Invalid BY parameter"  # RFC 2852 §4
    assert mail_error("BY=x") == "501 5.5.4 Invalid BY parameter"
    assert mail_error("BY") == "501 5.5.4 BY requires a value"
    assert mail_error("BY=60;R BY=60;R") == "501 5.5.4 Duplicate BY parameter"
    assert mail_error("BY=60;R", advertised=ALL) == "555 5.5.4 BY not supported"
    # RFC 2852 §3: R below the advertised min-by-time is a permanent 55z failure
    assert mail_error("BY=59;R", minimum=60).startswith("555 5.5.4 BY time below the minimum")
    assert mail("BY=60;R", min_by_time=60).deliver_by == DeliverBy(60, "R", False)
    assert mail("BY=1;N", min_by_time=60).deliver_by == DeliverBy(1, "N", False)  # R only


def test_ehlo_line_and_a_servers_min_by_time() -> None:
    """RFC 2852 §2(3): DELIVERBY [min-by-time *(',' extension-token)]."""
    assert ehlo_line(0) == "DELIVERBY"
    assert ehlo_line(300) == "DELIVERBY 300"
    with pytest.raises(ValueError):
        ehlo_line(1_000_000_000)
    assert parse_min_by_time("300") == 300
    assert parse_min_by_time("300,future") == 300
    assert parse_min_by_time("") is None
    assert parse_min_by_time("soon") is None


def test_render_by_clamps_to_the_grammar() -> None:
    assert render_by(45, "R", False) == "45;R"
    assert render_by(-3, "N", True) == "-3;NT"
    assert render_by(-(10**12), "N", False) == "-999999999;N"
    assert parse_by(render_by(10**12, "R", True)) == DeliverBy(999_999_999, "R", True)


def _envelope(params: MailParams) -> Envelope:
    return Envelope(queue_id="0abc", sender="a@example.org", recipients=(), params=params)


def test_spool_codec_keeps_by_and_old_files_still_decode() -> None:
    envelope = _envelope(MailParams(deliver_by=DeliverBy(-7, "N", True)))
    encoded = encode_envelope(envelope)
    assert json.loads(encoded)["params"]["deliver_by"] == {
        "seconds": -7,
        "mode": "N",
        "trace": True,
    }
    assert decode_envelope(encoded) == envelope
    plain = encode_envelope(_envelope(MailParams()))
    assert b"deliver_by" not in plain  # written only when there is one: old readers unaffected
    assert decode_envelope(plain).params.deliver_by is None


def _by_envelope(by: DeliverBy) -> Envelope:
    return Envelope("q", "a@b", (), MailParams(deliver_by=by), arrival=1000.0)


def test_by_is_relayed_with_the_time_remaining_only_to_a_deliverby_hop() -> None:
    """RFC 2852 §4.1.4: a new BY with the seconds left; negative once passed (N only)."""
    envelope = _by_envelope(DeliverBy(120, "R", True))
    sent, _ = mail_parameters(envelope, {"DELIVERBY": ""}, 1030.9, size=1, default_retention=86400)
    assert sent == ["BY=90;RT"]  # 30 whole seconds spent here
    late, _ = mail_parameters(
        _by_envelope(DeliverBy(60, "N")),
        {"DELIVERBY": ""},
        1100.0,
        size=1,
        default_retention=86400,
    )
    assert late == ["BY=-40;N"]
    none, _ = mail_parameters(
        _by_envelope(DeliverBy(60, "N")), {}, 1001.0, size=1, default_retention=86400
    )
    assert none == []
    assert remaining_by_time(envelope, 990.0) == 120  # a clock that went back spends nothing


def test_an_r_message_is_not_relayed_where_it_cannot_keep_its_deadline() -> None:
    """RFC 2852 §4.1.4.1: not to a hop without DELIVERBY, nor one whose minimum exceeds
    the time left; N goes anywhere (§4.1.4.2)."""
    r = _by_envelope(DeliverBy(120, "R"))
    assert deliverby_refusal(r, {}, 1000.0) == "5.3.3"
    assert deliverby_refusal(r, {"DELIVERBY": "100"}, 1030.0) == "5.3.3"  # 90 left < 100
    assert deliverby_refusal(r, {"DELIVERBY": "90"}, 1030.0) is None
    assert deliverby_refusal(r, {"DELIVERBY": ""}, 1120.0) == "5.4.7"
    assert deliverby_refusal(_by_envelope(DeliverBy(120, "N")), {}, 2000.0) is None


def test_the_server_advertises_its_minimum_and_keeps_by_on_the_envelope() -> None:
    """RFC 2852 §2-§4 on the wire: DELIVERBY <min>, R below it 555, BY kept on the envelope;
    the LMTP listener does not offer it (final delivery has no deadline to keep)."""
    receiver = RecordingReceiver()
    client = Client(make_factory(receiver, MemoryReactorClock(), deliverby_min=60))
    try:
        assert client.send(b"EHLO c.example\r\n")[-1] == b"250 DELIVERBY 60"
        refused = client.send(b"MAIL FROM:<s@c.example> BY=59;R\r\n")
        assert refused == [b"555 5.5.4 BY time below the minimum of 60 seconds"]
        assert client.send(b"MAIL FROM:<s@c.example> BY=0;R\r\n")[0].startswith(b"501 5.5.4")
        client.send(b"MAIL FROM:<s@c.example> BY=60;RT\r\nRCPT TO:<u@x.example>\r\n")
        client.send(b"DATA\r\n")
        client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        envelope, _ = receiver.accepted[0]
        assert envelope.params.deliver_by == DeliverBy(60, "R", True)
    finally:
        client.close()
    lmtp = Client(make_factory(RecordingReceiver(), MemoryReactorClock(), listener="lmtp"))
    try:
        assert not any(b"DELIVERBY" in line for line in lmtp.send(b"EHLO c.example\r\n"))
    finally:
        lmtp.close()


BY_HOP = {"DELIVERBY": "", "DSN": "", "PIPELINING": ""}
DSN_HOP = {"DSN": "", "PIPELINING": ""}


def test_relayed_dsn_for_trace_and_for_n_to_a_hop_without_deliverby() -> None:
    plain = Recipient("r@dest.example")
    never = Recipient("r@dest.example", RcptParams(notify=frozenset({"NEVER"})))
    failure = Recipient("r@dest.example", RcptParams(notify=frozenset({"FAILURE"})))
    # RFC 2852 §4.1.4: T -> relayed DSN, whatever the hop, unless NOTIFY=NEVER.
    traced = _by_envelope(DeliverBy(600, "R", True))
    assert deliver_by_relayed_dsn(traced, plain, BY_HOP, 1000.0)
    assert deliver_by_relayed_dsn(traced, failure, BY_HOP, 1000.0)
    assert not deliver_by_relayed_dsn(traced, never, BY_HOP, 1000.0)
    null_sender = Envelope("q", "", (), MailParams(deliver_by=DeliverBy(600, "R", True)), 1000.0)
    assert not deliver_by_relayed_dsn(null_sender, plain, BY_HOP, 1000.0)  # RFC 3461 §5.2
    # RFC 2852 §4.1.4.2: N, before its deadline, to a hop without DELIVERBY: MUST.
    n = _by_envelope(DeliverBy(600, "N"))
    assert deliver_by_relayed_dsn(n, failure, DSN_HOP, 1010.0)
    assert not deliver_by_relayed_dsn(n, failure, BY_HOP, 1010.0)
    assert not deliver_by_relayed_dsn(n, failure, DSN_HOP, 1600.0)
    assert not deliver_by_relayed_dsn(_by_envelope(DeliverBy(600, "R")), plain, BY_HOP, 1000.0)


def test_n_to_a_dsn_hop_without_deliverby_asks_for_delay() -> None:
    # RFC 2852 §4.1.4.2: absent NOTIFY -> FAILURE,DELAY; DELAY added unless NEVER.
    n = _by_envelope(DeliverBy(600, "N"))
    assert n_mode_adds_delay(n, DSN_HOP, 1000.0)
    assert not n_mode_adds_delay(n, BY_HOP, 1000.0)
    assert not n_mode_adds_delay(n, DSN_HOP, 1600.0)  # only before the deliver-by-time
    assert not n_mode_adds_delay(_by_envelope(DeliverBy(600, "R")), DSN_HOP, 1000.0)
    plain = Recipient("r@dest.example")
    success = Recipient("r@dest.example", RcptParams(notify=frozenset({"SUCCESS"})))
    never = Recipient("r@dest.example", RcptParams(notify=frozenset({"NEVER"})))
    assert rcpt_parameters(plain, DSN_HOP, add_delay=True)[0] == "NOTIFY=FAILURE,DELAY"
    assert rcpt_parameters(success, DSN_HOP, add_delay=True)[0] == "NOTIFY=SUCCESS,DELAY"
    assert rcpt_parameters(never, DSN_HOP, add_delay=True)[0] == "NOTIFY=NEVER"
    assert rcpt_parameters(plain, DSN_HOP)[0].startswith("ORCPT=")
