"""MTA-STS without I/O (RFC 8461): TXT record, policy file, MX matching, cache, decisions."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from mtrkmta.config import CAFile
from mtrkmta.delivery.interfaces import NextHop, RouteFailure, Server
from mtrkmta.routing.mtasts import (
    MAX_AGE_LIMIT,
    MAX_POLICY_SIZE,
    Policy,
    PolicyCache,
    PolicyError,
    apply_policy,
    dump_cache,
    load_cache,
    mx_matches,
    next_step,
    parse_policy,
    txt_id,
)
from mtrkmta.tracking.interfaces import RecipientState

GOOD = (
    b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
    b"max_age: 86400\r\n"
)


# -- the TXT record (RFC 8461 §3.1) -------------------------------------------------------


def test_txt_id_of_a_valid_record():
    assert txt_id(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert txt_id(["v=STSv1;id=abc"]) == "abc"
    assert txt_id(["v=STSv1 ;  id=abc ; ext=value-1;"]) == "abc"


def test_records_not_starting_with_v_stsv1_are_discarded():
    assert txt_id([]) is None
    assert txt_id(["v=spf1 -all", "hello"]) is None
    assert txt_id(["v=spf1 -all", "v=STSv1; id=x1"]) == "x1"
    assert txt_id(["v=STSv10; id=x1"]) is None


@pytest.mark.parametrize(
    ("records", "problem"),
    [
        (["v=STSv1; id=a", "v=STSv1; id=b"], "2 TXT records start with v=STSv1"),
        (["v=STSv1; other=1"], "has no id"),
        (["v=STSv1; id=" + "a" * 33], "is not 1 to 32 letters or digits"),
        (["v=STSv1; id=a-b"], "is not 1 to 32 letters or digits"),
        (["v=STSv1; id"], "is not name=value"),
        (["v=STSv1; id=a b"], "is not name=value"),
    ],
)
def test_invalid_txt_records_are_refused(records, problem):
    with pytest.raises(PolicyError, match=problem):
        txt_id(records)


@given(st.lists(st.text(max_size=80), max_size=3))
def test_any_txt_records_give_an_id_none_or_policy_error(records):
    try:
        found = txt_id(records)
    except PolicyError:
        return
    assert found is None or (1 <= len(found) <= 32 and found.isalnum() and found.isascii())


# -- the policy file (RFC 8461 §3.2) ------------------------------------------------------


def test_a_valid_policy():
    policy = parse_policy(GOOD)
    assert policy == Policy("enforce", 86400, ("mail.example.com", "*.example.net"))


def test_lf_line_ends_unknown_fields_and_first_occurrence():
    body = (
        b"version: STSv1\nmode: testing\nmode: enforce\nfuture_field: 1\n"
        b"mx: MX.Example.COM.\nmax_age: 60"
    )
    assert parse_policy(body) == Policy("testing", 60, ("mx.example.com",))


def test_mode_none_needs_no_mx():
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 0\n") == Policy("none", 0, ())


def test_max_age_is_capped():
    body = b"version: STSv1\nmode: none\nmax_age: 9999999999\n"
    assert parse_policy(body).max_age == MAX_AGE_LIMIT


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"mode: enforce\nmx: a.example\nmax_age: 1\n", "version is None"),
        (b"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "version is 'STSv2'"),
        (b"version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", "mode is 'strict'"),
        (b"version: STSv1\nmode: enforce\nmx: a.example\n", "max_age is None"),
        (b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", "max_age is '-1'"),
        (b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n", "max_age"),
        (b"version: STSv1\nmode: enforce\nmax_age: 1\n", "mode enforce has no mx"),
        (b"version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n", "policy mx"),
        (b"version: STSv1\nmode: enforce\nmx: a*.example\nmax_age: 1\n", "policy mx"),
        (b"version: STSv1\nmode: enforce\nmx: example\nmax_age: 1\n", "policy mx"),
        (b"version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 1\n", "policy mx"),
        (b"version: STSv1\nmode enforce\n", "line 2 is not 'name: value'"),
        (b"version: STSv1\n: x\n", "line 2 is not 'name: value'"),
        (b"version: STSv1\nmode: enforce\x00\n", "control character"),
        (b"<html><body>Not found</body></html>", "line 1 is not 'name: value'"),
        ("version: STSv1\nmode: enforcé\n".encode(), "not ASCII"),
        (b"version: STSv1\n" + b"x: y\n" * (MAX_POLICY_SIZE // 5), "larger than"),
    ],
)
def test_invalid_policies_are_refused(body, problem):
    with pytest.raises(PolicyError, match=problem):
        parse_policy(body)


@given(st.binary(max_size=400))
def test_any_bytes_parse_or_raise_policy_error(body):
    try:
        policy = parse_policy(body)
    except PolicyError:
        return
    assert policy.mode in ("enforce", "testing", "none")
    assert 0 <= policy.max_age <= MAX_AGE_LIMIT


# -- MX matching (RFC 8461 §4.1) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.example.com.", True),
        ("mail.example.com", "mail2.example.com", False),
        ("*.example.com", "mail.example.com", True),
        ("*.example.com", "example.com", False),  # the wildcard is one label, not none
        ("*.example.com", "a.b.example.com", False),  # nor two
        ("*.example.com", ".example.com", False),
        ("*.example.com", "mail.example.org", False),
    ],
)
def test_mx_patterns(pattern, host, matches):
    assert mx_matches(pattern, host) is matches


_labels = st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True)


@given(label=_labels, base=st.lists(_labels, min_size=1, max_size=4), extra=_labels)
def test_wildcard_is_exactly_one_leftmost_label(label, base, extra):
    domain = ".".join(base)
    assert mx_matches(f"*.{domain}", f"{label}.{domain}")
    assert not mx_matches(f"*.{domain}", domain)
    assert not mx_matches(f"*.{domain}", f"{extra}.{label}.{domain}")


# -- the cache and the steps (RFC 8461 §5.1) ----------------------------------------------


def test_cache_keeps_a_policy_for_its_max_age():
    clock = Clock()
    cache = PolicyCache(clock, 10)
    cache.put("example.com", "id1", Policy("enforce", 100, ("mx.example.com",)))
    clock.advance(99)
    cached = cache.get("example.com")
    assert cached is not None and cached.id == "id1"
    clock.advance(1)
    assert cache.get("example.com") is None
    assert len(cache) == 0


def test_cache_drops_the_least_recently_used_domain():
    clock = Clock()
    cache = PolicyCache(clock, 2)
    policy = Policy("testing", 1000, ("mx.example.com",))
    cache.put("a.example", "1", policy)
    cache.put("b.example", "1", policy)
    assert cache.get("a.example") is not None  # a is now the most recent
    cache.put("c.example", "1", policy)
    assert cache.get("b.example") is None
    assert cache.get("a.example") is not None and cache.get("c.example") is not None


def test_cache_needs_room():
    with pytest.raises(ValueError, match="at least 1 domain"):
        PolicyCache(Clock(), 0)


def test_next_step():
    clock = Clock()
    cache = PolicyCache(clock, 10)
    cached = cache.put("example.com", "id1", Policy("enforce", 100, ("mx.example.com",)))
    assert next_step(None, None) == "none"
    assert next_step("id1", None) == "fetch"
    assert next_step("id1", cached) == "use-cached"
    assert next_step("id2", cached) == "fetch"  # the id changed: fetch anew
    assert next_step(None, cached) == "use-cached"  # TXT gone: the cached policy holds (§5.1)


# -- applying a policy (RFC 8461 §5) ------------------------------------------------------

HOP = NextHop(
    transport="smtp",
    destination="mx:example.com",
    servers=(
        Server("mx1.example.com", "tcp:host=192.0.2.1:port=25"),
        Server("backup.example.org", "tcp:host=192.0.2.2:port=25"),
    ),
    tls="may",
)
CA = CAFile(Path("ca.pem"), b"-----BEGIN CERTIFICATE-----")


def test_enforce_keeps_matching_mx_hosts_and_verifies_tls():
    applied = apply_policy("example.com", HOP, Policy("enforce", 60, ("*.example.com",)), CA)
    assert isinstance(applied.result, NextHop)
    assert applied.result.servers == HOP.servers[:1]
    assert (applied.result.tls, applied.result.ca) == ("verify", CA)
    assert applied.note == "MTA-STS policy of example.com excludes MX backup.example.org"


def test_enforce_with_no_matching_mx_defers_4_7_0():
    applied = apply_policy("example.com", HOP, Policy("enforce", 60, ("mail.example.net",)), None)
    assert applied.result == RouteFailure(
        RecipientState.DEFERRED,
        "4.7.0",
        "no MX host of example.com is in its MTA-STS policy "
        "(MX backup.example.org, mx1.example.com; the policy allows mail.example.net)",
    )


def test_a_long_policy_is_named_in_part_in_the_diagnostic():
    # A policy may list thousands of patterns (64 KiB): the reason that becomes the
    # diagnostic, the tracking record and a log line names five and counts the rest.
    many = tuple(f"mx{n}.example.net" for n in range(2000))
    applied = apply_policy("example.com", HOP, Policy("enforce", 60, many), None)
    assert isinstance(applied.result, RouteFailure)
    assert applied.result.reason.endswith(
        "the policy allows mx0.example.net, mx1.example.net, mx2.example.net, "
        "mx3.example.net, mx4.example.net and 1995 more)"
    )
    assert len(applied.result.reason) < 300


def test_testing_changes_nothing_but_notes_the_mismatch():
    applied = apply_policy("example.com", HOP, Policy("testing", 60, ("mx1.example.com",)), CA)
    assert applied.result is HOP
    assert applied.note == (
        "MTA-STS policy of example.com (mode testing) does not allow MX backup.example.org "
        "(it allows mx1.example.com); delivering as without a policy"
    )
    matching = Policy("testing", 60, ("mx1.example.com", "backup.example.org"))
    assert apply_policy("example.com", HOP, matching, CA).note is None


def test_no_policy_mode_none_and_failures_pass_unchanged():
    failure = RouteFailure(RecipientState.FAILED, "5.1.2", "no such domain")
    assert apply_policy("example.com", HOP, None, CA).result is HOP
    assert apply_policy("example.com", HOP, Policy("none", 60, ()), CA).result is HOP
    enforce = Policy("enforce", 60, ("x.example",))
    assert apply_policy("example.com", failure, enforce, CA).result is failure


# -- the cache file ---------------------------------------------------------------------------


def test_cache_file_round_trip_keeps_unexpired_entries():
    clock = Clock()
    clock.advance(1000)
    cache = PolicyCache(clock, 10)
    cache.put("a.example", "id1", Policy("enforce", 100, ("mx.a.example", "*.b.example")))
    cache.put("gone.example", "id2", Policy("testing", 5, ("mx.gone.example",)))
    clock.advance(10)
    data = dump_cache(list(cache.items()))
    restored = PolicyCache(clock, 10)
    for domain, entry in load_cache(data):
        restored.restore(domain, entry)
    assert [domain for domain, _ in restored.items()] == ["a.example"]
    assert restored.get("a.example") == cache.get("a.example")


def test_restore_keeps_what_was_fetched_since():
    clock = Clock()
    cache = PolicyCache(clock, 10)
    fresh = cache.put("a.example", "new", Policy("none", 100, ()))
    from_file = Policy("enforce", 100, ("mx.a.example",))
    cache.restore("a.example", load_cache(dump_cache([("a.example", fresh)]))[0][1])
    assert cache.get("a.example") == fresh
    cache.restore("b.example", PolicyCache(clock, 1).put("b.example", "old", from_file))
    assert cache.get("b.example") is not None


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"{", "not JSON"),
        (b"\xff", "not JSON"),
        (b"[]", "not an mtrkmta-mta-sts-1 document"),
        (b'{"format": "mtrkmta-mta-sts-1"}', "'policies' is not a list"),
        (b'{"format": "mtrkmta-mta-sts-1", "policies": [{}]}', "an entry lacks"),
        (
            b'{"format": "mtrkmta-mta-sts-1", "policies": [{"domain": "a.example", "id": "x!",'
            b' "expires": 1, "mode": "enforce", "max_age": 1, "mx": ["mx.a.example"]}]}',
            "entry id",
        ),
        (
            b'{"format": "mtrkmta-mta-sts-1", "policies": [{"domain": "a.example", "id": "x",'
            b' "expires": 1, "mode": "enforce\\nmx: evil.example", "max_age": 1, "mx": []}]}',
            "line break",
        ),
        (
            b'{"format": "mtrkmta-mta-sts-1", "policies": [{"domain": "a.example", "id": "x",'
            b' "expires": 1, "mode": "strict", "max_age": 1, "mx": ["mx.a.example"]}]}',
            "mode is 'strict'",
        ),
    ],
)
def test_a_broken_cache_file_is_refused(data, problem):
    with pytest.raises(PolicyError, match=problem):
        load_cache(data)
