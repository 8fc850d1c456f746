"""The aliases file and what expansion sends on (RFC 3885 §3.3, §4.2;
RFC 3461 §5.2.7; RFC 3886 §4.2)."""

from __future__ import annotations

import pytest

from mtrkmta.envelope import Envelope, MailParams, Mtrk, OriginalRecipient, RcptParams, Recipient
from mtrkmta.queue.expansion import (
    LIST_DIAGNOSTIC,
    LOOP_DIAGNOSTIC,
    new_envelopes,
    outcome_for,
    remaining_mtrk,
)
from mtrkmta.routing.aliases import (
    AliasBook,
    AliasError,
    Deliver,
    Divert,
    Expand,
    Loop,
    Redistribute,
)
from mtrkmta.tracking.interfaces import RecipientState

LOCAL = frozenset({"example.org"})
BOOK = AliasBook.parse(
    """
[alias.info]
to = ["alice", "bob@example.net"]
primary = "alice"

[alias.sales]
to = "carol@example.net"

[alias.chain]
to = "sales"

[alias.secret]
to = ["hidden@elsewhere.example"]
confidential = true

[alias.postmaster]
to = "root"
final = true

[alias.self]
to = ["self", "x@example.net"]

[alias.ping]
to = "pong"

[alias.pong]
to = ["ping", "y@example.net"]

[list.team]
members = ["alice", "dave@example.com"]
owner = "team-owner@example.org"
"""
)


def resolve(address: str):
    return BOOK.resolve(address, local_domains=LOCAL, delimiter="+")


def test_plain_user_and_foreign_domain_are_delivered_as_they_are():
    assert resolve("alice@example.org") == Deliver("alice@example.org")
    assert resolve("info@example.net") == Deliver("info@example.net")  # not a local domain


def test_single_target_alias_rewrites_and_follows_chains():
    # RFC 3885 §3.3, RFC 3461 §5.2.7.2: a single-target alias is an ordinary hop (the address
    # changes).
    assert resolve("sales@example.org") == Deliver("carol@example.net")
    assert resolve("Chain+tag@EXAMPLE.org") == Deliver("carol@example.net")


def test_multi_target_alias_expands_with_a_primary():
    # RFC 3885 §3.3, RFC 3461 §5.2.7.3
    result = resolve("info@example.org")
    assert isinstance(result, Expand)
    assert result.targets == ("alice@example.org", "bob@example.net")
    assert result.primary == "alice@example.org"


def test_list_confidential_and_role_aliases():
    # RFC 3885 §3.3, §4.2; RFC 3461 §5.2.7.1(b); RFC 3886 §4.2
    assert isinstance(resolve("team@example.org"), Redistribute)
    assert resolve("team@example.org").members == ("alice@example.org", "dave@example.com")
    assert isinstance(resolve("secret@example.org"), Divert)
    assert isinstance(resolve("postmaster@example.org"), Divert)


def test_bare_postmaster_is_the_primary_local_domains():
    # RFC 5321 §4.5.1: <postmaster> (no domain) is delivered locally: to the postmaster
    # alias of the primary local domain, whose bare targets resolve in that domain.
    primary = dict(local_domains=LOCAL, delimiter="+", default_domain="example.org")
    divert = BOOK.resolve("postmaster", **primary)
    assert isinstance(divert, Divert) and divert.targets == ("root@example.org",)
    bare = AliasBook.parse('[alias.postmaster]\nto = "root"\n')
    assert bare.resolve("PostMaster", **primary) == Deliver("root@example.org")
    assert AliasBook({}, {}).resolve("postmaster", **primary) == Deliver("postmaster@example.org")


def test_loops_are_detected():
    # An alias that expands into itself, directly or through another: 5.4.6.
    assert resolve("self@example.org") == Loop("self@example.org")
    assert resolve("ping@example.org") == Loop("ping@example.org")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[alias.a]\nto = []", "non-empty list"),
        ("[alias.a]\nfoo = 1", "expected keys"),
        ('[alias.a]\nto = ["b", "c"]\nprimary = "d"', "not one of the targets"),
        ('[alias.a]\nto = "b"\nconfidential = "yes"', "true or false"),
        ('[list.l]\nmembers = ["a"]', "members and owner"),
        ('[other.x]\nto = "a"', "unknown table"),
        ("[alias.a\n", "aliases file"),
        ('[alias.a]\nto = "b"\n[list.a]\nmembers = ["c"]\nowner = "o"', "both an alias"),
        ('[alias.a]\nto = "b c"', "expected an address"),
    ],
)
def test_bad_aliases_files_are_refused_with_the_entry_named(text, problem):
    with pytest.raises(AliasError, match=problem):
        AliasBook.parse(text)


CERTIFIER = bytes(20)
ORIGINAL = Envelope(
    queue_id="q1",
    sender="s@origin.example",
    recipients=(
        Recipient(
            "info@example.org",
            RcptParams(
                notify=frozenset({"SUCCESS", "FAILURE"}),
                orcpt=OriginalRecipient("rfc822", "info@example.org"),
            ),
        ),
    ),
    params=MailParams(envid="e@origin.example", ret="HDRS", mtrk=Mtrk(CERTIFIER, 3600)),
    arrival=1000.0,
)


def expand(resolution, now=1100.0):
    ids = iter(f"n{i}" for i in range(10))
    return new_envelopes(
        ORIGINAL,
        0,
        resolution,
        now=now,
        new_queue_id=lambda: next(ids),
        hostname="mx.example.org",
        default_retention=9 * 86400,
    )


def test_multi_target_certifier_goes_to_the_primary_only():
    # RFC 3885 §3.3 (MUST): never the certifier to more than one target; option (c) of
    # 3461 §5.2.7.3: ENVID/RET/ORCPT to all, NOTIFY without SUCCESS.
    primary, others = expand(resolve("info@example.org"))
    assert [r.address for r in primary.recipients] == ["alice@example.org"]
    assert primary.params.mtrk == Mtrk(CERTIFIER, 3500)  # timeout decremented (RFC 3885 §3.1)
    assert [r.address for r in others.recipients] == ["bob@example.net"]
    assert others.params.mtrk is None
    for message in (primary, others):
        assert message.sender == "s@origin.example"
        assert (message.params.envid, message.params.ret) == ("e@origin.example", "HDRS")
        (rcpt,) = message.recipients
        assert rcpt.params.notify == frozenset({"FAILURE"})
        assert rcpt.params.orcpt == OriginalRecipient("rfc822", "info@example.org")


def test_alias_targets_get_envid_and_orcpt_as_received():
    # RFC 3885 §3.3: on aliasing, ENVID= and ORCPT= "MUST NOT be modified"; RFC 3461
    # §5.2.1(a)/(d): the same esmtp-value, so the received xtext goes on, not a re-encoding.
    orcpt = OriginalRecipient("rfc822", "xAt@dsn.test", "x+41t@dsn.test")
    original = Envelope(
        queue_id="q1",
        sender="s@origin.example",
        recipients=(Recipient("info@example.org", RcptParams(orcpt=orcpt)),),
        params=MailParams(envid="abAcd+ef-x", envid_xtext="ab+41cd+2Bef-x", ret="HDRS"),
        arrival=1000.0,
    )
    ids = iter(f"n{i}" for i in range(10))
    messages = new_envelopes(
        original,
        0,
        resolve("info@example.org"),
        now=1100.0,
        new_queue_id=lambda: next(ids),
        hostname="mx.example.org",
        default_retention=9 * 86400,
    )
    assert len(messages) == 2
    for message in messages:
        assert message.params.envid_xtext == "ab+41cd+2Bef-x"
        assert message.recipients[0].params.orcpt == orcpt
    (copy,) = expand(resolve("team@example.org"))
    assert copy.params.envid_xtext is None  # a list starts a new message (RFC 3885 §3.3)


def test_list_copies_carry_nothing_of_the_original():
    # RFC 3885 §3.3, RFC 3461 §5.2.7.1(b) (MUST): no MTRK, ENVID, NOTIFY, RET or ORCPT; sender
    # is the owner.
    (copy,) = expand(resolve("team@example.org"))
    assert copy.sender == "team-owner@example.org"
    assert (copy.params.mtrk, copy.params.envid, copy.params.ret) == (None, None, None)
    assert all(r.params == RcptParams() for r in copy.recipients)


def test_confidential_copies_are_untracked_and_ask_for_no_dsn():
    # RFC 3886 §4.2 option (b), RFC 3464 §4.2: resent without MTRK and without DSN requests.
    (copy,) = expand(resolve("secret@example.org"))
    assert copy.params.mtrk is None and copy.params.envid is None
    assert copy.recipients[0].params.notify == frozenset({"NEVER"})


def test_expired_timeout_drops_the_certifier():
    # RFC 3885 §3.1 (MUST): remaining <= 0 -> no MTRK.
    assert remaining_mtrk(ORIGINAL, 1000.0 + 3600, 9 * 86400) is None
    assert remaining_mtrk(ORIGINAL, 1000.0 + 3599.5, 9 * 86400) == Mtrk(CERTIFIER, 1)


def test_outcomes_of_the_expanded_recipient():
    # Tracking: expanded for aliases and lists (3886 §4.2), delivered when diverted,
    # failed 5.4.6 for a loop; list members are never recorded (RFC 3886 §4.2).
    assert outcome_for(0, resolve("info@example.org")).state is RecipientState.EXPANDED
    listed = outcome_for(0, resolve("team@example.org"))
    assert (listed.state, listed.diagnostic) == (RecipientState.EXPANDED, LIST_DIAGNOSTIC)
    assert "alice" not in (listed.diagnostic or "")
    assert outcome_for(0, resolve("secret@example.org")).state is RecipientState.DELIVERED
    looped = outcome_for(0, resolve("self@example.org"))
    assert (looped.state, looped.status, looped.diagnostic) == (
        RecipientState.FAILED,
        "5.4.6",
        LOOP_DIAGNOSTIC,
    )


def test_the_expansion_event_names_an_alias_targets_and_nothing_else():
    # The expanded recipient's event lists the addresses a plain alias produced; a
    # list's members and a confidential alias's targets stay unrecorded (RFC 3886 §4.2).
    info = resolve("info@example.org")
    assert isinstance(info, Expand)
    assert outcome_for(0, info).produced == info.targets == ("alice@example.org", "bob@example.net")
    for hidden in ("team@example.org", "secret@example.org", "self@example.org"):
        assert outcome_for(0, resolve(hidden)).produced == ()
