"""Tests for mtrkmta.mtqp.uri: parsing and formatting mtqp:// URIs (RFC 3887 §9)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrkmta.mtqp.protocol import DEFAULT_PORT, Track
from mtrkmta.mtqp.uri import MtqpUri, UriError, format_uri, parse_uri
from mtrkmta.smtp import xtext

# Every vector here is our own; the RFC 3887 examples are not used (their
# secret is 64 bits, under RFC 3885 §3.1's 128).
SECRET = "AAECAwQFBgcICQoLDA0ODw=="  # base64 of octets 00..0f
SLASHY = "/+8/Pz8/Pz8/Pz8/Pz8/Pw=="  # a valid base64 secret with "/" in it


class TestParse:
    def test_standard_port(self):
        # RFC 3887 §9, §10: without a port, 1038
        uri = parse_uri(f"mtqp://mtqp.origin.example/track/k9-2@origin.example/{SECRET}")
        assert uri == MtqpUri("mtqp.origin.example", "k9-2@origin.example", SECRET)
        assert uri.port == DEFAULT_PORT == 1038

    def test_explicit_port(self):
        uri = parse_uri(f"mtqp://mtqp.origin.example:11038/track/a@b/{SECRET}")
        assert uri.port == 11038
        assert parse_uri(f"mtqp://h.example:/track/a@b/{SECRET}").port == 1038

    def test_track_and_scheme_case_insensitive(self):
        # RFC 3887 §9: "/track/" is case-insensitive
        uri = parse_uri(f"MTQP://h.example/TrAcK/a@b/{SECRET}")
        assert uri == MtqpUri("h.example", "a@b", SECRET)

    def test_values_case_sensitive(self):
        # RFC 3887 §9: the two values are case-sensitive
        uri = parse_uri("mtqp://h.example/track/AbC@Origin.Example/QUJDRA==")
        assert uri.envid == "AbC@Origin.Example"
        assert uri.secret == "QUJDRA=="
        assert parse_uri("mtqp://h.example/track/abc@origin.example/QUJDRA==") != uri

    def test_percent_encoded_values(self):
        # RFC 3887 §9: "/", "?" and "%" inside the values are %XX-encoded
        uri = parse_uri(
            "mtqp://h.example/track/a%2Fb%3Fc%25d@e/%2F%2B8%2fPz8%2FPz8%2FPz8%2FPz8%2FPw=="
        )
        assert uri.envid == "a/b?c%d@e"
        assert uri.secret == SLASHY

    def test_other_escapes_decoded(self):
        assert parse_uri(f"mtqp://h.example/track/%61%40b/{SECRET}").envid == "a@b"

    def test_raw_characters_that_need_no_escape(self):
        # 3887 §9.4 names only "/", "?" and "%"; other printable characters are literal
        assert parse_uri(f"mtqp://h.example/track/a#b<c>+2B@d/{SECRET}").envid == "a#b<c>+2B@d"

    def test_ipv6(self):
        uri = parse_uri(f"mtqp://[2001:db8::25]:1040/track/a@b/{SECRET}")
        assert uri.host == "2001:db8::25"
        assert uri.port == 1040
        assert parse_uri(f"mtqp://[::1]/track/a@b/{SECRET}").port == 1038

    def test_ipv4(self):
        assert parse_uri(f"mtqp://192.0.2.10/track/a@b/{SECRET}").host == "192.0.2.10"

    def test_track_command(self):
        # the URI stands for TRACK <envid> <secret>; the envid is xtext as in ENVID=
        uri = parse_uri(f"mtqp://h.example/track/a+2Bb@c/{SECRET}")
        assert uri.track() == Track("a+b@c", SECRET)
        assert uri.track().render() == f"TRACK a+2Bb@c {SECRET}\r\n".encode()

    def test_secret_not_in_repr(self):
        uri = MtqpUri("h.example", "a@b", SECRET)
        assert SECRET not in repr(uri)

    @pytest.mark.parametrize(
        "text",
        [
            "",
            f"http://h.example/track/a@b/{SECRET}",
            f"mtqp:/h.example/track/a@b/{SECRET}",
            "mtqp://h.example",
            "mtqp://h.example/",
            f"mtqp:///track/a@b/{SECRET}",  # no host
            f"mtqp://h.example/trak/a@b/{SECRET}",
            f"mtqp://h.example/track/a@b/{SECRET}/extra",
            f"mtqp://h.example/track/a@b/{SECRET}/",
            "mtqp://h.example/track/a@b",
            f"mtqp://h.example/track//{SECRET}",
            "mtqp://h.example/track/a@b/",
            f"mtqp://h.example/track/a@b/{SECRET}?x=1",  # a raw '?' is a query
            f"mtqp://h.example/track/a?b@c/{SECRET}",
            f"mtqp://user@h.example/track/a@b/{SECRET}",
            f"mtqp://h.example:99999/track/a@b/{SECRET}",
            f"mtqp://h.example:0/track/a@b/{SECRET}",
            f"mtqp://h.example:abc/track/a@b/{SECRET}",
            f"mtqp://h.example:1:2/track/a@b/{SECRET}",
            f"mtqp://[zz::1]/track/a@b/{SECRET}",
            f"mtqp://[::1/track/a@b/{SECRET}",
            f"mtqp://[::1]x/track/a@b/{SECRET}",
            f"mtqp://[192.0.2.1]/track/a@b/{SECRET}",
            f"mtqp://[fe80::1%25eth0]/track/a@b/{SECRET}",
            f"mtqp://h..example/track/a@b/{SECRET}",
            f"mtqp://h.example/track/a%2@b/{SECRET}",
            f"mtqp://h.example/track/a%zz@b/{SECRET}",
            f"mtqp://h.example/track/a b@c/{SECRET}",
            f"mtqp://h.example/track/a%20b@c/{SECRET}",  # no spaces in unique-envid
            f"mtqp://h.example/track/a%C3%A9@c/{SECRET}",  # ASCII only
            f"mtqp://h.example/track/a\u00e9@c/{SECRET}",
            f"mtqp://h.example/track/no-at-sign/{SECRET}",  # unique-envid needs '@'
            f"mtqp://h.example/track/a+ZZ@b/{SECRET}",  # not xtext
            "mtqp://h.example/track/a@b/not!base64",
            "mtqp://h.example/track/a@b/AAAAA",
        ],
    )
    def test_malformed(self, text):
        with pytest.raises(UriError):
            parse_uri(text)


class TestFormat:
    def test_default_port_omitted(self):
        # RFC 3887 §9: the first form refers to the standard port
        uri = MtqpUri("mtqp.origin.example", "k9-2@origin.example", SECRET)
        assert format_uri(uri) == f"mtqp://mtqp.origin.example/track/k9-2@origin.example/{SECRET}"
        assert str(parse_uri(f"mtqp://h.example:1038/track/a@b/{SECRET}")) == (
            f"mtqp://h.example/track/a@b/{SECRET}"
        )

    def test_other_port(self):
        uri = MtqpUri("h.example", "a@b", SECRET, 2038)
        assert str(uri) == f"mtqp://h.example:2038/track/a@b/{SECRET}"

    def test_escapes(self):
        # RFC 3887 §9: "/", "?", "%" become %XX (and what RFC 3986 forbids in a segment)
        uri = MtqpUri("h.example", "a/b?c%d#e@f", SLASHY)
        assert str(uri) == (
            "mtqp://h.example/track/a%2Fb%3Fc%25d%23e@f/%2F+8%2FPz8%2FPz8%2FPz8%2FPz8%2FPw=="
        )
        assert parse_uri(str(uri)) == uri

    def test_ipv6_in_brackets(self):
        uri = MtqpUri("2001:db8::25", "a@b", SECRET, 1040)
        assert str(uri) == f"mtqp://[2001:db8::25]:1040/track/a@b/{SECRET}"
        assert str(MtqpUri("::1", "a@b", SECRET)) == f"mtqp://[::1]/track/a@b/{SECRET}"

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"host": ""},
            {"host": "bad host"},
            {"host": "[::1]"},
            {"host": "::g"},
            {"port": 0},
            {"port": 65536},
            {"port": True},
            {"envid": ""},
            {"envid": "no-at"},
            {"envid": "a b@c"},
            {"secret": "!"},
            {"secret": ""},
        ],
    )
    def test_invalid_values(self, kwargs):
        values = {"host": "h.example", "envid": "a@b", "secret": SECRET, "port": 1038}
        values.update(kwargs)
        with pytest.raises(UriError):
            MtqpUri(**values)


_HOSTS = st.from_regex(r"[a-z0-9][a-z0-9-]{0,8}(?:\.[a-z0-9-]{1,8}){0,3}", fullmatch=True) | (
    st.ip_addresses(v=6).map(str)
)
_ENVID_PART = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


@settings(max_examples=100, deadline=None)
@given(
    _HOSTS,
    st.integers(1, 65535),
    _ENVID_PART,
    _ENVID_PART,
    st.binary(min_size=16, max_size=64),
)
def test_format_parse_round_trip(host, port, local, fqhn, secret):
    # RFC 3887 §9: values with any xtext character survive; '/', '?', '%' are escaped
    envid = xtext.encode(f"{local}@{fqhn}")
    uri = MtqpUri(host, envid, base64.b64encode(secret).decode(), port)
    text = format_uri(uri)
    assert parse_uri(text) == uri
    path = text.split("/track/", 1)[1]
    assert path.count("/") == 1
    assert "?" not in text
    assert all(c.isascii() and c.isprintable() and c != " " for c in text)
