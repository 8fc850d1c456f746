"""Tests for mtrkmta.smtp.params: MAIL/RCPT parameter validation (RFC 3885 §2-§3.2,
RFC 3461 §2, §4-§5.4; RFC 5321 §4.5.3.1.4, §4.1.1.11)."""

from __future__ import annotations

import pytest

from mtrkmta.envelope import MailParams, Mtrk, OriginalRecipient, RcptParams
from mtrkmta.smtp.command import parse_command, parse_mail, parse_rcpt
from mtrkmta.smtp.mtrk import certifier_from_secret, format_mtrk
from mtrkmta.smtp.params import (
    DEFAULT_NOTIFY,
    effective_notify,
    parse_mail_params,
    parse_rcpt_params,
)
from mtrkmta.smtp.reply import Reply, SMTPError
from mtrkmta.smtp.xtext import encode

ALL = frozenset({"SIZE", "8BITMIME", "DSN", "MTRK", "SMTPUTF8", "AUTH", "PIPELINING"})
CERT = "VheLhqV/rCKJmplkGFwsyW59pYk="
CERT_BYTES = bytes.fromhex("56178b86a57fac22899a9964185c2cc96e7da589")

INVALID_MTRK = Reply(501, "5.5.4", ("Invalid MTRK parameter",))
MTRK_NEEDS_ENVID = Reply(501, "5.5.4", ("MTRK requires ENVID=local@host",))


def mail(params: str, advertised: frozenset[str] = ALL, lenient: bool = False) -> MailParams:
    _, raw = parse_mail(f"FROM:<a@b.example> {params}")
    return parse_mail_params(raw, advertised=advertised, lenient_xtext=lenient)


def rcpt(params: str, advertised: frozenset[str] = ALL, lenient: bool = False) -> RcptParams:
    _, raw = parse_rcpt(f"TO:<c@d.example> {params}")
    return parse_rcpt_params(raw, advertised=advertised, lenient_xtext=lenient)


def mail_error(params: str, advertised: frozenset[str] = ALL, lenient: bool = False) -> Reply:
    with pytest.raises(SMTPError) as info:
        mail(params, advertised, lenient)
    return info.value.reply


def rcpt_error(params: str, advertised: frozenset[str] = ALL, lenient: bool = False) -> Reply:
    with pytest.raises(SMTPError) as info:
        rcpt(params, advertised, lenient)
    return info.value.reply


def codes(reply: Reply) -> tuple[int, str | None]:
    return reply.code, reply.enhanced


class TestMailBasics:
    def test_no_params(self):
        assert mail("") == MailParams()

    def test_all_params(self):
        params = mail(
            f"SIZE=1000 BODY=8bitmime ENVID=q1@h.example RET=full MTRK={CERT}:60 SMTPUTF8 "
            "AUTH=u+2Bx@h.example"
        )
        assert params == MailParams(
            size=1000,
            body="8BITMIME",
            envid="q1@h.example",
            ret="FULL",
            mtrk=Mtrk(CERT_BYTES, 60),
            smtputf8=True,
            auth="u+x@h.example",
        )

    def test_iterable_of_raw_pairs(self):
        raw = iter([("size", "5"), ("Body", "7bit")])
        assert parse_mail_params(raw, advertised=ALL) == MailParams(size=5, body="7BIT")

    @pytest.mark.parametrize("value", ["0", "1", "99999999999999999999"])
    def test_size(self, value):
        assert mail(f"SIZE={value}").size == int(value)

    @pytest.mark.parametrize("value", ["-1", "+1", "1.0", "1e3", "\u0661", "123456789012345678901"])
    def test_size_invalid(self, value):
        assert mail_error(f"SIZE={value}") == Reply(501, "5.5.4", ("Invalid SIZE parameter",))

    @pytest.mark.parametrize("value", ["7BIT", "7bit", "8BITMIME", "8BitMime"])
    def test_body(self, value):
        assert mail(f"BODY={value}").body == value.upper()

    @pytest.mark.parametrize("value", ["BINARYMIME", "8BIT", "QUOTED-PRINTABLE"])
    def test_body_unsupported(self, value):
        assert mail_error(f"BODY={value}") == Reply(555, "5.5.4", ("Unsupported BODY type",))

    @pytest.mark.parametrize("value", ["BINARYMIME", "binarymime", "BinaryMime"])
    def test_body_binarymime_where_advertised(self, value):
        # RFC 3030 §3: BODY=BINARYMIME once BINARYMIME (with CHUNKING) is advertised.
        assert mail(f"BODY={value}", ALL | {"CHUNKING", "BINARYMIME"}).body == "BINARYMIME"

    @pytest.mark.parametrize("value", ["8BIT/MIME", "7BIT;", "8b\u0131tm\u0131me"])
    def test_body_garbage(self, value):
        # "\u0131".upper() == "I": non-ASCII must not fold into a valid keyword.
        assert mail_error(f"BODY={value}") == Reply(501, "5.5.4", ("Invalid BODY parameter",))

    def test_smtputf8_takes_no_value(self):
        assert mail_error("SMTPUTF8=yes") == Reply(501, "5.5.4", ("SMTPUTF8 takes no value",))
        assert mail_error("SMTPUTF8=") == Reply(501, "5.5.4", ("SMTPUTF8 takes no value",))

    def test_auth_null(self):
        assert mail("AUTH=<>").auth == "<>"

    @pytest.mark.parametrize("value", ["a=b", "a+0Db", "a+2b"])
    def test_auth_invalid(self, value):
        assert mail_error(f"AUTH={value}") == Reply(501, "5.5.4", ("Invalid AUTH parameter",))

    @pytest.mark.parametrize("keyword", ["SIZE", "BODY", "ENVID", "RET", "AUTH"])
    def test_missing_value(self, keyword):
        expected = Reply(501, "5.5.4", (f"{keyword} requires a value",))
        assert mail_error(keyword) == expected
        assert mail_error(f"{keyword}=") == expected

    @pytest.mark.parametrize(
        ("params", "extension"),
        [
            ("SIZE=1", "SIZE"),
            ("BODY=8BITMIME", "8BITMIME"),
            ("SMTPUTF8", "SMTPUTF8"),
            ("AUTH=<>", "AUTH"),
        ],
    )
    def test_not_advertised(self, params, extension):
        keyword = params.split("=")[0]
        reply = mail_error(params, advertised=ALL - {extension})
        assert reply == Reply(555, "5.5.4", (f"{keyword} not supported",))

    def test_unknown_keyword(self):
        assert mail_error("XFOO=1") == Reply(555, "5.5.4", ("Unsupported parameter XFOO",))

    def test_unknown_keyword_echo_is_bounded(self):
        reply = mail_error("X" * 300)
        assert reply.code == 555 and len(reply.lines[0]) < 80

    def test_unknown_non_ascii_keyword_not_echoed(self):
        with pytest.raises(SMTPError) as info:
            parse_mail_params([("\u212aEY", "1")], advertised=ALL)
        assert info.value.reply == Reply(555, "5.5.4", ("Unsupported parameter ?",))

    def test_duplicate_size(self):
        assert mail_error("SIZE=1 size=2") == Reply(501, "5.5.4", ("Duplicate SIZE parameter",))


class TestMtrk:
    def test_padded_and_unpadded(self):
        # doc/conformance.rst 3885-P1
        padded = mail(f"MTRK={CERT} ENVID=a@b")
        unpadded = mail(f"MTRK={CERT.rstrip('=')} ENVID=a@b")
        assert padded.mtrk == unpadded.mtrk == Mtrk(CERT_BYTES, None)

    def test_128_bit_certifier(self):
        # doc/conformance.rst 3885-P1
        value = format_mtrk(bytes(16), 7)
        assert mail(f"MTRK={value} ENVID=a@b").mtrk == Mtrk(bytes(16), 7)

    def test_certifier_of_secret(self):
        # RFC 3885 §3.1: B = SHA1(A) travels as base64(B)
        certifier = certifier_from_secret(b"\x01" * 20)
        assert mail(f"MTRK={format_mtrk(certifier, None)} ENVID=a@b").mtrk == Mtrk(certifier)

    @pytest.mark.parametrize("timeout", ["0", "86400", "999999999"])
    def test_timeout(self, timeout):
        # RFC 3885 §3.1: seconds, kept for the server to measure from receipt
        assert mail(f"MTRK={CERT}:{timeout} ENVID=a@b").mtrk == Mtrk(CERT_BYTES, int(timeout))

    @pytest.mark.parametrize(
        "value",
        [
            f"{CERT}:1234567890",
            f"{CERT}:-1",
            f"{CERT}:+1",
            f"{CERT}:",
            "Vhe!LhqV/rCKJmplkGFwsyW59pYk=",
            CERT + "==",
            "AAAA",
            CERT + "A",
        ],
    )
    def test_invalid(self, value):
        # RFC 3885 §3.1, doc/conformance.rst 3885-P3
        assert mail_error(f"MTRK={value} ENVID=a@b") == INVALID_MTRK

    def test_missing_value(self):
        # doc/conformance.rst 3885-P3
        assert mail_error("MTRK ENVID=a@b") == INVALID_MTRK
        assert mail_error("MTRK= ENVID=a@b") == INVALID_MTRK

    def test_second_mtrk(self):
        # doc/conformance.rst 3885-P3: a second MTRK on the same MAIL
        assert mail_error(f"MTRK={CERT} MTRK={CERT} ENVID=a@b") == INVALID_MTRK

    def test_requires_envid(self):
        # RFC 3885 §3.2, doc/conformance.rst 3885-P3
        assert mail_error(f"MTRK={CERT}") == MTRK_NEEDS_ENVID

    @pytest.mark.parametrize("envid", ["noat", "@host", "local@", "@", "a@b+40"])
    def test_requires_unique_envid(self, envid):
        # RFC 3885 §3.2, doc/conformance.rst 3885-P3: local@host, split at the last "@", both
        # parts non-empty
        assert mail_error(f"MTRK={CERT} ENVID={envid}") == MTRK_NEEDS_ENVID

    def test_envid_order_irrelevant(self):
        assert mail(f"ENVID=x@y MTRK={CERT}").envid == "x@y"

    def test_not_advertised(self):
        # RFC 5321 §4.1.1.11, doc/conformance.rst 3885-P3
        reply = mail_error(f"MTRK={CERT} ENVID=a@b", advertised=ALL - {"MTRK"})
        assert reply == Reply(555, "5.5.4", ("MTRK not supported",))
        assert reply.render() == b"555 5.5.4 MTRK not supported\r\n"

    def test_not_advertised_even_if_malformed(self):
        # RFC 5321 §4.1.1.11, doc/conformance.rst 3885-P3: the 555 comes first
        reply = mail_error("MTRK=!!", advertised=ALL - {"MTRK"})
        assert reply == Reply(555, "5.5.4", ("MTRK not supported",))

    @pytest.mark.parametrize("keyword", ["mtrk", "Mtrk", "mTrK"])
    def test_keyword_case_insensitive(self, keyword):
        # RFC 5321 §2.4
        assert mail(f"{keyword}={CERT} envid=a@b").mtrk == Mtrk(CERT_BYTES)


class TestEnvid:
    def test_received_xtext_is_kept_when_not_canonical(self):
        # RFC 3461 §5.2.1(a): the relayed ENVID carries "the same associated
        # esmtp-value"; "+41" decodes to "A", which canonical xtext would send as "A".
        params = mail("ENVID=ab+41cd+2Bef-x")
        assert (params.envid, params.envid_xtext) == ("abAcd+ef-x", "ab+41cd+2Bef-x")
        # Lower-case hex is not xtext (RFC 3461 §4): re-encoded, not passed on.
        lower = mail("ENVID=a+2bb+41", lenient=True)
        assert (lower.envid, lower.envid_xtext) == ("a+bA", None)

    def test_canonical_xtext_keeps_nothing_extra(self):
        # The canonical form is what encoding the decoded value gives back.
        assert mail("ENVID=abAcd+2Bef-x").envid_xtext is None

    def test_free_form_without_mtrk(self):
        # RFC 3461 §4.4: no "@" demanded without MTRK
        assert mail("ENVID=QQ314159").envid == "QQ314159"

    def test_decoded_and_case_kept(self):
        # RFC 3461 §4, §4.4
        assert mail("ENVID=AbC+2B+3D+20x").envid == "AbC+= x"

    def test_value_required(self):
        # RFC 3461 §4.4, §4.5
        assert mail_error("ENVID") == Reply(501, "5.5.4", ("ENVID requires a value",))

    def test_at_most_once(self):
        # RFC 3461 §4.4-§4.5, §5.1(a)
        assert mail_error("ENVID=a ENVID=b") == Reply(501, "5.5.4", ("Duplicate ENVID parameter",))

    def test_100_chars(self):
        # RFC 3461 §4.4, §5.4
        assert mail(f"ENVID={'e' * 100}").envid == "e" * 100

    def test_101_chars(self):
        # RFC 3461 §4.4
        assert mail_error(f"ENVID={'e' * 101}") == Reply(501, "5.5.4", ("ENVID too long",))

    def test_length_counts_decoded_chars(self):
        # RFC 3461 §4.4: 100 decoded chars may need 300 on the wire
        assert mail(f"ENVID={'+20' * 100}").envid == " " * 100

    @pytest.mark.parametrize(
        "encoded", ["a+0Db", "a+0Ab", "a+00b", "a+1Fb", "a+7Fb", "a+80b", "+FF"]
    )
    def test_non_printable_rejected(self, encoded):
        # RFC 3461 §4.4, doc/conformance.rst 3461-P5 (no CR/LF into DSN/MTSN fields)
        assert mail_error(f"ENVID={encoded}") == Reply(501, "5.5.4", ("Invalid ENVID parameter",))

    def test_tab_and_space_allowed(self):
        # RFC 3461 §4.4: white space is printable here
        assert mail("ENVID=a+09b+20c").envid == "a\tb c"

    @pytest.mark.parametrize("encoded", ["a=b", "a+2", "a+zz", "\u00e9"])
    def test_bad_xtext(self, encoded):
        # RFC 3461 §4, §5.1(a)
        assert mail_error(f"ENVID={encoded}") == Reply(501, "5.5.4", ("Invalid ENVID parameter",))

    def test_lower_case_hex_strict_and_lenient(self):
        # RFC 3461 §4, doc/conformance.rst 3461-P4
        assert mail_error("ENVID=a+2bb") == Reply(501, "5.5.4", ("Invalid ENVID parameter",))
        assert mail("ENVID=a+2bb", lenient=True).envid == "a+b"

    def test_split_at_last_at(self):
        # RFC 3885 §3.2 ("@" is an xchar, RFC 3461 §4): local-envid may contain "@"
        params = mail(f"MTRK={CERT} ENVID=a@b@host.example")
        assert params.envid == "a@b@host.example"

    def test_encoded_at_counts(self):
        # RFC 3885 §3.2, RFC 3461 §4: "@" as +40 is the same octet after decoding
        assert mail(f"MTRK={CERT} ENVID=local+40host").envid == "local@host"

    def test_hashed_fqhn(self):
        # RFC 3885 §3.2: 72-char local-envid + "@" + 27-char base64(SHA1(fqhn))
        hashed = "ab+/CDEFGHIJKLMNOPQRSTUVWXY"
        assert len(hashed) == 27
        params = mail(f"MTRK={CERT} ENVID={encode('L' * 72 + '@' + hashed)}")
        assert params.envid == "L" * 72 + "@" + hashed

    def test_valid_envid_and_ret_give_values(self):
        # RFC 3461 §5.1(a): valid ENVID/RET parse cleanly and change nothing else
        assert mail("ENVID=x RET=HDRS") == MailParams(envid="x", ret="HDRS")

    @pytest.mark.parametrize("keyword", ["ENVID=x", "RET=FULL"])
    def test_requires_dsn(self, keyword):
        # RFC 3461 §2
        name = keyword.split("=")[0]
        reply = mail_error(keyword, advertised=ALL - {"DSN", "MTRK"})
        assert reply == Reply(555, "5.5.4", (f"{name} not supported",))


class TestRet:
    @pytest.mark.parametrize(
        ("value", "expected"), [("FULL", "FULL"), ("hdrs", "HDRS"), ("Full", "FULL")]
    )
    def test_values_any_case(self, value, expected):
        # RFC 3461 §4.3
        assert mail(f"RET={value}").ret == expected

    @pytest.mark.parametrize("value", ["HEADERS", "FULL,HDRS", "ful", "\ufb01"])
    def test_invalid(self, value):
        # RFC 3461 §4.3, §5.1(a)
        assert mail_error(f"RET={value}") == Reply(501, "5.5.4", ("Invalid RET parameter",))

    def test_duplicate(self):
        # RFC 3461 §4.5, §5.1(a)
        assert mail_error("RET=FULL RET=FULL") == Reply(501, "5.5.4", ("Duplicate RET parameter",))


class TestNotify:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("NEVER", {"NEVER"}),
            ("never", {"NEVER"}),
            ("SUCCESS", {"SUCCESS"}),
            ("success,Failure,DELAY", {"SUCCESS", "FAILURE", "DELAY"}),
            ("FAILURE,FAILURE", {"FAILURE"}),
            ("DELAY,SUCCESS", {"DELAY", "SUCCESS"}),
        ],
    )
    def test_valid(self, value, expected):
        # RFC 3461 §4.1, doc/conformance.rst 3461-P7
        assert rcpt(f"NOTIFY={value}").notify == frozenset(expected)

    @pytest.mark.parametrize(
        "value",
        [
            "NEVER,SUCCESS",
            "FAILURE,NEVER",
            "NEVER,NEVER",
            "SUCCESS,",
            ",SUCCESS",
            "SUCCESS,,DELAY",
            "SUCCESS DELAY",
            "BOUNCE",
            "SUCCESS;DELAY",
            "su\u017fce\u017f\u017f",
        ],
    )
    def test_invalid(self, value):
        # RFC 3461 §4.1, doc/conformance.rst 3461-P3 ("\u017f".upper() == "S" must not sneak
        # through)
        with pytest.raises(SMTPError) as info:
            parse_rcpt_params([("NOTIFY", value)], advertised=ALL)
        assert info.value.reply == Reply(501, "5.5.4", ("Invalid NOTIFY parameter",))

    def test_value_required(self):
        assert rcpt_error("NOTIFY") == Reply(501, "5.5.4", ("NOTIFY requires a value",))

    def test_28_chars(self):
        # RFC 3461 §5.4: NOTIFY of 28 characters
        value = "SUCCESS,FAILURE,DELAY"
        assert len(f"NOTIFY={value}") == 28
        assert rcpt(f"NOTIFY={value}").notify == frozenset({"SUCCESS", "FAILURE", "DELAY"})

    def test_absent_means_failure_delay(self):
        # RFC 3461 §4.1, doc/conformance.rst 3461-P1
        params = rcpt("")
        assert params.notify is None
        assert effective_notify(params) == DEFAULT_NOTIFY == frozenset({"FAILURE", "DELAY"})
        assert effective_notify(rcpt("NOTIFY=NEVER")) == frozenset({"NEVER"})

    def test_duplicate(self):
        # RFC 3461 §4.5, §5.1(b), doc/conformance.rst 3461-P3
        assert rcpt_error("NOTIFY=NEVER NOTIFY=NEVER") == Reply(
            501, "5.5.4", ("Duplicate NOTIFY parameter",)
        )


class TestOrcpt:
    def test_received_xtext_is_kept_when_not_canonical(self):
        # RFC 3461 §5.2.1(d): "the identical original-recipient-address" goes on.
        assert rcpt("ORCPT=rfc822;x+41t@dsn.test").orcpt == OriginalRecipient(
            "rfc822", "xAt@dsn.test", "x+41t@dsn.test"
        )
        assert rcpt("ORCPT=rfc822;x+2Bt@dsn.test").orcpt == OriginalRecipient(
            "rfc822", "x+t@dsn.test"
        )

    def test_basic(self):
        # RFC 3461 §4.2, §5.2.1(d)
        assert rcpt("ORCPT=rfc822;Joe+2BX@Example.COM").orcpt == OriginalRecipient(
            "rfc822", "Joe+X@Example.COM"
        )

    def test_byte_exact_type_and_address(self):
        # RFC 3461 §4.2, §5.2.1(d): no case folding
        assert rcpt("ORCPT=RFC822;MiXeD@CaSe").orcpt == OriginalRecipient("RFC822", "MiXeD@CaSe")

    def test_address_not_checked_against_type(self):
        # doc/conformance.rst 3461-P6: any atom type; the address is not checked against its syntax
        assert rcpt("ORCPT=x400;/C+3Dus/ADMD+3D+20/").orcpt == OriginalRecipient(
            "x400", "/C=us/ADMD= /"
        )
        assert rcpt("ORCPT=rfc822;not-an-address").orcpt == OriginalRecipient(
            "rfc822", "not-an-address"
        )

    def test_500_char_value(self):
        # RFC 3461 §4.2, §5.4
        value = "rfc822;" + "a" * 480 + "@" + "b" * 12
        assert len(value) == 500
        assert rcpt(f"ORCPT={value}").orcpt == OriginalRecipient("rfc822", value[7:])

    def test_501_char_value(self):
        value = "rfc822;" + "a" * 494
        assert rcpt_error(f"ORCPT={value}") == Reply(501, "5.5.4", ("ORCPT too long",))

    @pytest.mark.parametrize(
        "value",
        [
            "rfc822",  # no ";"
            ";a@b",  # empty type
            "rfc 822;a@b",
            "rfc822;a b",
            "rfc822:x;a@b",  # ":" is not atext
            "rfc(822);a@b",
            "rfc822;",  # empty address
            "rfc822;a=b",  # raw "=" in xtext
            "rfc822;a+0D+0Ab",  # CR/LF: doc/conformance.rst 3461-P5
            "rfc822;a+C3+A9",  # 8-bit octets: RFC 3461 §4.2, doc/conformance.rst 3461-P5
            "rfc822;a+2b",  # lower-case hex
        ],
    )
    def test_invalid(self, value):
        # RFC 3461 §4.2, doc/conformance.rst 3461-P3, 3461-P5, 3461-P6
        with pytest.raises(SMTPError) as info:
            parse_rcpt_params([("ORCPT", value)], advertised=ALL)
        assert info.value.reply == Reply(501, "5.5.4", ("Invalid ORCPT parameter",))

    def test_lenient_xtext(self):
        # RFC 3461 §4, doc/conformance.rst 3461-P4
        # Lower-case hex is not xtext (RFC 3461 §4), so it is not relayed as received.
        assert rcpt("ORCPT=rfc822;a+2bb@c", lenient=True).orcpt == OriginalRecipient(
            "rfc822", "a+b@c"
        )

    def test_value_required(self):
        assert rcpt_error("ORCPT=") == Reply(501, "5.5.4", ("ORCPT requires a value",))

    def test_duplicate(self):
        # RFC 3461 §4.5, §5.1(b), doc/conformance.rst 3461-P3
        assert rcpt_error("ORCPT=rfc822;a@b ORCPT=rfc822;a@b") == Reply(
            501, "5.5.4", ("Duplicate ORCPT parameter",)
        )

    def test_valid_notify_orcpt_give_values(self):
        # RFC 3461 §5.1(b): valid NOTIFY/ORCPT parse cleanly and change nothing else
        assert rcpt("NOTIFY=SUCCESS ORCPT=rfc822;x@y") == RcptParams(
            notify=frozenset({"SUCCESS"}), orcpt=OriginalRecipient("rfc822", "x@y")
        )

    @pytest.mark.parametrize("params", ["NOTIFY=NEVER", "ORCPT=rfc822;a@b"])
    def test_requires_dsn(self, params):
        # RFC 3461 §2
        name = params.split("=")[0]
        reply = rcpt_error(params, advertised=frozenset({"SIZE"}))
        assert reply == Reply(555, "5.5.4", (f"{name} not supported",))

    def test_unknown_rcpt_keyword(self):
        # RFC 5321 §4.1.1.11: MAIL-only keywords are unknown on RCPT
        assert rcpt_error("SIZE=1") == Reply(555, "5.5.4", ("Unsupported parameter SIZE",))

    @pytest.mark.parametrize("keyword", ["notify", "Notify", "orcpt"])
    def test_keyword_case_insensitive(self, keyword):
        # RFC 5321 §2.4
        value = "never" if keyword.lower() == "notify" else "rfc822;a@b"
        assert rcpt(f"{keyword}={value}") != RcptParams()


class TestRealisticMaximumLines:
    def test_maximal_mail_line(self):
        # RFC 3461 §5.4, RFC 3885 §2, doc/conformance.rst 3885-P2: MTRK (44 chars, padded as a
        # client may still send it) + ENVID of 100 decoded chars, xtext-encoded, + RET + SIZE +
        # BODY, after a 254-octet path, on one command line.
        mtrk = f" MTRK={CERT}:999999999"
        assert len(mtrk) == 44
        decoded_envid = "+" * 72 + "@" + "=" * 27  # 100 decoded chars
        envid = encode(decoded_envid)
        assert len(envid) == 298
        path = f"{'s' * 64}@{'d' * 181}.example"
        assert len(path) == 254
        line = (
            f"MAIL FROM:<{path}>{mtrk} ENVID={envid} RET=HDRS "
            "SIZE=99999999999999999999 BODY=8BITMIME\r\n"
        ).encode()
        assert len(line) > 512 + 40 + 107
        command = parse_command(line)
        sender, raw = parse_mail(command.argument)
        params = parse_mail_params(raw, advertised=ALL)
        assert sender == path
        assert params.envid == decoded_envid
        assert params.mtrk == Mtrk(CERT_BYTES, 999999999)
        assert (params.ret, params.body, params.size) == ("HDRS", "8BITMIME", 10**20 - 1)

    def test_fully_escaped_envid_fits(self):
        # doc/conformance.rst 3885-P2: worst-case xtext (300 wire chars) still fits in 2048 octets
        envid = encode("\x20" * 72) + "@" + encode("=" * 27)
        line = f"MAIL FROM:<a@b.example> MTRK={CERT}:999999999 ENVID={envid} RET=FULL".encode()
        command = parse_command(line)
        params = parse_mail_params(parse_mail(command.argument)[1], advertised=ALL)
        assert params.envid == " " * 72 + "@" + "=" * 27

    def test_maximal_rcpt_line(self):
        # RFC 3461 §4.2 and §4.1: 500-char ORCPT value + 28-char NOTIFY after a 256-octet
        # path, the longest RFC 5321 §4.5.3.1.3 allows (brackets included).
        orcpt = "rfc822;" + "+41" * 161 + "@b.example"
        assert len(orcpt) == 500
        path = f"<{'r' * 64}@{'d' * 181}.example>"
        assert len(path) == 256
        line = f"RCPT TO:{path} NOTIFY=SUCCESS,FAILURE,DELAY ORCPT={orcpt}".encode()
        assert len(line) == 800  # far over the 512-octet base line
        command = parse_command(line)
        recipient, raw = parse_rcpt(command.argument)
        params = parse_rcpt_params(raw, advertised=ALL)
        assert recipient.startswith("r" * 64)
        assert params.notify == frozenset({"SUCCESS", "FAILURE", "DELAY"})
        assert params.orcpt == OriginalRecipient("rfc822", "A" * 161 + "@b.example", orcpt[7:])


class TestReplyCodeSummary:
    @pytest.mark.parametrize(
        ("kind", "params", "expected"),
        [
            ("mail", f"MTRK={CERT}:x ENVID=a@b", (501, "5.5.4")),
            ("mail", "ENVID=a=b", (501, "5.5.4")),
            ("mail", "RET=X", (501, "5.5.4")),
            ("rcpt", "NOTIFY=X", (501, "5.5.4")),
            ("rcpt", "ORCPT=x", (501, "5.5.4")),
            ("mail", "RET=FULL RET=HDRS", (501, "5.5.4")),
            ("rcpt", "NOTIFY=NEVER NOTIFY=NEVER", (501, "5.5.4")),
            ("mail", f"MTRK={CERT}", (501, "5.5.4")),
            ("mail", f"MTRK={CERT} ENVID=nohost", (501, "5.5.4")),
            ("mail", "FOO=BAR", (555, "5.5.4")),
            ("rcpt", "FOO", (555, "5.5.4")),
        ],
    )
    def test_table(self, kind, params, expected):
        # RFC 3461 §5.1, RFC 5321 §4.1.1.11, doc/conformance.rst 3461-P3
        reply = mail_error(params) if kind == "mail" else rcpt_error(params)
        assert codes(reply) == expected

    def test_not_advertised_row(self):
        # RFC 5321 §4.1.1.11, doc/conformance.rst 3461-P3
        assert codes(mail_error("ENVID=x", advertised=frozenset())) == (555, "5.5.4")

    def test_2048_octet_rcpt_line(self):
        # RFC 3461 §5.4, doc/conformance.rst 3885-P2: a full 2048-octet line (CRLF included) parses
        # end to end; NOTIFY may repeat elements (doc/conformance.rst 3461-P7), so it can pad
        # the line with real parameters.
        head = "RCPT TO:<r@d.example> ORCPT=rfc822;r@d.example NOTIFY="
        repeats = (2048 - 2 - len(head) - len("DELAY")) // len("FAILURE,")
        line = f"{head}{'FAILURE,' * repeats}DELAY"
        domain = "d" * (2048 - 2 - len(line) + 1)
        line = line.replace("r@d.example>", f"r@{domain}.example>", 1) + "\r\n"
        assert len(line) == 2048
        recipient, raw = parse_rcpt(parse_command(line.encode()).argument)
        assert recipient == f"r@{domain}.example"
        params = parse_rcpt_params(raw, advertised=ALL)
        assert params.notify == frozenset({"FAILURE", "DELAY"})
