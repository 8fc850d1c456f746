"""Tests for mtrkmta.smtp.extensions: EHLO/LHLO reply rendering and parsing (RFC 3885 §2,
RFC 3461 §2)."""

from __future__ import annotations

import pytest

from mtrkmta.smtp.extensions import advertised_keywords, keyword_of, parse_ehlo, render_ehlo
from mtrkmta.smtp.params import parse_mail_params
from mtrkmta.smtp.reply import Reply, ReplyReader

FULL = [
    "PIPELINING",
    "SIZE 10240000",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "DSN",
    "MTRK",
    "SMTPUTF8",
    "AUTH PLAIN LOGIN",
]


def read(raw: bytes) -> Reply:
    reader = ReplyReader()
    replies = [reader.feed(line) for line in raw.split(b"\r\n")[:-1]]
    assert all(reply is None for reply in replies[:-1])
    final = replies[-1]
    assert final is not None
    return final


class TestRender:
    def test_full_list(self):
        # RFC 3885 §2, RFC 3461 §2: MTRK and DSN bare, plus ENHANCEDSTATUSCODES, PIPELINING
        reply = render_ehlo("mx.example", FULL)
        assert reply.render() == (
            b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
            b"250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250-MTRK\r\n250-SMTPUTF8\r\n"
            b"250 AUTH PLAIN LOGIN\r\n"
        )

    def test_no_enhanced_code_on_ehlo_reply(self):
        # RFC 2034 §3 exempts the EHLO reply from enhanced codes
        assert render_ehlo("mx.example", FULL).enhanced is None

    def test_greeting(self):
        assert render_ehlo("mx.example", [], greeting="hello").render() == (
            b"250 mx.example hello\r\n"
        )

    def test_mtrk_without_dsn_refused(self):
        # doc/conformance.rst 3885-P4: never advertise MTRK alone
        with pytest.raises(ValueError, match="DSN"):
            render_ehlo("mx.example", ["PIPELINING", "MTRK"])

    def test_dsn_without_mtrk_fine(self):
        # RFC 3461 §2
        assert render_ehlo("mx.example", ["DSN"]).lines == ("mx.example", "DSN")

    @pytest.mark.parametrize("keywords", [["DSN", "MTRK 1"], ["DSN x"], ["DSN x", "MTRK"]])
    def test_mtrk_and_dsn_take_no_parameters(self, keywords):
        # RFC 3885 §2, RFC 3461 §2
        with pytest.raises(ValueError, match="without parameters"):
            render_ehlo("mx.example", keywords)

    def test_lower_case_mtrk_still_needs_dsn(self):
        # doc/conformance.rst 3885-P4, RFC 5321 §2.4
        with pytest.raises(ValueError):
            render_ehlo("mx.example", ["mtrk"])

    @pytest.mark.parametrize("line", ["", " SIZE", "SIZE  1", "AUTH=LOGIN", "X_Y", "SIZE\t1"])
    def test_malformed_keyword_line(self, line):
        with pytest.raises(ValueError):
            render_ehlo("mx.example", [line])

    def test_duplicate_keyword(self):
        with pytest.raises(ValueError):
            render_ehlo("mx.example", ["SIZE 1", "size 2"])

    @pytest.mark.parametrize("hostname", ["", "two words"])
    def test_bad_hostname(self, hostname):
        with pytest.raises(ValueError):
            render_ehlo(hostname, [])

    def test_advertised_keywords_feed_params(self):
        # RFC 3461 §2: the advertised set drives which parameters MAIL accepts
        advertised = advertised_keywords(FULL)
        assert advertised == frozenset(
            {
                "PIPELINING",
                "SIZE",
                "8BITMIME",
                "ENHANCEDSTATUSCODES",
                "DSN",
                "MTRK",
                "SMTPUTF8",
                "AUTH",
            }
        )
        assert parse_mail_params([("RET", "FULL")], advertised=advertised).ret == "FULL"

    def test_keyword_of(self):
        assert keyword_of("auth PLAIN") == "AUTH"


class TestParse:
    def test_round_trip(self):
        extensions = parse_ehlo(read(render_ehlo("mx.example", FULL).render()))
        assert extensions == {
            "PIPELINING": "",
            "SIZE": "10240000",
            "8BITMIME": "",
            "ENHANCEDSTATUSCODES": "",
            "DSN": "",
            "MTRK": "",
            "SMTPUTF8": "",
            "AUTH": "PLAIN LOGIN",
        }

    def test_mtrk_with_future_parameters(self):
        # RFC 3885 §2: recognise MTRK even with parameters appended
        reply = read(b"250-peer.example\r\n250-DSN\r\n250 MTRK FUTURE=1 x\r\n")
        extensions = parse_ehlo(reply)
        assert "MTRK" in extensions and extensions["MTRK"] == "FUTURE=1 x"

    def test_keywords_case_insensitive(self):
        # RFC 5321 §2.4
        assert set(parse_ehlo(Reply(250, None, ("peer", "mtrk", "Dsn")))) == {"MTRK", "DSN"}

    def test_first_line_is_not_a_keyword(self):
        assert parse_ehlo(Reply(250, None, ("MTRK",))) == {}

    def test_junk_lines_ignored_and_first_duplicate_wins(self):
        reply = Reply(250, None, ("peer", "AUTH=LOGIN", "", "AUTH LOGIN", "AUTH PLAIN", "\u00e9"))
        assert parse_ehlo(reply) == {"AUTH": "LOGIN"}

    def test_tab_separated_parameters(self):
        assert parse_ehlo(Reply(250, None, ("peer", "SIZE\t1000 "))) == {"SIZE": "1000"}

    def test_enhanced_codes_on_ehlo_lines_tolerated(self):
        reply = read(b"250-2.0.0 peer.example\r\n250-2.0.0 DSN\r\n250 2.0.0 MTRK\r\n")
        assert parse_ehlo(reply) == {"DSN": "", "MTRK": ""}
        stray = Reply(250, None, ("peer", "2.0.0 PIPELINING"))
        assert parse_ehlo(stray) == {"PIPELINING": ""}

    def test_negative_reply_refused(self):
        with pytest.raises(ValueError):
            parse_ehlo(Reply(502, "5.5.1", ("Command not implemented",)))
