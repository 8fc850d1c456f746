"""RCPT decisions of the receiver: relay policy, domainless recipients, known route failures."""

from __future__ import annotations

from ipaddress import ip_network

from twisted.internet.task import Clock

from mtrkmta.delivery.interfaces import NextHop, RouteFailure
from mtrkmta.envelope import MailParams, RcptParams
from mtrkmta.receive.acceptor import Acceptor
from mtrkmta.receive.policy import RelayPolicy, route_refusal
from mtrkmta.receive.receiver import Receiver
from mtrkmta.smtp.reply import Reply
from mtrkmta.smtp.server import Session
from mtrkmta.spool.memory import MemorySpool
from mtrkmta.tracking.interfaces import RecipientState
from mtrkmta.tracking.memory import MemoryTrackingStore

SESSION = Session(address="192.0.2.7", port=40000, listener="smtp")


def receiver(check_route=None) -> Receiver:
    clock = Clock()
    acceptor = Acceptor(  # RCPT checks touch neither store
        spool=MemorySpool(),
        tracking=MemoryTrackingStore(clock),
        new_queue_id=lambda: "Q1",
        reporting_mta="mx.example.test",
        node_id="n1",
        clock=clock,
    )
    return Receiver(
        acceptor=acceptor,
        policy=RelayPolicy.build(["x.test"], ["other.test"]),
        min_free_space=0,
        clock=clock,
        check_route=check_route,
    )


def test_route_failures_known_at_rcpt_become_refusals():
    def failure(status: str, reason: str) -> RouteFailure:
        return RouteFailure(RecipientState.FAILED, status, reason)

    assert route_refusal("a@b", failure("5.1.3", "no domain to route")) == Reply(
        553, "5.1.3", ("<a@b>: Recipient address rejected: no domain to route",)
    )
    assert route_refusal("a@b", failure("5.1.10", "b takes none")).code == 556  # RFC 7504 §3
    assert route_refusal("a@b", failure("5.1.2", "NXDOMAIN")).code == 550
    assert route_refusal("a@b", failure("5.4.6", "loops")).code == 550
    # Temporary trouble, a next hop, or nothing known yet: accepted.
    assert route_refusal("a@b", RouteFailure(RecipientState.DEFERRED, "4.4.3", "x")) is None
    assert route_refusal("a@b", NextHop("maildir", "maildir")) is None
    assert route_refusal("a@b", None) is None


def test_only_postmaster_goes_without_a_domain():
    # RFC 5321 §4.1.1.3; the check is the receiver's, whatever parsed the address.
    refused = receiver().check_recipient(SESSION, "alice", RcptParams(), MailParams())
    assert refused is not None and (refused.code, refused.enhanced) == (553, "5.1.3")
    assert receiver().check_recipient(SESSION, "PostMaster", RcptParams(), MailParams()) is None


def test_the_route_check_comes_after_the_relay_policy():
    asked: list[str] = []

    def check_route(address: str) -> Reply | None:
        asked.append(address)
        return Reply(550, "5.4.6", ("loop",)) if address.startswith("self") else None

    checks = receiver(check_route)
    assert (
        checks.check_recipient(SESSION, "a@elsewhere.example", RcptParams(), MailParams()).code
        == 554
    )
    assert checks.check_recipient(SESSION, "self@x.test", RcptParams(), MailParams()).code == 550
    assert checks.check_recipient(SESSION, "bob@other.test", RcptParams(), MailParams()) is None
    assert asked == ["self@x.test", "bob@other.test"]  # never for what is not ours to take


def test_the_binary_check_is_for_binarymime_from_clients_that_did_not_authenticate():
    asked: list[str] = []

    def check_binary(address: str) -> Reply | None:
        asked.append(address)
        return Reply(550, "5.6.3", ("binary",))

    checks = receiver()
    checks.check_binary = check_binary
    binary = MailParams(body="BINARYMIME")
    assert checks.check_recipient(SESSION, "bob@other.test", RcptParams(), binary).code == 550
    assert checks.check_recipient(SESSION, "bob@other.test", RcptParams(), MailParams()) is None
    user = Session(address="192.0.2.7", port=40000, listener="submission", authenticated_as="u")
    assert checks.check_recipient(user, "bob@other.test", RcptParams(), binary) is None
    checks.policy = RelayPolicy.build(["x.test"], ["other.test"], [ip_network("192.0.2.0/24")])
    assert checks.check_recipient(SESSION, "bob@other.test", RcptParams(), binary) is None
    assert asked == ["bob@other.test"]  # asked for neither a user nor relay.trusted_networks
