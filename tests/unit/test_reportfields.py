"""Each DSN field function makes any text safe for its field (RFC 3464 §2, RFC 6533 §3)."""

from __future__ import annotations

import ipaddress
import re

from hypothesis import given
from hypothesis import strategies as st

from mtrkmta.reportfields import (
    MAX_RUN,
    dns_mta,
    mta_host,
    safe_address,
    safe_diagnostic,
    safe_human,
    safe_mta_name,
    safe_original_recipient,
    safe_text,
    safe_typed_mta,
    typed_mta,
)

ANY_TEXT = st.text(st.characters(codec=None), max_size=200) | st.text(
    st.sampled_from("a \t\r\n\x00\x01\x7f()\\;=+é€😀"), max_size=2500
)
TEXT_7BIT = re.compile(r"[\t -~]*")  # RFC 3464 §2.1.2 text, single line, 7-bit
ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+"
XTEXT = re.compile(r"(?:[!-*,-<>-\[\]-~]|\\x\{[0-9A-F]{2,6}\})+")  # RFC 6533 §3 utf-8-addr-xtext
MTA_NAME = re.compile(r"(?:[!-'*-:<-\[\]-~]|\\x\{[0-9A-F]{2,6}\})*")


# Mostly plain values with the characters at the edges of each fast path among them.
NEAR_PLAIN = st.text(st.sampled_from("a~ !\t()\\;[]'*:<\x7f\x1f\x80\xa0é\n"), max_size=40)


def by_character(value: str, keep) -> str:
    """The per-character definition the fast paths must agree with (runs of at most
    MAX_RUN characters: no break)."""
    return "".join(c if keep(c) else f"\\x{{{ord(c):02X}}}" for c in value)


@given(ANY_TEXT | NEAR_PLAIN)
def test_the_fast_paths_agree_with_the_per_character_definitions(value):
    if not unbroken_runs_fit(value) or len(value) > MAX_RUN:
        return
    assert safe_text(value) == by_character(value, lambda c: c == "\t" or " " <= c <= "~")
    assert safe_human(value) == by_character(
        value, lambda c: c == "\t" or " " <= c <= "~" or (c >= "\xa0" and c.isprintable())
    )
    assert safe_mta_name(value) == by_character(
        value.strip(" \t"), lambda c: "!" <= c <= "~" and c not in "()\\;"
    )


@given(st.text(st.sampled_from("0123456789.:abcdefABCDEF%x []"), max_size=45))
def test_mta_host_names_every_ip_address_and_nothing_else_as_a_literal(value):
    name = value.strip(" \t")
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        assert mta_host(value) == name
    else:
        tag = "IPv6:" if address.version == 6 else ""
        assert mta_host(value) == f"[{tag}{address}]"


def unbroken_runs_fit(value: str) -> bool:
    return all(len(run) <= MAX_RUN for run in re.split(r"[ \t]", value))


@given(ANY_TEXT)
def test_safe_text_is_single_line_7bit(value):
    safe = safe_text(value)
    assert TEXT_7BIT.fullmatch(safe)
    assert unbroken_runs_fit(safe)


def test_safe_text_escapes_controls_and_non_ascii():
    # RFC 6533 §3 notation, at least two hex digits.
    assert safe_text("550 bad\x01user\r\n") == "550 bad\\x{01}user\\x{0D}\\x{0A}"
    assert safe_text("tab\there é") == "tab\there \\x{E9}"
    assert safe_text("x" * (MAX_RUN + 5)) == "x" * MAX_RUN + " " + "xxxxx"


@given(ANY_TEXT)
def test_safe_human_has_no_control_character(value):
    safe = safe_human(value)
    assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]", safe)
    assert unbroken_runs_fit(safe)


def test_safe_human_keeps_letters():
    assert safe_human("Jörg\x1b[31m") == "Jörg\\x{1B}[31m"


@given(ANY_TEXT)
def test_safe_mta_name_is_one_word_without_comment_characters(value):
    safe = safe_mta_name(value)
    assert MTA_NAME.fullmatch(safe.replace(" ", "")) and safe.replace(" ", "") == "".join(
        safe.split()
    )
    assert "(" not in safe and ")" not in safe and ";" not in safe


def test_safe_mta_name_examples():
    assert safe_mta_name("evil\x01host") == "evil\\x{01}host"
    assert safe_mta_name("a (b) c") == "a\\x{20}\\x{28}b\\x{29}\\x{20}c"
    assert safe_mta_name("mx.example.net") == "mx.example.net"


@given(ANY_TEXT)
def test_safe_typed_mta_is_type_and_name(value):
    kind, _, name = safe_typed_mta(value).partition("; ")
    assert re.fullmatch(ATOM, kind)
    assert MTA_NAME.fullmatch(name.replace(" ", ""))


def test_safe_typed_mta_keeps_a_type():
    assert safe_typed_mta("dns; mx1.example.com") == "dns; mx1.example.com"
    assert safe_typed_mta("mx1.example.com") == "dns; mx1.example.com"
    assert safe_typed_mta("bad type; x") == "dns; bad\\x{20}type\\x{3B}\\x{20}x"


@given(ANY_TEXT)
def test_safe_address_fits_its_address_type(value):
    safe = safe_address(value)
    assert TEXT_7BIT.fullmatch(safe)
    kind, _, address = safe.partition("; ")
    assert kind in ("rfc822", "utf-8")
    if kind == "utf-8":
        assert address == "" or XTEXT.fullmatch(address.replace(" ", ""))
    assert unbroken_runs_fit(address)


def test_safe_address_examples():
    assert safe_address("bob@example.com") == "rfc822; bob@example.com"
    assert safe_address("bad\x01user@x") == "utf-8; bad\\x{01}user@x"
    assert safe_address("jörg+x@bücher.de") == "utf-8; j\\x{F6}rg\\x{2B}x@b\\x{FC}cher.de"


@given(ANY_TEXT)
def test_safe_original_recipient_is_typed_7bit_text(value):
    safe = safe_original_recipient(value)
    assert TEXT_7BIT.fullmatch(safe)
    assert re.match(ATOM + " *;", safe)


@given(ANY_TEXT)
def test_safe_diagnostic_is_typed_7bit_text(value):
    safe = safe_diagnostic(value)
    assert TEXT_7BIT.fullmatch(safe)
    assert re.match(ATOM + " *;", safe)
    assert unbroken_runs_fit(safe)


def test_safe_diagnostic_examples():
    assert safe_diagnostic("smtp; 550 5.1.1 bad\x01user") == "smtp; 550 5.1.1 bad\\x{01}user"
    assert safe_diagnostic("550 no") == "smtp; 550 no"
    assert safe_diagnostic("no route") == "x-local; no route"
    assert safe_diagnostic(" 0;") == "0;"  # found by hypothesis: no space before the type


def test_an_address_is_named_as_a_domain_literal():
    # RFC 3461 §9.3: the name of a dns MTA is a domain name or a domain-literal
    # (RFC 5321 §4.1.3: "[" IPv4 "]", "[IPv6:" IPv6 "]").
    assert dns_mta("127.0.0.1") == "dns; [127.0.0.1]"
    assert dns_mta("2001:DB8:0::1") == "dns; [IPv6:2001:db8::1]"
    assert dns_mta("::1") == "dns; [IPv6:::1]"
    assert dns_mta("mx.example.org") == "dns; mx.example.org"
    assert mta_host(" [192.0.2.1] ") == "[192.0.2.1]"
    assert mta_host("1.2.3.4.example") == "1.2.3.4.example"
    assert typed_mta("dns; 127.0.0.1") == ("dns", "[127.0.0.1]")
    assert typed_mta("DNS;::1") == ("DNS", "[IPv6:::1]")
    assert typed_mta("192.0.2.1") == ("dns", "[192.0.2.1]")
    assert typed_mta("x-local; 192.0.2.1") == ("x-local", "192.0.2.1")
    assert safe_typed_mta("dns; 127.0.0.1") == "dns; [127.0.0.1]"
