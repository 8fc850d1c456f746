"""RCPT checks beyond relaying (RecipientChecks over LocalAddresses): unknown local users,
alias loops, routes known to fail, local parts that can have no mailbox."""

from __future__ import annotations

from mtrkmta.delivery.interfaces import NextHop, RouteFailure
from mtrkmta.receive.recipients import RecipientChecks
from mtrkmta.routing.aliases import AliasBook
from mtrkmta.routing.local import LocalAddresses
from mtrkmta.tracking.interfaces import RecipientState

BOOK = AliasBook.parse(
    """
[alias.sales]
to = ["alice", "bob"]

[alias.loop]
to = ["loop", "x@example.net"]

[alias.info]
to = "nobody@gone.example"
"""
)
MAILDIR = NextHop(transport="maildir", destination="maildir", servers=())


def checks(*, users=("alice", "bob")) -> RecipientChecks:
    def known_route(domain: str) -> NextHop | RouteFailure | None:
        if domain == "example.org":
            return MAILDIR
        if domain == "gone.example":
            return RouteFailure(RecipientState.FAILED, "5.1.2", "NXDOMAIN")
        return None  # unknown without DNS: accepted

    return RecipientChecks(
        addresses=LocalAddresses(local_domains=("example.org",), delimiter="+", book=lambda: BOOK),
        users=users,
        known_route=known_route,
        mailbox_problem=lambda a: "local part too long" if a.startswith("long") else None,
    )


def test_unknown_local_users_are_refused_aliases_and_postmaster_are_not():
    c = checks()
    assert c.check_local("alice+tag@example.org") is None
    assert c.check_local("sales@example.org") is None  # an alias
    assert c.check_local("postmaster@example.org") is None  # RFC 5321 §4.5.1
    assert c.check_local("someone@elsewhere.example") is None  # not local
    refusal = c.check_local("mallory@example.org")
    assert (refusal.code, refusal.enhanced) == (550, "5.1.1")


def test_recipients_known_to_fail_are_refused_at_rcpt():
    c = checks()
    loop = c.check_route("loop@example.org")
    assert (loop.code, loop.enhanced) == (550, "5.4.6")
    gone = c.check_route("info@example.org")  # a single-target alias to a dead domain
    assert (gone.code, gone.enhanced) == (550, "5.1.2")
    long = c.check_route("longname@example.org")
    assert (long.code, long.enhanced) == (553, "5.1.3")
    assert c.check_route("alice@example.org") is None
    assert c.check_route("sales@example.org") is None  # the targets are the admin's
    assert c.check_route("x@unknown.example") is None


def test_a_binary_message_goes_only_where_a_maildir_takes_it():
    # RFC 3030 §3: a next hop without BINARYMIME fails it 5.6.3 after acceptance, with a
    # DSN to a sender who may be forged; only local Maildir delivery is known to take it.
    c = checks()
    assert c.check_binary("alice@example.org") is None
    for address in ("sales@example.org", "someone@elsewhere.example", "info@example.org"):
        refusal = c.check_binary(address)  # an alias, a relay, a dead route
        assert refusal is not None and (refusal.code, refusal.enhanced) == (550, "5.6.3")
        assert "8BITMIME" in refusal.lines[0]
