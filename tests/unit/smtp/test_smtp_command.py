"""Tests for mtrkmta.smtp.command: command lines, MAIL/RCPT paths, parameter splitting."""

from __future__ import annotations

import pytest

from mtrkmta.smtp.command import (
    LINE_TOO_LONG,
    MAX_COMMAND_LINE,
    AddressLimits,
    Command,
    parse_command,
    parse_helo,
    parse_mail,
    parse_params,
    parse_rcpt,
    parse_vrfy,
    require_no_argument,
    require_smtputf8,
)
from mtrkmta.smtp.reply import Reply, SMTPError


def reply_of(func, *args, **kwargs) -> Reply:
    with pytest.raises(SMTPError) as info:
        func(*args, **kwargs)
    return info.value.reply


class TestParseCommand:
    def test_verb_upper_cased(self):
        assert parse_command(b"mail FROM:<a@b.c>\r\n") == Command("MAIL", "FROM:<a@b.c>")

    def test_known_verbs_are_shared_strings_others_are_not(self):
        # A session keeps its verbs (the log's counts): one string for every session.
        assert parse_command(b"mail FROM:<>").verb is parse_command(b"MAIL FROM:<>").verb
        assert parse_command(b"xyzzy 1").verb is not parse_command(b"XYZZY 2").verb

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
        # RFC 5321 §4.5.3.1.4: a 512-octet line (CRLF included) is fine
        line = b"NOOP " + b"x" * 505 + b"\r\n"
        assert len(line) == 512
        assert parse_command(line).verb == "NOOP"

    def test_max_line_accepted(self):
        # doc/conformance.rst 3885-P2: at least 2048 octets, CRLF included
        line = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 7) + b"\r\n"
        assert len(line) == MAX_COMMAND_LINE == 2048
        assert parse_command(line).verb == "NOOP"

    def test_too_long_line_rejected(self):
        # doc/conformance.rst 3885-P2: "500 5.5.2 Line too long"
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
        # RFC 5321 §2.4: keywords matched case-insensitively (upper-cased here)
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
        # doc/conformance.rst 3885-P1: base64 padding survives parameter splitting
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

    def test_helo_longer_than_a_domain_may_be(self):
        # RFC 5321 §4.5.3.1.2: a domain (the HELO argument) has at most 255 octets;
        # a 1,500-character name would make our Received: line longer than 998 octets.
        assert parse_helo("h" * 255) == "h" * 255
        for name in ("h" * 256, "h" * 1500):
            assert reply_of(parse_helo, name) == Reply(
                501, "5.5.2", ("EHLO argument too long (RFC 5321 §4.5.3.1.2)",)
            )
        assert parse_helo("h" * 300, max_length=300) == "h" * 300  # limits.helo_length

    @pytest.mark.parametrize(
        "name",
        [
            "evil\x0bX-Injected:yes",
            "evil\x1b[2J",
            "evil\x0c",
            "evil\x7f",
            "evil\x85",  # C1: NEL
            "evil\x9b2J",  # C1: CSI
            "b\u00fccher.example",  # printable ASCII only: a domain or address literal
            "evil\u2028x",
        ],
    )
    def test_helo_must_be_printable_ascii(self, name):
        reply = reply_of(parse_helo, name, verb="LHLO")
        assert reply == Reply(
            501, "5.5.2", ("LHLO argument must be a domain or address literal in printable ASCII",)
        )

    def test_vrfy(self):
        assert parse_vrfy("<user@example>") == "user@example"
        assert parse_vrfy("user") == "user"
        assert reply_of(parse_vrfy, "<>") == Reply(501, "5.5.4", ("Syntax: VRFY address",))

    def test_require_no_argument(self):
        require_no_argument(Command("DATA", ""))
        assert reply_of(require_no_argument, Command("DATA", "x")) == Reply(
            501, "5.5.4", ("Syntax: DATA",)
        )


class TestAddressLimits:
    """RFC 5321 §4.5.3.1: local part 64, domain 255, path 256 octets (the brackets count)."""

    def test_local_part_of_64_octets_is_accepted(self):
        address = "a" * 64 + "@x.test"
        assert parse_rcpt(f"TO:<{address}>")[0] == address
        assert parse_mail(f"FROM:<{address}>")[0] == address

    @pytest.mark.parametrize("local", ["a" * 65, "a" * 300, '"' + "a" * 63 + '"', "\u00e9" * 33])
    def test_longer_local_part_is_refused(self, local):
        # Octets, not characters: 33 "é" are 66 octets. The quotes of a quoted local
        # part are part of it.
        assert reply_of(parse_rcpt, f"TO:<{local}@x.test>") == Reply(
            553, "5.1.3", ("Local part too long (RFC 5321 §4.5.3.1.1)",)
        )
        assert reply_of(parse_mail, f"FROM:<{local}@x.test>") == Reply(
            553, "5.1.7", ("Local part too long (RFC 5321 §4.5.3.1.1)",)
        )

    def test_domain_longer_than_255_octets_is_refused(self):
        domain = ".".join(["d" * 63] * 4)  # 255 octets
        wide = AddressLimits(path=1000)
        assert parse_rcpt(f"TO:<a@{domain}>", wide)[0] == f"a@{domain}"
        assert reply_of(parse_rcpt, f"TO:<a@{domain}x>", wide) == Reply(
            553, "5.1.3", ("Domain too long (RFC 5321 §4.5.3.1.2)",)
        )
        assert reply_of(parse_mail, f"FROM:<a@{domain}x>", wide).enhanced == "5.1.7"

    def test_path_longer_than_256_octets_with_its_brackets_is_refused(self):
        domain = "d" * 63 + "." + "d" * 63 + "." + "d" * 61  # 189 octets
        fits = "a" * 64 + "@" + domain  # 254 octets, 256 with "<" and ">"
        assert parse_rcpt(f"TO:<{fits}>")[0] == fits
        too_long = Reply(553, "5.1.3", ("Path too long (RFC 5321 §4.5.3.1.3)",))
        assert reply_of(parse_rcpt, f"TO:<{fits}d>") == too_long
        assert reply_of(parse_rcpt, f"TO:{fits}d") == too_long  # brackets missing: still counted
        # A source route is part of the path.
        assert reply_of(parse_rcpt, f"TO:<@r.example:{fits}>") == too_long
        assert reply_of(parse_mail, f"FROM:<{fits}d>") == Reply(
            553, "5.1.7", ("Path too long (RFC 5321 §4.5.3.1.3)",)
        )

    def test_limits_may_be_raised(self):
        limits = AddressLimits(local_part=100, path=300)
        address = "a" * 100 + "@x.test"
        assert parse_rcpt(f"TO:<{address}>", limits)[0] == address
        assert parse_mail(f"FROM:<{address}>", limits)[0] == address


class TestAddressCharacters:
    @pytest.mark.parametrize(
        "path",
        [
            "a\x0bb@x.test",
            "a\x1b[2J@x.test",
            "a\x7f@x.test",
            "a\x85b@x.test",  # C1 controls are not UTF8-non-ascii (RFC 6531 §3.3)
            "a\x9fb@x.test",
            '"a\x0bb"@x.test',
            '"a\\\x0bb"@x.test',  # not even as a quoted pair
            "a@x\x85.test",
            "@r\x0b.example:a@x.test",
        ],
    )
    def test_control_characters_are_refused(self, path):
        assert reply_of(parse_rcpt, f"TO:<{path}>") == Reply(
            553, "5.1.3", ("Control character in recipient address",)
        )
        assert reply_of(parse_mail, f"FROM:<{path}>") == Reply(
            553, "5.1.7", ("Control character in sender address",)
        )

    def test_other_non_ascii_characters_stay_allowed(self):
        # U+00A0 onwards (SMTPUTF8 decides whether they may be used: require_smtputf8).
        for address in ("\u00a0x@x.test", '"a\u2028b"@x.test', "\u0123\u1234@x.test"):
            assert parse_rcpt(f"TO:<{address}>")[0] == address

    def test_empty_local_part_is_no_mailbox(self):
        # ""@x.test names no mailbox: refused at RCPT rather than delivered anywhere.
        assert reply_of(parse_rcpt, 'TO:<""@x.test>') == Reply(
            553, "5.1.3", ("Empty local part: no such mailbox",)
        )
        assert parse_mail('FROM:<""@x.test>')[0] == '""@x.test'

    def test_non_ascii_needs_smtputf8(self):
        # RFC 6531 §3.5: 553 5.6.7 without the SMTPUTF8 parameter on MAIL.
        require_smtputf8("a@x.test", False, what="sender")
        require_smtputf8("j\u00f6rg@x.test", True, what="recipient")
        for what in ("sender", "recipient"):
            assert reply_of(require_smtputf8, "j\u00f6rg@x.test", False, what=what) == Reply(
                553,
                "5.6.7",
                (f"Non-ASCII {what} address not permitted without SMTPUTF8 (RFC 6531)",),
            )
