"""Property tests for the sans-IO SMTP toolkit: round-trips and "only SMTPError" guarantees."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtrkmta.envelope import Mtrk
from mtrkmta.smtp import xtext
from mtrkmta.smtp.command import MAX_COMMAND_LINE, parse_command, parse_mail, parse_rcpt
from mtrkmta.smtp.mtrk import MtrkError, format_mtrk, parse_mtrk
from mtrkmta.smtp.params import parse_mail_params, parse_rcpt_params
from mtrkmta.smtp.reply import MalformedReply, Reply, ReplyReader, SMTPError

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

octet_strings = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xFF), max_size=120)
# Text biased towards SMTP syntax so that the parsers get past their first checks.
smtp_alphabet = st.sampled_from(
    list('<>@:;,.=+"\\[]() \t-_!#') + list("aZ09") + ["\u00e9", "\u0131", "\x00", "\x7f"]
)
smtp_text = st.one_of(st.text(max_size=80), st.text(alphabet=smtp_alphabet, max_size=80))
keywords = st.one_of(
    st.sampled_from(
        ["SIZE", "BODY", "ENVID", "RET", "MTRK", "SMTPUTF8", "AUTH", "NOTIFY", "ORCPT", "size"]
    ),
    st.text(max_size=10),
)
values = st.one_of(st.none(), smtp_text, st.sampled_from(["", "<>", "NEVER", "rfc822;a@b"]))
param_lists = st.lists(st.tuples(keywords, values), max_size=6)
advertised_sets = st.frozensets(
    st.sampled_from(["SIZE", "8BITMIME", "DSN", "MTRK", "SMTPUTF8", "AUTH"])
)
certifiers = st.one_of(st.binary(min_size=16, max_size=16), st.binary(min_size=20, max_size=20))
timeouts = st.one_of(st.none(), st.integers(min_value=0, max_value=999_999_999))


@SETTINGS
@given(octet_strings)
def test_xtext_round_trip(value):
    # RFC 3461 §4
    assert xtext.decode(xtext.encode(value)) == value


@SETTINGS
@given(octet_strings)
def test_xtext_encoder_output_is_strict_xtext(value):
    # RFC 3461 §4: upper-case hex, only 33..126 on the wire, never raw "="
    encoded = xtext.encode(value)
    assert all(33 <= ord(char) <= 126 for char in encoded) and "=" not in encoded
    xtext.decode(encoded, lenient=False)


@SETTINGS
@given(st.text(max_size=60), st.booleans())
def test_xtext_decode_raises_only_xtext_error(value, lenient):
    try:
        decoded = xtext.decode(value, lenient=lenient)
    except xtext.XtextError:
        return
    assert all(ord(char) <= 0xFF for char in decoded)


@SETTINGS
@given(certifiers, timeouts)
def test_certifier_round_trip(certifier, timeout):
    # RFC 3885 §3.1, doc/conformance.rst 3885-P1
    text = format_mtrk(certifier, timeout)
    assert parse_mtrk(text) == Mtrk(certifier, timeout)
    unpadded, colon, rest = text.partition(":")
    assert parse_mtrk(unpadded.rstrip("=") + colon + rest) == Mtrk(certifier, timeout)


@SETTINGS
@given(smtp_text)
def test_parse_mtrk_raises_only_mtrk_error(value):
    try:
        mtrk = parse_mtrk(value)
    except MtrkError:
        return
    assert len(mtrk.certifier) in (16, 20)


@SETTINGS
@given(st.one_of(st.binary(max_size=200), smtp_text.map(lambda text: text.encode())))
def test_parse_command_raises_only_smtp_error(line):
    try:
        command = parse_command(line)
    except SMTPError:
        return
    assert command.verb == command.verb.upper() and command.verb.isascii()


@SETTINGS
@given(st.integers(min_value=MAX_COMMAND_LINE - 1, max_value=MAX_COMMAND_LINE + 10))
def test_line_length_boundary(length):
    # doc/conformance.rst 3885-P2
    line = b"NOOP " + b"x" * (length - 7) + b"\r\n"
    try:
        parse_command(line)
    except SMTPError as error:
        assert length > MAX_COMMAND_LINE
        assert error.reply == Reply(500, "5.5.2", ("Line too long",))
    else:
        assert length <= MAX_COMMAND_LINE


@SETTINGS
@given(smtp_text)
def test_parse_mail_raises_only_smtp_error(text):
    for argument in (text, "FROM:" + text, "FROM:<" + text, "FROM:<a@b.c> " + text):
        try:
            _, params = parse_mail(argument)
        except SMTPError as error:
            # 553: a control character or a part too long (RFC 5321 §4.5.3.1).
            assert error.reply.code in (501, 553)
        else:
            assert all(keyword == keyword.upper() for keyword, _ in params)


@SETTINGS
@given(smtp_text)
def test_parse_rcpt_raises_only_smtp_error(text):
    for argument in (text, "TO:" + text, "TO:<" + text, "TO:<a@b.c> " + text):
        try:
            path, _ = parse_rcpt(argument)
        except SMTPError as error:
            # 553: a control character, an empty local part or a part too long.
            assert error.reply.code in (501, 553)
        else:
            assert path != ""


@SETTINGS
@given(param_lists, advertised_sets, st.booleans())
def test_parse_mail_params_raises_only_smtp_error(params, advertised, lenient):
    try:
        parse_mail_params(params, advertised=advertised, lenient_xtext=lenient)
    except SMTPError as error:
        assert error.reply.code in (501, 555)
        assert error.reply.enhanced == "5.5.4"


@SETTINGS
@given(param_lists, advertised_sets, st.booleans())
def test_parse_rcpt_params_raises_only_smtp_error(params, advertised, lenient):
    try:
        result = parse_rcpt_params(params, advertised=advertised, lenient_xtext=lenient)
    except SMTPError as error:
        assert error.reply.code in (501, 555)
        assert error.reply.enhanced == "5.5.4"
    else:
        if result.orcpt is not None:
            # doc/conformance.rst 3461-P5: nothing unprintable survives
            assert all(char == "\t" or " " <= char <= "~" for char in result.orcpt.address)


@SETTINGS
@given(smtp_text)
def test_full_mail_pipeline_raises_only_smtp_error(text):
    line = f"MAIL FROM:<a@b.example> {text}".encode()
    try:
        command = parse_command(line)
        _, params = parse_mail(command.argument)
        result = parse_mail_params(params, advertised=frozenset({"DSN", "MTRK", "SIZE"}))
    except SMTPError:
        return
    if result.envid is not None:
        assert "\r" not in result.envid and "\n" not in result.envid


@SETTINGS
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_reply_reader_raises_only_malformed_reply(lines):
    reader = ReplyReader()
    for line in lines:
        try:
            reply = reader.feed(line)
        except MalformedReply:
            continue
        if reply is not None:
            assert 200 <= reply.code <= 599


@SETTINGS
@given(
    st.integers(min_value=200, max_value=599),
    st.lists(
        st.text(
            alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]),
            max_size=20,
        ),
        max_size=4,
    ),
    st.booleans(),
)
def test_reply_render_read_round_trip(code, lines, with_enhanced):
    with_enhanced = with_enhanced and code // 100 != 3
    enhanced = f"{code // 100}.1.2" if with_enhanced else None
    if not lines:
        lines = [""]
    original = Reply(code, enhanced, tuple(lines))
    reader = ReplyReader()
    raw_lines = original.render().split(b"\r\n")[:-1]
    replies = [reader.feed(raw) for raw in raw_lines]
    result = replies[-1]
    assert result is not None and result.code == code
    if with_enhanced:
        assert result == original
