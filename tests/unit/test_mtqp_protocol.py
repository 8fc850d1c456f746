"""Tests for mtrkmta.mtqp.protocol: commands, responses, greetings and the reader (RFC 3887)."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrkmta.mtqp.protocol import (
    MAX_LINE,
    CommandError,
    Comment,
    MalformedResponse,
    Option,
    Quit,
    Response,
    ResponseReader,
    SecretError,
    StartTLS,
    Track,
    decode_envid,
    greeting,
    negative_greeting,
    parse_command,
    parse_greeting,
    parse_options,
    secret_certifier,
    starttls_option,
)
from mtrkmta.smtp import xtext
from mtrkmta.tracking.status import (
    RecipientStatus,
    TrackingReport,
    TypedValue,
    parse_related,
    render_related,
)

# Every vector here is our own; the RFC 3887 examples are not used (their
# secret is 64 bits, under RFC 3885 §3.1's 128, and their SHA1 value matches no input).
SECRET = base64.b64encode(bytes(range(16))).decode()  # AAECAwQFBgcICQoLDA0ODw==
SECRET_SHA1 = "56178b86a57fac22899a9964185c2cc96e7da589"  # SHA1 of octets 00..0f


def bad(line: bytes) -> Response:
    with pytest.raises(CommandError) as info:
        parse_command(line)
    return info.value.response


def feed_all(reader: ResponseReader, wire: bytes) -> list[Response]:
    out = []
    for line in wire.split(b"\r\n")[:-1]:
        response = reader.feed(line + b"\r\n")
        if response is not None:
            out.append(response)
    return out


# --- commands ------------------------------------------------------------------------------


class TestTrack:
    def test_basic(self):
        # RFC 3887 §4: TRACK unique-envid mtrk-secret
        command = parse_command(f"TRACK q81-z@origin.example {SECRET}\r\n".encode())
        assert command == Track("q81-z@origin.example", SECRET)

    def test_keyword_case_and_separators(self):
        # RFC 3887 §2.2: case-insensitive keywords; 1+ SP/HTAB separators
        command = parse_command(f"tRaCk \t q81-z@origin.example\t\t{SECRET}  ".encode())
        assert command == Track("q81-z@origin.example", SECRET)

    def test_line_ends(self):
        for end in (b"\r\n", b"\n", b""):
            assert isinstance(parse_command(b"TRACK a@b " + SECRET.encode() + end), Track)

    def test_angle_brackets_stripped_once(self):
        # doc/conformance.rst 3887-P2: one surrounding <...> pair is accepted and stripped
        command = parse_command(f"TRACK <q81-z@origin.example> {SECRET}".encode())
        assert isinstance(command, Track)
        assert command.envid == "q81-z@origin.example"
        command = parse_command(f"TRACK <<x@y>> {SECRET}".encode())
        assert isinstance(command, Track)
        assert command.envid == "<x@y>"

    def test_half_bracket_kept(self):
        command = parse_command(f"TRACK <x@y {SECRET}".encode())
        assert isinstance(command, Track)
        assert command.envid == "<x@y"

    def test_envid_xtext_decoded_case_kept(self):
        # project decision, doc/conformance.rst 3887-P2: exact match after xtext decoding; case kept
        command = parse_command(f"TRACK Ab+2Bc+3dD@Host.Example {SECRET}".encode())
        assert isinstance(command, Track)
        assert command.envid == "Ab+c=D@Host.Example"

    def test_unpadded_secret_accepted(self):
        # doc/conformance.rst 3887-P3: padding is optional
        command = parse_command(f"TRACK a@b {SECRET.rstrip('=')}".encode())
        assert isinstance(command, Track)
        assert command.certifier() == bytes.fromhex(SECRET_SHA1)

    def test_certifier_is_sha1_of_decoded_secret(self):
        # RFC 3887 §4; RFC 3885 §3.1: hash the decoded secret, not the base64 text
        command = parse_command(f"TRACK a@b {SECRET}".encode())
        assert isinstance(command, Track)
        assert command.certifier().hex() == SECRET_SHA1
        assert command.certifier() != hashlib.sha1(SECRET.encode()).digest()

    def test_arguments_not_in_repr(self):
        # RFC 3885 §4.2, RFC 3887 §11: TRACK arguments are never logged
        command = Track("very-private@origin.example", SECRET)
        assert "very-private" not in repr(command)
        assert SECRET not in repr(command)

    def test_render_round_trip(self):
        command = Track("a b+c=d@origin.example", SECRET)
        line = command.render()
        assert line == f"TRACK a+20b+2Bc+3Dd@origin.example {SECRET}\r\n".encode()
        assert parse_command(line) == command

    @pytest.mark.parametrize(
        "line",
        [
            b"TRACK",
            b"TRACK a@b",
            b"TRACK  a@b  ",
            b"TRACK a@b AAAA BBBB",
            b"TRACK ab-no-at AAAA",  # unique-envid = local-envid "@" fqhn
            b"TRACK a@b !!!!",
            b"TRACK a@b AAA=A",
            b"TRACK a@b AAAAA",  # 5 base64 characters cannot be decoded
            b"TRACK a@b AA===",
            b"TRACK a+ZZ@b AAAA",  # not xtext
            b"TRACK a=b@c AAAA",  # raw '=' is not xtext
            b"TRACK a+0D+0A@b AAAA",  # decodes to CR LF
            b"TRACK a+80@b AAAA",
            b"TRACKa@b AAAA",
        ],
    )
    def test_malformed_is_bad(self, line):
        # RFC 3887 §2.3: malformed command -> -BAD
        assert bad(line).indicator == "-BAD"


class TestStartTLS:
    def test_fqdn(self):
        # RFC 3887 §6: the argument is the FQDN the client expects
        assert parse_command(b"STARTTLS mtqp.Example.COM\r\n") == StartTLS("mtqp.Example.COM")

    def test_trailing_blanks(self):
        # starttls-command = "STARTTLS" 1*WSP domain *WSP CRLF
        assert parse_command(b"starttls\tmtqp.example.com \t") == StartTLS("mtqp.example.com")

    @pytest.mark.parametrize(
        "line",
        [
            b"STARTTLS",
            b"STARTTLS ",
            b"STARTTLS \t ",
            b"STARTTLS localhost",  # domain = sub-domain 1*("." sub-domain)
            b"STARTTLS a.example b.example",
            b"STARTTLS -a.example",
            b"STARTTLS a-.example",
            b"STARTTLS a..example",
            b"STARTTLS a.example.",
            b"STARTTLS a_b.example",
            b"STARTTLS [192.0.2.1]",
            b"STARTTLS " + b"a" * 64 + b".example",
        ],
    )
    def test_missing_or_bad_fqdn_is_bad(self, line):
        # RFC 3887 §6, §2.3: missing argument is a syntax error -> -BAD
        assert bad(line).indicator == "-BAD"

    def test_render(self):
        assert StartTLS("mtqp.example.com").render() == b"STARTTLS mtqp.example.com\r\n"
        assert parse_command(StartTLS("x.example").render()) == StartTLS("x.example")


class TestQuitComment:
    def test_quit(self):
        # RFC 3887 §7: no argument
        assert parse_command(b"QUIT\r\n") == Quit()
        assert parse_command(b"quit  ") == Quit()
        assert Quit().render() == b"QUIT\r\n"

    def test_quit_with_argument_is_bad(self):
        assert bad(b"QUIT now").indicator == "-BAD"

    def test_comment(self):
        # RFC 3887 §5: any text
        assert parse_command(b"COMMENT") == Comment("")
        assert parse_command(b"comment  hello,\tworld! <>/") == Comment("hello,\tworld! <>/")
        assert Comment("hi there").render() == b"COMMENT hi there\r\n"
        assert Comment().render() == b"COMMENT\r\n"
        assert parse_command(Comment("x  y").render()) == Comment("x  y")


class TestBadLines:
    @pytest.mark.parametrize(
        "line",
        [
            b"",
            b"\r\n",
            b"   ",
            b" TRACK a@b AAAA",
            b"HELO client.example",
            b"NOOP",
            b"TRACKING a@b AAAA",
            b"COMMENTS are welcome",
            b"STARTTLSx a.example",
            b"COMMENT caf\xc3\xa9",  # printable ASCII only (RFC 3887 §2.2)
            b"COMMENT \x01",
            b"COMMENT \x7f",
            b"COMMENT a\rb",
            b"COMMENT a\nb\r\n",
        ],
    )
    def test_unknown_or_malformed_is_bad(self, line):
        # RFC 3887 §2.3, §6: -BAD, never -ERR, for unknown commands
        response = bad(line)
        assert response.indicator == "-BAD"
        assert response.render().startswith(b"-BAD ")

    def test_line_limit(self):
        # RFC 3887 §2.2: at most 998 characters before CRLF
        ok = b"COMMENT " + b"x" * (MAX_LINE - 8)
        assert len(ok) == 998
        assert parse_command(ok + b"\r\n") == Comment("x" * (MAX_LINE - 8))
        assert bad(ok + b"x\r\n").indicator == "-BAD"


class TestDecodeEnvid:
    def test_lower_case_hex_accepted(self):
        assert decode_envid("a+2bb@c") == "a+b@c"

    def test_space_and_tab_allowed(self):
        # RFC 3461 §4.4, RFC 3887 §2.2: printable US-ASCII and white space
        assert decode_envid("a+20+09b@c") == "a \tb@c"


class TestSecretCertifier:
    def test_vector(self):
        assert secret_certifier(SECRET).hex() == SECRET_SHA1

    def test_twenty_octet_secret(self):
        secret = bytes(range(100, 120))
        expected = hashlib.sha1(secret).digest()
        assert secret_certifier(base64.b64encode(secret).decode()) == expected
        assert len(secret_certifier(base64.b64encode(secret).decode())) == 20

    @pytest.mark.parametrize(
        "text", ["", "====", "A", "AA=A", "AB==C", "Zm9v!", "Zm9v\n", "\u00e9AAA"]
    )
    def test_bad_base64(self, text):
        with pytest.raises(SecretError):
            secret_certifier(text)


# --- responses -----------------------------------------------------------------------------


class TestResponseRender:
    @pytest.mark.parametrize(
        ("response", "wire"),
        [
            (Response("+OK"), b"+OK\r\n"),
            (Response("+OK", (), "bye"), b"+OK bye\r\n"),
            (Response("-ERR", ("noinfo",), "No such message"), b"-ERR/noinfo No such message\r\n"),
            (Response("-TEMP", ("unavailable",)), b"-TEMP/unavailable\r\n"),
            (Response("-BAD", ("tls-in-progress",), "x"), b"-BAD/tls-in-progress x\r\n"),
            (Response("-ERR", ("insecure", "a_b"), "t"), b"-ERR/insecure/a_b t\r\n"),
        ],
    )
    def test_single_line(self, response, wire):
        # RFC 3887 §2.3: indicator, /code groups, optional text
        assert response.render() == wire

    def test_multi_line_dot_stuffing(self):
        # RFC 3887 §2.2: dot-stuff lines starting with "."; end with "." CRLF
        response = Response("+OK+", (), "here", (b"plain", b".dotted", b".", b"..", b"", b"a.b"))
        assert response.render() == (
            b"+OK+ here\r\nplain\r\n..dotted\r\n..\r\n...\r\n\r\na.b\r\n.\r\n"
        )

    def test_empty_multi_line(self):
        assert Response("+OK+", ("MTQP",), "ready").render() == b"+OK+/MTQP ready\r\n.\r\n"

    def test_multiline_from_body(self):
        response = Response.multiline(b"one\r\n.two\r\n", text="Tracking information follows")
        assert response.data_lines == (b"one", b".two")
        assert response.body == b"one\r\n.two\r\n"
        assert response.render().endswith(b"one\r\n..two\r\n.\r\n")

    def test_has_code_case_insensitive(self):
        # RFC 3887 §2.3: /code groups are case-insensitive
        response = Response("-ERR", ("NoInfo",))
        assert response.has_code("noinfo")
        assert response.has_code("NOINFO")
        assert not response.has_code("admin")

    def test_is_positive(self):
        assert Response("+OK").is_positive
        assert Response("+OK+").is_positive
        assert not Response("-TEMP").is_positive
        assert not Response("-ERR").is_positive
        assert not Response("-BAD").is_positive

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"indicator": "OK"},
            {"indicator": "+ok"},
            {"indicator": "-ERR", "codes": ("no info",)},
            {"indicator": "-ERR", "codes": ("",)},
            {"indicator": "-ERR", "codes": ("a/b",)},
            {"indicator": "-ERR", "text": "a\r\nb"},
            {"indicator": "-ERR", "text": " leading"},
            {"indicator": "-ERR", "text": "caf\u00e9"},
            {"indicator": "+OK", "data_lines": (b"x",)},
            {"indicator": "+OK+", "data_lines": (b"a\rb",)},
            {"indicator": "+OK+", "data_lines": (b"a\nb",)},
            {"indicator": "+OK+", "data_lines": (b"x" * 999,)},
            {"indicator": "+OK+", "data_lines": (b"." + b"x" * 997,)},
            {"indicator": "+OK", "text": "x" * 995},
        ],
    )
    def test_invalid(self, kwargs):
        with pytest.raises(ValueError):
            Response(**kwargs)

    def test_longest_lines(self):
        # RFC 3887 §2.2: 998 octets on the wire, the stuffing dot included
        Response("+OK+", (), "", (b"x" * 998, b"." + b"x" * 996))
        Response("+OK", (), "x" * 994)


class TestResponseReader:
    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (b"+OK\r\n", Response("+OK")),
            (b"+OK bye now\r\n", Response("+OK", (), "bye now")),
            (
                b"-ERR/NoInfo \t no such message\r\n",
                Response("-ERR", ("NoInfo",), "no such message"),
            ),
            (b"-TEMP/unavailable/x-y_z", Response("-TEMP", ("unavailable", "x-y_z"))),
            (b"-BAD\n", Response("-BAD")),
            (b"-bad/Tls-In-Progress", Response("-BAD", ("Tls-In-Progress",))),
            (b"+OK \r\n", Response("+OK")),
            (b"+OK text \xff\r\n", Response("+OK", (), "text ?")),
        ],
    )
    def test_status_lines(self, line, expected):
        # RFC 3887 §2.3
        reader = ResponseReader()
        assert reader.feed(line) == expected
        assert not reader.pending

    @pytest.mark.parametrize(
        "line",
        [b"OK", b"+OKAY", b"+OK/", b"+OK/no:info", b"-ERR:x", b"", b"250 ok", b"+OK+x", b"+OK+/"],
    )
    def test_malformed_status_lines(self, line):
        with pytest.raises(MalformedResponse):
            ResponseReader().feed(line)

    def test_multi_line_unstuffed(self):
        # RFC 3887 §2.2: the reader strips the stuffed dot and stops at "."
        reader = ResponseReader()
        assert reader.feed(b"+OK+ Tracking information follows\r\n") is None
        assert reader.pending
        assert reader.feed(b"..Dotted: line\r\n") is None
        assert reader.feed(b"...\r\n") is None
        assert reader.feed(b".x\r\n") is None
        assert reader.feed(b"\r\n") is None
        response = reader.feed(b".\r\n")
        assert response == Response(
            "+OK+", (), "Tracking information follows", (b".Dotted: line", b"..", b"x", b"")
        )
        assert not reader.pending

    def test_pipelined_responses(self):
        # RFC 3887 §8: responses come in command order, one after the other
        first = Response("+OK+", (), "one", (b".a", b"b"))
        second = Response("-ERR", ("noinfo",), "two")
        third = Response("+OK+", (), "three", ())
        wire = first.render() + second.render() + third.render()
        assert feed_all(ResponseReader(), wire) == [first, second, third]

    def test_too_long_line(self):
        reader = ResponseReader()
        reader.feed(b"+OK+\r\n")
        with pytest.raises(MalformedResponse):
            reader.feed(b"x" * 999 + b"\r\n")
        assert not reader.pending

    def test_max_lines(self):
        reader = ResponseReader(max_lines=2)
        reader.feed(b"+OK+")
        reader.feed(b"a")
        reader.feed(b"b")
        with pytest.raises(MalformedResponse):
            reader.feed(b"c")
        assert not reader.pending
        assert reader.feed(b"+OK") == Response("+OK")

    def test_reset(self):
        reader = ResponseReader()
        reader.feed(b"+OK+")
        reader.feed(b"partial")
        reader.reset()
        assert not reader.pending
        assert reader.feed(b"-ERR") == Response("-ERR")

    def test_tracking_answer_through_the_wire(self):
        # RFC 3887 §4; RFC 3886 §3: +OK+, one multipart/related entity, dot-stuffed, ended by "."
        report = TrackingReport(
            original_envelope_id="t-9@origin.example",
            reporting_mta=TypedValue("dns", "mtqp.example.net"),
            arrival_date=datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc),
            recipients=(
                RecipientStatus(
                    TypedValue("rfc822", "x@dest.example"),
                    TypedValue("rfc822", "x@dest.example"),
                    "delivered",
                    "2.1.5",
                    extensions=((".Dotted-Extension", "v"),),
                ),
            ),
        )
        entity = render_related([report, report])
        response = Response.multiline(entity, text="Tracking information follows")
        wire = response.render()
        assert b"\r\n..Dotted-Extension: v\r\n" in wire
        assert wire.endswith(b"\r\n.\r\n")
        (received,) = feed_all(ResponseReader(), wire)
        assert received.body == entity
        assert parse_related(received.body) == [report, report]


_NAMES = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
_OPT_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(
    lambda s: s.lstrip(" ")
)
_DATA = st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def _responses(draw: st.DrawFn) -> Response:
    indicator = draw(st.sampled_from(["+OK", "+OK+", "-TEMP", "-ERR", "-BAD"]))
    lines: tuple[bytes, ...] = ()
    if indicator == "+OK+":
        lines = tuple(draw(st.lists(_DATA | st.sampled_from([b".", b"..", b".x"]), max_size=8)))
    return Response(indicator, tuple(draw(st.lists(_NAMES, max_size=3))), draw(_OPT_TEXT), lines)


@settings(max_examples=100, deadline=None)
@given(st.lists(_responses(), min_size=1, max_size=4))
def test_reader_inverts_render(responses):
    # RFC 3887 §2.3, §2.2: render then read gives the same responses
    wire = b"".join(response.render() for response in responses)
    assert feed_all(ResponseReader(), wire) == responses


_XTEXT_SOURCE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)


@settings(max_examples=100, deadline=None)
@given(_XTEXT_SOURCE, _XTEXT_SOURCE, st.binary(min_size=1, max_size=64))
def test_track_render_parse_round_trip(local, host, secret):
    # doc/conformance.rst 3887-P2: the envid travels xtext-encoded and is matched decoded
    envid = f"{local}@{host}"
    encoded = xtext.encode(envid)
    if encoded.startswith("<") and encoded.endswith(">"):
        envid = f"x{envid}"
    command = Track(envid, base64.b64encode(secret).decode())
    assert parse_command(command.render()) == command


# --- greeting ------------------------------------------------------------------------------


class TestGreeting:
    def test_without_options(self):
        # RFC 3887 §3: +OK/MTQP
        assert greeting().render() == b"+OK/MTQP MTQP server ready\r\n"

    def test_multiline_without_options(self):
        # RFC 3887 §3: the +OK+ alternative with an empty option list
        assert greeting("hi", multiline=True).render() == b"+OK+/MTQP hi\r\n.\r\n"

    def test_starttls(self):
        # RFC 3887 §3: STARTTLS listed when TLS is enabled
        wire = greeting("ready", options=[starttls_option()]).render()
        assert wire == b"+OK+/MTQP ready\r\nSTARTTLS\r\n.\r\n"

    def test_starttls_required(self):
        # RFC 3887 §3: "required" when TLS is mandatory for a served domain
        wire = greeting("ready", options=[starttls_option(required=True)]).render()
        assert wire == b"+OK+/MTQP ready\r\nSTARTTLS required\r\n.\r\n"

    def test_continuation_lines(self):
        # RFC 3887 §3: continuation lines start with whitespace
        option = Option("vnd.org.example.extinfo", tuple(f"param{n}" for n in range(20)))
        wire = greeting("ready", options=[starttls_option(), option]).render()
        lines = wire.split(b"\r\n")
        assert lines[0] == b"+OK+/MTQP ready"
        assert lines[1] == b"STARTTLS"
        assert lines[2].startswith(b"vnd.org.example.extinfo param0 ")
        continuation = lines[3:-2]
        assert continuation
        assert all(line.startswith(b" ") for line in continuation)
        assert all(len(line) <= 78 for line in lines)
        assert lines[-2:] == [b".", b""]

    def test_parse_with_options(self):
        wire = (
            b"+OK+/mtqp ready\r\n"
            b"starttls REQUIRED\r\n"
            b"vnd.org.example.long a b\r\n"
            b"\t c\r\n"
            b"  d\r\n"
            b".\r\n"
        )
        (response,) = feed_all(ResponseReader(), wire)
        parsed = parse_greeting(response)
        assert parsed.ok
        assert parsed.starttls
        assert parsed.starttls_required
        assert parsed.options == (
            Option("starttls", ("REQUIRED",)),
            Option("vnd.org.example.long", ("a", "b", "c", "d")),
        )
        assert parsed.option("VND.ORG.EXAMPLE.LONG") is not None

    def test_round_trip(self):
        options = [
            starttls_option(),
            Option("vnd.org.example.x", tuple("w" * 9 for _ in range(30))),
        ]
        (response,) = feed_all(ResponseReader(), greeting(options=options).render())
        assert parse_greeting(response).options == tuple(options)

    def test_after_tls_no_starttls(self):
        # RFC 3887 §6: after the handshake the option list lacks STARTTLS
        (response,) = feed_all(ResponseReader(), greeting().render())
        parsed = parse_greeting(response)
        assert parsed.ok
        assert not parsed.starttls
        assert not parsed.starttls_required
        assert parsed.options == ()

    def test_starttls_not_required(self):
        (response,) = feed_all(ResponseReader(), greeting(options=[starttls_option()]).render())
        parsed = parse_greeting(response)
        assert parsed.starttls
        assert not parsed.starttls_required

    def test_greeting_needs_mtqp_tag(self):
        # RFC 3887 §3, §2.2: the /MTQP tag is mandatory
        with pytest.raises(MalformedResponse):
            parse_greeting(Response("+OK", (), "MTQP server ready"))

    def test_negative(self):
        # RFC 3887 §3: negative greetings carry a reason
        assert negative_greeting("admin", "down for maintenance").render() == (
            b"-TEMP/MTQP/admin down for maintenance\r\n"
        )
        assert negative_greeting("unavailable", "gone").render() == (
            b"-ERR/MTQP/unavailable gone\r\n"
        )
        parsed = parse_greeting(negative_greeting("admin"))
        assert not parsed.ok
        with pytest.raises(ValueError):
            negative_greeting("busy")

    def test_continuation_without_option(self):
        with pytest.raises(MalformedResponse):
            parse_options([b" orphan"])

    @pytest.mark.parametrize("word", ["", "two words", "caf\u00e9", "x" * 998])
    def test_bad_option_words(self, word):
        with pytest.raises(ValueError):
            Option(word)
        with pytest.raises(ValueError):
            Option("vnd.org.example.x", (word,))
