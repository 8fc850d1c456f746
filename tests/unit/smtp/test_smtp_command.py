"""Tests for mtrkmta.smtp.command: command lines, MAIL/RCPT paths, parameter splitting."""

from __future__ import annotations

import pytest

from mtrkmta.smtp.command import (
    LINE_TOO_LONG,
    MAX_COMMAND_LINE,
    Command,
    parse_command,
    parse_helo,
    parse_mail,
    parse_params,
    parse_rcpt,
    parse_vrfy,
    require_no_argument,
)
from mtrkmta.smtp.reply import Reply, SMTPError


def reply_of(func, *args) -> Reply:
    with pytest.raises(SMTPError) as info:
        func(*args)
    return info.value.reply


class TestParseCommand:
    def test_verb_upper_cased(self):
        assert parse_command(b"mail FROM:<a@b.c>\r\n") == Command("MAIL", "FROM:<a@b.c>")

    def test_no_argument(self):
        assert parse_command(b"DATA") == Command("DATA", "")
        assert parse_command(b"quit\n") == Command("QUIT", "")

    def test_extra_blanks_dropped_around_argument(self):
        assert parse_command(b"RCPT  TO:<a@b.c> \t\r\n") == Command("RCPT", "TO:<a@b.c>")

    def test_utf8_argument(self):
        # SMTPUTF8: the line is decoded as UTF-8.
        line = "RCPT TO:<j\u00f6rg@b\u00fccher.example>".encode()
        assert parse_command(line).argument == "TO:<j\u00f6rg@b\u00fccher.example>"

    def test_undecodable_is_500_552(self):
        reply = reply_of(parse_command, b"MAIL FROM:<\xff@b.c>")
        assert (reply.code, reply.enhanced) == (500, "5.5.2")

    @pytest.mark.parametrize("line", [b"", b" MAIL", b"MA:IL x", b"\xc3\xa9HLO x", b"-X y"])
    def test_bad_verb(self, line):
        reply = reply_of(parse_command, line)
        assert (reply.code, reply.enhanced) == (500, "5.5.2")

    @pytest.mark.parametrize("line", [b"NOOP a\rb", b"NOOP a\nb", b"NOOP a\x00b"])
    def test_control_characters(self, line):
        assert reply_of(parse_command, line).code == 500

    def test_base_512_line_accepted(self):
        # CHECKLIST 1.2.1: a 512-octet line (CRLF included) is fine
        line = b"NOOP " + b"x" * 505 + b"\r\n"
        assert len(line) == 512
        assert parse_command(line).verb == "NOOP"

    def test_max_line_accepted(self):
        # CHECKLIST 1.2.4: at least 2048 octets, CRLF included
        line = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 7) + b"\r\n"
        assert len(line) == MAX_COMMAND_LINE == 2048
        assert parse_command(line).verb == "NOOP"

    def test_too_long_line_rejected(self):
        # CHECKLIST 1.2.4 and 1.7: "500 5.5.2 Line too long"
        line = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 6) + b"\r\n"
        assert reply_of(parse_command, line) == Reply(500, "5.5.2", ("Line too long",))
        assert LINE_TOO_LONG.render() == b"500 5.5.2 Line too long\r\n"

    def test_too_long_without_crlf(self):
        line = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 6)
        assert reply_of(parse_command, line) == LINE_TOO_LONG


class TestParseMail:
    def test_simple(self):
        assert parse_mail("FROM:<a@b.example>") == ("a@b.example", [])

    def test_case_insensitive_from(self):
        assert parse_mail("from:<a@b.example>")[0] == "a@b.example"

    def test_null_path(self):
        assert parse_mail("FROM:<>") == ("", [])
        assert parse_mail("FROM:<> BODY=8BITMIME") == ("", [("BODY", "8BITMIME")])

    def test_space_after_colon_tolerated(self):
        assert parse_mail("FROM: <a@b.example> SIZE=5") == ("a@b.example", [("SIZE", "5")])
        assert parse_mail("FROM: <>")[0] == ""

    def test_missing_brackets_tolerated(self):
        assert parse_mail("FROM:a@b.example SIZE=5") == ("a@b.example", [("SIZE", "5")])

    def test_source_route_stripped(self):
        assert parse_mail("FROM:<@a.example,@b.example:u@d.example>")[0] == "u@d.example"

    def test_quoted_local_part(self):
        assert parse_mail('FROM:<"john doe>"@b.example>')[0] == '"john doe>"@b.example'
        assert parse_mail('FROM:<"a\\"b"@b.example>')[0] == '"a\\"b"@b.example'

    @pytest.mark.parametrize(
        "literal", ["[192.0.2.1]", "[IPv6:2001:db8::1]", "[ipv6:::1]", "[x-tag:some>thing]"]
    )
    def test_domain_literal(self, literal):
        assert parse_mail(f"FROM:<u@{literal}>")[0] == f"u@{literal}"

    def test_utf8_address(self):
        assert parse_mail("FROM:<j\u00f6rg@b\u00fccher.example>")[0] == (
            "j\u00f6rg@b\u00fccher.example"
        )

    def test_params_keyword_upper_value_verbatim(self):
        # CHECKLIST 1.1.5: keywords matched case-insensitively (upper-cased here)
        _, params = parse_mail("FROM:<a@b.c> envid=Ab+2Bc ret=hdrs smtputf8 mtrk=Vhe=:5")
        assert params == [
            ("ENVID", "Ab+2Bc"),
            ("RET", "hdrs"),
            ("SMTPUTF8", None),
            ("MTRK", "Vhe=:5"),
        ]

    def test_empty_value_kept_as_empty_string(self):
        assert parse_mail("FROM:<a@b.c> ENVID=")[1] == [("ENVID", "")]

    @pytest.mark.parametrize("argument", ["", "FROM", "TO:<a@b.c>", "FROM <a@b.c>", "FROM:"])
    def test_missing_from(self, argument):
        reply = reply_of(parse_mail, argument)
        assert (reply.code, reply.enhanced) == (501, "5.5.2")

    @pytest.mark.parametrize(
        "argument",
        [
            "FROM:<a@b.c",
            "FROM:<a@b.c>x",
            "FROM:<a>",
            "FROM:<postmaster>",
            "FROM:<a@>",
            "FROM:<@b.c>",
            "FROM:<a..b@c.d>",
            "FROM:<.a@c.d>",
            "FROM:<a.@c.d>",
            "FROM:<a b@c.d>",
            "FROM:<a@-b.c>",
            "FROM:<a@b-.c>",
            "FROM:<a@b..c>",
            "FROM:<a@b.c.>",
            "FROM:<a@[300.1.1.1]>",
            "FROM:<a@[IPv6:zz::1]>",
            "FROM:<a@[IPv6:1:::2]>",
            "FROM:<a@[IPv6:fe80::1%eth0]>",
            "FROM:<a@[1.2.3]>",
            "FROM:<a@[tag:]>",
            'FROM:<"unterminated@b.c>',
            'FROM:<"q"x@b.c>',
            "FROM:<@a.example:>",
            "FROM:<@a.example,b.example:u@d.example>",
            "FROM:<@-a:u@d.example>",
            "FROM:<@a.example u@d.example>",
            "FROM:a@",
        ],
    )
    def test_bad_sender(self, argument):
        assert reply_of(parse_mail, argument) == Reply(501, "5.1.7", ("Bad sender address syntax",))

    @pytest.mark.parametrize(
        "argument",
        ["FROM:<a@b.c> =x", "FROM:<a@b.c> K_Y=1", "FROM:<a@b.c> -X=1", "FROM:<> \u00e9=1"],
    )
    def test_bad_param_keyword(self, argument):
        reply = reply_of(parse_mail, argument)
        assert (reply.code, reply.enhanced) == (501, "5.5.4")

    def test_control_character_in_value(self):
        assert reply_of(parse_mail, "FROM:<> ENVID=a\x01b") == Reply(
            501, "5.5.4", ("Invalid ENVID parameter",)
        )

    def test_tab_separated_params(self):
        assert parse_mail("FROM:<>\tSIZE=1\t BODY=7BIT")[1] == [("SIZE", "1"), ("BODY", "7BIT")]


class TestParseRcpt:
    def test_simple(self):
        assert parse_rcpt("TO:<a@b.example> NOTIFY=NEVER") == ("a@b.example", [("NOTIFY", "NEVER")])

    def test_case_and_space(self):
        assert parse_rcpt("to: <a@b.example>")[0] == "a@b.example"

    def test_missing_brackets(self):
        assert parse_rcpt("TO:a@b.example")[0] == "a@b.example"

    @pytest.mark.parametrize("path", ["postmaster", "Postmaster", "POSTMASTER"])
    def test_bare_postmaster(self, path):
        assert parse_rcpt(f"TO:<{path}>")[0] == path

    def test_postmaster_with_domain(self):
        assert parse_rcpt("TO:<postmaster@b.example>")[0] == "postmaster@b.example"

    def test_source_route(self):
        assert parse_rcpt("TO:<@relay.example:u@d.example>")[0] == "u@d.example"

    def test_null_recipient(self):
        assert reply_of(parse_rcpt, "TO:<>") == Reply(
            501, "5.1.3", ("Null recipient address not allowed",)
        )

    @pytest.mark.parametrize("argument", ["TO:<a>", "TO:<a@b", "TO:<postmaster2>", "TO:<a@b..c>"])
    def test_bad_recipient(self, argument):
        assert reply_of(parse_rcpt, argument) == Reply(
            501, "5.1.3", ("Bad recipient address syntax",)
        )

    @pytest.mark.parametrize("argument", ["", "FROM:<a@b.c>", "TO", "TO:"])
    def test_missing_to(self, argument):
        reply = reply_of(parse_rcpt, argument)
        assert (reply.code, reply.enhanced) == (501, "5.5.2")


class TestParseParams:
    def test_value_with_equals_signs_kept(self):
        # CHECKLIST 1.3.2: base64 padding survives parameter splitting
        assert parse_params("MTRK=abc==:10") == [("MTRK", "abc==:10")]

    def test_empty(self):
        assert parse_params("") == []
        assert parse_params("   ") == []


class TestHelpers:
    def test_helo(self):
        assert parse_helo("client.example") == "client.example"
        assert parse_helo("[192.0.2.1]", verb="LHLO") == "[192.0.2.1]"

    @pytest.mark.parametrize("argument", ["", "two words"])
    def test_helo_bad(self, argument):
        assert reply_of(parse_helo, argument) == Reply(501, "5.5.4", ("Syntax: EHLO hostname",))

    def test_vrfy(self):
        assert parse_vrfy("<user@example>") == "user@example"
        assert parse_vrfy("user") == "user"
        assert reply_of(parse_vrfy, "<>") == Reply(501, "5.5.4", ("Syntax: VRFY address",))

    def test_require_no_argument(self):
        require_no_argument(Command("DATA", ""))
        assert reply_of(require_no_argument, Command("DATA", "x")) == Reply(
            501, "5.5.4", ("Syntax: DATA",)
        )
