"""The pure outbound rules: MAIL/RCPT parameters per next hop (RFC 3885 §3.1,
§3.3; RFC 3461 §5.2; RFC 3886 §3.5), stuffing."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtrkmta.envelope import Envelope, MailParams, Mtrk, OriginalRecipient, RcptParams, Recipient
from mtrkmta.smtp import xtext
from mtrkmta.smtp.framing import DataReader
from mtrkmta.smtp.outbound import (
    DotStuffer,
    dot_stuff,
    mail_parameters,
    rcpt_parameters,
    remaining_timeout,
    smtputf8_status,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CERTIFIER = bytes(range(20))
# Unpadded, 27 characters: RFC 3885 §1 base64 and RFC 5321 §4.1.2 esmtp-value have no "=".
CERTIFIER_B64 = base64.b64encode(CERTIFIER).decode("ascii").rstrip("=")
DAY = 86400.0
ARRIVAL = 1_700_000_000.0

MTRK_HOP = {"MTRK": "", "DSN": "", "SIZE": "10240000", "8BITMIME": "", "PIPELINING": ""}
DSN_HOP = {"DSN": "", "SIZE": "10240000", "8BITMIME": "", "PIPELINING": ""}  # Postfix-like
BARE_HOP = {"8BITMIME": "", "PIPELINING": "", "ENHANCEDSTATUSCODES": ""}  # Dovecot-like


def envelope(
    *,
    timeout: int | None = 3600,
    mtrk: bool = True,
    envid: str | None = "abc+1=x@client.example",
    ret: str | None = "HDRS",
    body: str | None = None,
    smtputf8: bool = False,
    sender: str = "alice@client.example",
    recipients: tuple[Recipient, ...] = (Recipient("bob@example.test"),),
) -> Envelope:
    return Envelope(
        queue_id="Q1",
        sender=sender,
        recipients=recipients,
        params=MailParams(
            envid=envid,
            ret=ret,
            body=body,
            smtputf8=smtputf8,
            mtrk=Mtrk(CERTIFIER, timeout) if mtrk else None,
        ),
        arrival=ARRIVAL,
    )


def params(env: Envelope, hop: dict[str, str], now: float = ARRIVAL + 100.5) -> list[str]:
    return mail_parameters(env, hop, now, size=1234, default_retention=9 * DAY)[0]


def mtrk_of(words: list[str]) -> str | None:
    found = [w for w in words if w.startswith("MTRK=")]
    assert len(found) <= 1
    return found[0] if found else None


# -- RFC 3885 §3.1: timeout decrement -------------------------------------------------


def test_timeout_is_decremented_by_whole_seconds_spent_here():
    # RFC 3885 §3.1: 100.5 s after arrival, 100 whole seconds have passed.
    words, forwarded = mail_parameters(
        envelope(timeout=3600), MTRK_HOP, ARRIVAL + 100.5, size=10, default_retention=9 * DAY
    )
    assert mtrk_of(words) == f"MTRK={CERTIFIER_B64}:3500"
    assert forwarded is True


def test_no_requested_timeout_uses_local_default_retention():
    # doc/conformance.rst 3885-P5: the local default retention is the base when no timeout arrived.
    words, forwarded = mail_parameters(
        envelope(timeout=None), MTRK_HOP, ARRIVAL + 60, size=10, default_retention=2 * DAY
    )
    assert mtrk_of(words) == f"MTRK={CERTIFIER_B64}:{int(2 * DAY) - 60}"
    assert forwarded


@pytest.mark.parametrize("spent", [3600, 3600.9, 5000])
def test_mtrk_omitted_when_remaining_is_zero_or_less(spent):
    # RFC 3885 §3.1 (MUST): remaining <= 0 -> omit the whole MTRK= parameter; ENVID stays.
    words, forwarded = mail_parameters(
        envelope(timeout=3600), MTRK_HOP, ARRIVAL + spent, size=10, default_retention=DAY
    )
    assert mtrk_of(words) is None and forwarded is False
    assert "ENVID=abc+2B1+3Dx@client.example" in words


def test_one_second_left_is_still_sent():
    assert remaining_timeout(envelope(timeout=3600), ARRIVAL + 3599.99, DAY) == 1


def test_clock_before_arrival_counts_as_no_time_spent():
    assert remaining_timeout(envelope(timeout=3600), ARRIVAL - 50, DAY) == 3600


def test_untracked_message_has_no_remaining_timeout():
    assert remaining_timeout(envelope(mtrk=False), ARRIVAL, DAY) is None


# -- RFC 3885 §3.3, RFC 3461 §5.2.2(a): MTRK only to MTRK hops, DSN parameters only to DSN hops


def test_mtrk_hop_gets_mtrk_envid_ret_size():
    # RFC 3885 §3.3: forward unexpired certifiers to an MTRK-capable next hop, with ENVID (xtext).
    words = params(envelope(), MTRK_HOP)
    assert words == [
        "SIZE=1234",
        "ENVID=abc+2B1+3Dx@client.example",
        "RET=HDRS",
        f"MTRK={CERTIFIER_B64}:3500",
    ]


def test_dsn_hop_without_mtrk_keeps_envid_and_ret_but_drops_mtrk():
    # RFC 3885 §3.3 (MUST): next hop lacks MTRK -> drop MTRK=; it has DSN -> keep ENVID (and RET).
    words, forwarded = mail_parameters(
        envelope(), DSN_HOP, ARRIVAL + 1, size=5, default_retention=DAY
    )
    assert mtrk_of(words) is None and forwarded is False
    assert words == ["SIZE=5", "ENVID=abc+2B1+3Dx@client.example", "RET=HDRS"]


def test_hop_without_dsn_gets_nothing_dsn_related():
    # RFC 3461 §5.2.2(a) (MUST): no ENVID/RET (nor MTRK) to a hop without DSN.
    words, forwarded = mail_parameters(
        envelope(), BARE_HOP, ARRIVAL + 1, size=5, default_retention=DAY
    )
    assert words == [] and forwarded is False


def test_envid_ret_never_invented():
    # RFC 3461 §5.2.1: never invent ENVID/RET that did not arrive.
    words = params(envelope(mtrk=False, envid=None, ret=None), MTRK_HOP)
    assert words == ["SIZE=1234"]


def test_mtrk_without_envid_is_not_sent():
    # 3885 §3.2: MTRK needs ENVID; a stray certifier without one stays here.
    assert mtrk_of(params(envelope(envid=None), MTRK_HOP)) is None


def test_mtrk_keyword_with_parameters_is_recognised():
    # RFC 3885 §2: recognise MTRK even if a future server appends parameters to it.
    hop = {**MTRK_HOP, "MTRK": "FUTURE=1"}
    assert mtrk_of(params(envelope(), hop)) == f"MTRK={CERTIFIER_B64}:3500"


def test_lmtp_lda_with_mtrk_gets_the_same_as_an_mtrk_mta():
    # RFC 3886 §3.5, doc/conformance.rst 2033-P1: an MTRK-aware LDA gets MTRK=/ENVID= exactly as
    # a compliant MTA.
    lda = {"MTRK": "", "DSN": "", "8BITMIME": "", "PIPELINING": "", "ENHANCEDSTATUSCODES": ""}
    assert params(envelope(), lda) == [
        "ENVID=abc+2B1+3Dx@client.example",
        "RET=HDRS",
        f"MTRK={CERTIFIER_B64}:3500",
    ]


def test_lmtp_lda_without_dsn_gets_no_dsn_parameters():
    # doc/conformance.rst 2033-P2: an LDA without DSN (Dovecot answers 555 to them) gets none.
    dovecot = {"8BITMIME": "", "CHUNKING": "", "ENHANCEDSTATUSCODES": "", "PIPELINING": ""}
    env = envelope(
        recipients=(Recipient("u@example.test", RcptParams(frozenset({"SUCCESS"}))),),
        body="8BITMIME",
    )
    assert params(env, dovecot) == ["BODY=8BITMIME"]
    assert rcpt_parameters(env.recipients[0], dovecot) == []


# -- SIZE, BODY, SMTPUTF8 --------------------------------------------------------------------


def test_size_only_when_advertised():
    assert "SIZE=1234" not in params(envelope(), BARE_HOP)
    assert "SIZE=1234" in params(envelope(), DSN_HOP)


def test_body_8bitmime_passed_only_to_8bitmime_hops():
    env = envelope(body="8BITMIME", mtrk=False, envid=None, ret=None)
    assert params(env, DSN_HOP) == ["SIZE=1234", "BODY=8BITMIME"]
    # A hop without 8BITMIME gets the content anyway, without BODY= (documented choice).
    assert params(env, {"SIZE": ""}) == ["SIZE=1234"]


def test_smtputf8_only_when_received_with_it_and_offered():
    env = envelope(smtputf8=True, mtrk=False, envid=None, ret=None)
    assert params(env, {"SMTPUTF8": ""}) == ["SMTPUTF8"]
    assert params(env, {}) == []
    assert params(envelope(mtrk=False, envid=None, ret=None), {"SMTPUTF8": ""}) == []


def test_smtputf8_status_needs_non_ascii_somewhere():
    ascii_only = envelope(smtputf8=True)
    assert smtputf8_status(ascii_only, (0,), b"Subject: hi\r\n\r\nbody\r\n") is None
    assert smtputf8_status(ascii_only, (0,), "Subject: h\u00e9\r\n\r\n".encode()) == "5.6.9"
    assert smtputf8_status(ascii_only, (0,), "Subject: x\r\n\r\nb\u00e9dy\r\n".encode()) is None
    utf8_rcpt = envelope(smtputf8=True, recipients=(Recipient("j\u00fcrgen@example.test"),))
    assert smtputf8_status(utf8_rcpt, (0,), b"\r\n") == "5.6.7"
    not_flagged = envelope(recipients=(Recipient("j\u00fcrgen@example.test"),))
    assert smtputf8_status(not_flagged, (0,), b"\r\n") is None


# -- RCPT parameters ----------------------------------------------------------------------


def test_rcpt_keeps_notify_and_orcpt_for_dsn_hop():
    # RFC 3461 §5.2.1: pass NOTIFY and ORCPT unchanged (ORCPT byte-exact, xtext-encoded again).
    recipient = Recipient(
        "bob@example.test",
        RcptParams(
            notify=frozenset({"DELAY", "SUCCESS"}),
            orcpt=OriginalRecipient("rfc822", "Orig+user=x@Example.test"),
        ),
    )
    assert rcpt_parameters(recipient, DSN_HOP) == [
        "NOTIFY=SUCCESS,DELAY",
        "ORCPT=rfc822;Orig+2Buser+3Dx@Example.test",
    ]
    assert rcpt_parameters(recipient, MTRK_HOP) == rcpt_parameters(recipient, DSN_HOP)


def test_rcpt_notify_never_and_no_invented_notify():
    never = Recipient("b@example.test", RcptParams(notify=frozenset({"NEVER"})))
    assert rcpt_parameters(never, DSN_HOP)[0] == "NOTIFY=NEVER"
    plain = Recipient("b@example.test")
    # NOTIFY never invented; ORCPT MAY be added equal to the RCPT address (3461 §5.2.1).
    assert rcpt_parameters(plain, DSN_HOP) == ["ORCPT=rfc822;b@example.test"]


def test_rcpt_orcpt_not_added_for_non_ascii_address():
    assert rcpt_parameters(Recipient("j\u00fcrgen@example.test"), DSN_HOP) == []


def test_rcpt_nothing_dsn_related_to_non_dsn_hop():
    recipient = Recipient(
        "bob@example.test",
        RcptParams(notify=frozenset({"FAILURE"}), orcpt=OriginalRecipient("rfc822", "o@x")),
    )
    assert rcpt_parameters(recipient, BARE_HOP) == []


def test_relayed_envid_and_orcpt_are_the_esmtp_values_as_received():
    # RFC 3461 §5.2.1(a) "with the same associated esmtp-value" and (d) "the identical
    # original-recipient-address"; RFC 3885 §3.3 "MUST NOT be modified". Received
    # "ab+41cd+2Bef-x" must not go out re-encoded as "abAcd+2Bef-x".
    mail = MailParams(envid="abAcd+ef-x", envid_xtext="ab+41cd+2Bef-x")
    env = Envelope("Q1", "a@client.example", (Recipient("b@example.test"),), mail)
    for hop in (DSN_HOP, MTRK_HOP):
        assert "ENVID=ab+41cd+2Bef-x" in params(env, hop)
    orcpt = OriginalRecipient("rfc822", "xAt@dsn.test", "x+41t@dsn.test")
    recipient = Recipient("b@example.test", RcptParams(orcpt=orcpt))
    for hop in (DSN_HOP, MTRK_HOP):
        assert rcpt_parameters(recipient, hop) == ["ORCPT=rfc822;x+41t@dsn.test"]


def test_mtrk_goes_out_unpadded():
    # RFC 5321 §4.1.2 / RFC 3461 §4: no "=" in an esmtp-value (go-smtp answers 501).
    for certifier, length in ((CERTIFIER, 27), (bytes(range(16)), 22)):
        env = envelope()
        env = Envelope(
            env.queue_id,
            env.sender,
            env.recipients,
            MailParams(envid="e@h", mtrk=Mtrk(certifier, 600)),
            ARRIVAL,
        )
        word = mtrk_of(params(env, MTRK_HOP, now=ARRIVAL))
        assert word is not None
        value, _, timeout = word.removeprefix("MTRK=").partition(":")
        assert (len(value), timeout) == (length, "600") and "=" not in value
        assert base64.b64decode(value + "=" * (-len(value) % 4)) == certifier


@SETTINGS
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1))
def test_envid_round_trips_through_xtext(value):
    words = params(envelope(envid=value, mtrk=False, ret=None), DSN_HOP)
    (envid,) = [w for w in words if w.startswith("ENVID=")]
    assert re.fullmatch(r"ENVID=[!-~]+", envid) and "=" not in envid[6:]
    assert xtext.decode(envid[6:]) == value


# -- dot-stuffing ------------------------------------------------------------------------------


def test_stuffing_a_first_line_dot():
    assert dot_stuff(b".\r\nx\r\n") == b"..\r\nx\r\n.\r\n"


def test_stuffing_a_body_of_only_dots():
    assert dot_stuff(b".\r\n..\r\n.") == b"..\r\n...\r\n..\r\n.\r\n"


def test_stuffing_adds_missing_crlf_and_handles_empty():
    assert dot_stuff(b"abc") == b"abc\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b"a\r\n") == b"a\r\n.\r\n"


def test_stuffing_turns_bare_lf_into_crlf_so_no_lf_dot_reaches_the_server():
    assert dot_stuff(b"a\n.\nb") == b"a\r\n..\r\nb\r\n.\r\n"


def test_stuffing_turns_bare_cr_into_crlf_so_no_smuggled_end_of_data_goes_out():
    # CVE-2023-51764 family, outbound half; RFC 5321 §2.3.8: a client MUST NOT send CR
    # or LF except as CRLF. Sent as is, "\r.\r\n" ends DATA at a receiver that takes a
    # bare CR for a line end, and the rest runs as a second, smuggled transaction.
    smuggled = b"hello\r.\r\nMAIL FROM:<admin@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"
    assert dot_stuff(smuggled) == (
        b"hello\r\n..\r\nMAIL FROM:<admin@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n.\r\n"
    )


def test_stuffing_a_lone_cr_at_the_end_becomes_the_final_crlf():
    assert dot_stuff(b"a\r") == b"a\r\n.\r\n"
    assert dot_stuff(b"\r") == b"\r\n.\r\n"
    stuffer = DotStuffer()
    assert stuffer.feed(b"a\r") + stuffer.feed(b"\r") + stuffer.finish() == b"a\r\n\r\n.\r\n"


def test_stuffing_cr_cr_lf_split_between_chunks():
    stuffer = DotStuffer()
    out = stuffer.feed(b"a\r") + stuffer.feed(b"\r") + stuffer.feed(b"\n.") + stuffer.finish()
    assert out == b"a\r\n\r\n..\r\n.\r\n"


def test_stuffing_dot_line_split_at_16k_chunk_boundary():
    line = b"x" * (16384 - 2) + b"\r\n"
    content = line + b".\r\n" + line[:-2] + b"\r\n.hidden\r\n"
    stuffer = DotStuffer()
    out = b"".join(stuffer.feed(content[i : i + 16384]) for i in range(0, len(content), 16384))
    out += stuffer.finish()
    assert out == dot_stuff(content)
    assert out[16384 : 16384 + 4] == b"..\r\n"
    assert b"\r\n..hidden\r\n" in out


def test_stuffing_cr_and_lf_in_different_chunks():
    stuffer = DotStuffer()
    out = stuffer.feed(b"a\r") + stuffer.feed(b"\n.b\r") + stuffer.feed(b"\n") + stuffer.finish()
    assert out == b"a\r\n..b\r\n.\r\n"


def test_stuffer_refuses_use_after_finish():
    stuffer = DotStuffer()
    stuffer.finish()
    with pytest.raises(ValueError):
        stuffer.feed(b"x")
    with pytest.raises(ValueError):
        stuffer.finish()


def expected_content(content: bytes) -> bytes:
    """What the receiver must get back: bare CR and bare LF as CRLF, a final CRLF if missing."""
    normalised = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
    if normalised and not normalised.endswith(b"\r\n"):
        normalised += b"\r\n"
    return normalised


content_bytes = st.lists(
    st.one_of(
        st.sampled_from([b".", b"..", b"\r\n", b"\r", b"\n", b".\r\n", b"\r\n.\r\n", b"x"]),
        st.binary(max_size=20),
    ),
    max_size=40,
).map(b"".join)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


@SETTINGS
@given(content_bytes, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_incremental_stuffing_is_independent_of_chunking(content, cuts):
    stuffer = DotStuffer()
    out = b"".join(stuffer.feed(piece) for piece in chunked(content, cuts)) + stuffer.finish()
    assert out == dot_stuff(content)


@SETTINGS
@given(
    content_bytes,
    st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_stuffing_then_server_data_reader_gives_back_the_content(content, cuts, read_cuts):
    stuffer = DotStuffer()
    wire = b"".join(stuffer.feed(piece) for piece in chunked(content, cuts)) + stuffer.finish()
    reader = DataReader(max_size=1 << 20, max_line=1 << 20)
    pieces = chunked(wire, read_cuts)
    results = [reader.feed(piece) for piece in pieces]
    # The terminator is found exactly once, in the last piece that has bytes.
    finished_at = [i for i, result in enumerate(results) if result is not None]
    assert finished_at == [max(i for i, piece in enumerate(pieces) if piece)]
    result = results[finished_at[0]]
    assert result is not None
    assert result.content == expected_content(content)
    assert result.leftover == b""


# The ends of DATA a lenient receiver may accept besides <CRLF>.<CRLF> (SMTP smuggling).
LENIENT_ENDS = (
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r.\n",
    b"\r\n.\n",
    b"\n.\r",
    b"\r\n.\r",
)
smuggling_content = st.lists(
    st.one_of(
        st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"a", *LENIENT_ENDS, b"\r\n.\r\n"]),
        st.binary(max_size=12),
    ),
    max_size=60,
).map(b"".join)


def unstuff(stuffed: bytes) -> bytes:
    """The receiver's view (RFC 5321 §4.5.2): CRLF lines up to ``.``, leading dot removed."""
    lines = stuffed.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    body = [line[1:] if line.startswith(b".") else line for line in lines[:-2]]
    return b"".join(line + b"\r\n" for line in body)


@SETTINGS
@given(smuggling_content, st.lists(st.integers(min_value=0, max_value=600), max_size=12))
def test_stuffed_bytes_carry_no_bare_cr_or_lf_and_no_early_end_of_data(content, cuts):
    # RFC 5321 §2.3.8 (CR and LF only as CRLF) and §4.5.2; CVE-2023-51764 family.
    stuffer = DotStuffer()
    stuffed = b"".join(stuffer.feed(piece) for piece in chunked(content, cuts)) + stuffer.finish()
    assert stuffed.count(b"\r") == stuffed.count(b"\n") == stuffed.count(b"\r\n")
    wire = b"DATA\r\n" + stuffed  # what precedes the content on the wire
    end = len(wire) - len(b"\r\n.\r\n")
    assert wire.find(b"\r\n.\r\n") == end
    for variant in LENIENT_ENDS:
        found = wire.find(variant)
        assert found == -1 or found >= end, (variant, found)
    assert unstuff(stuffed) == expected_content(content)
