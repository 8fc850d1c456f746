"""MTQP chaining at a firewall gateway (RFC 3887 §2.4) between in-process nodes on loopback.

A is the gateway: it routes ``chain.example`` by MX to B (``mx-b.example.test``), which
delivers into its Maildir. The client reaches A alone: its ``connect_to`` sends every
connection for B's name to a closed port (the firewall). A finds B's tracking server
through the loopback DNS server's SRV record, as the client would inside, and asks it
with the client's ENVID and secret.
"""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from certs import tls_options
from smtpwire import RefusingPort
from test_tracking_chain import (
    A_NAME,
    B_NAME,
    DOMAIN,
    RCPT,
    REPLY_TIMEOUT,
    Chain,
    chain,
)
from twisted.internet import reactor

from mtrkmta.mtqp.client import TLSMode, Trace, TrackingClient
from mtrkmta.originator import last_record
from mtrkmta.tracking.interfaces import RecipientState

CHAIN = (
    ("mtqp.chain", True),
    ("mtqp.chain_domains", ("example.test",)),
    ("mtqp.chain_timeout", "30s"),
)


async def deliver_through(
    rig: Chain, *a_options: tuple[str, object], b_options: tuple[tuple[str, object], ...] = ()
) -> None:
    """B delivers ``chain.example``; A, with ``a_options``, relays to B by MX; one message
    sent through A and delivered at B."""
    b = await rig.start("b", B_NAME, ("domains.local", (DOMAIN,)), *b_options)
    await rig.start(
        "a",
        A_NAME,
        ("routes", f"{DOMAIN}=mx"),
        ("delivery.smtp_port", b.port("smtp")),
        *a_options,
        resolver=rig.dns.resolver(),
    )
    await rig.send()
    for name, state in (("a", RecipientState.TRANSFERRED), ("b", RecipientState.DELIVERED)):
        await rig.until_state(name, state)


async def track_from_outside(rig: Chain, tls: TLSMode = "none") -> Trace:
    """Follow the message from A, with B behind the firewall (a closed port)."""
    with RefusingPort() as firewalled:

        def connect_to(host: str, port: int | None) -> tuple[str, int] | None:
            return ("127.0.0.1", firewalled.port) if host == B_NAME else None

        client = TrackingClient(
            reactor,
            rig.dns.resolver(),
            tls=tls,
            reply_timeout=REPLY_TIMEOUT,
            connect_to=connect_to,
        )
        record = last_record(rig.secrets)
        return await client.follow(A_NAME, record.envid, record.secret)


@pytest_twisted.ensureDeferred
async def test_gateway_chains_the_inner_hop_for_a_client_outside(tmp_path: Path):
    async with chain(tmp_path) as rig:
        await deliver_through(rig, *CHAIN)
        trace = await track_from_outside(rig)
        (hop,) = trace.hops  # the client asked A only: the chained part covers B
        assert hop.host == A_NAME and hop.error is None
        local, inner = hop.reports
        assert local.reporting_mta.value == A_NAME
        (at_a,) = local.recipients
        assert (at_a.action, str(at_a.remote_mta)) == ("transferred", f"dns; {B_NAME}")
        assert inner.reporting_mta.value == B_NAME
        (at_b,) = inner.recipients
        assert (at_b.action, at_b.status) == ("delivered", "2.1.5")
        assert at_b.original_recipient.value == RCPT
        assert trace.complete
        (path,) = trace.recipients
        assert path.outcome == "delivered" and [s.reporting_mta for s in path.steps] == [
            A_NAME,
            B_NAME,
        ]


@pytest_twisted.ensureDeferred
async def test_without_chaining_the_client_outside_sees_only_transferred(tmp_path: Path):
    # chain_domains alone turn nothing on: chain is false.
    async with chain(tmp_path) as rig:
        await deliver_through(rig, ("mtqp.chain", False), CHAIN[1])
        trace = await track_from_outside(rig)
        first, second = trace.hops
        (local,) = first.reports
        assert local.recipients[0].action == "transferred"
        assert second.host == B_NAME and not second.reports and second.error is not None
        (path,) = trace.recipients
        assert path.outcome == "unknown" and not trace.complete


@pytest_twisted.ensureDeferred
async def test_disguise_hides_the_inner_host_name(tmp_path: Path):
    async with chain(tmp_path) as rig:
        await deliver_through(rig, *CHAIN, ("mtqp.disguise", True))
        trace = await track_from_outside(rig)
        (hop,) = trace.hops
        assert B_NAME.encode() not in hop.entity.lower()
        local, inner = hop.reports
        label = f"hidden-1.{A_NAME}"
        assert str(local.recipients[0].remote_mta) == f"dns; {label}"
        assert inner.reporting_mta.value == label
        assert inner.recipients[0].action == "delivered"
        assert trace.complete


@pytest_twisted.ensureDeferred
async def test_client_used_tls_so_the_secret_never_goes_to_b_in_clear(tmp_path: Path):
    # RFC 3887 §6, §11: the client asked A under TLS; B offers no STARTTLS, so A does not
    # send it the secret: A answers with its own part, B's recipient stays transferred.
    async with chain(tmp_path) as rig:
        await deliver_through(rig, *CHAIN, *tls_options(tmp_path / "tls-a", A_NAME))
        trace = await track_from_outside(rig, tls="may")
        hop = trace.hops[0]
        assert hop.tls and hop.error is None
        (local,) = hop.reports
        assert local.recipients[0].action == "transferred"
        b = rig.node("b").mtqp
        assert b is not None and len(b.tracks) == 0  # B was never sent a TRACK


@pytest_twisted.ensureDeferred
async def test_client_used_tls_so_a_asks_b_under_verified_tls(tmp_path: Path):
    # RFC 3887 §11 (SHOULD): TLS at the same or a better level at the next hop. B answers
    # TRACK only under TLS (mtqp.tls_required); A verifies B's certificate against
    # mtqp.chain_ca_file (here B's self-signed certificate).
    async with chain(tmp_path) as rig:
        b_tls = (*tls_options(tmp_path / "tls-b", B_NAME), ("mtqp.tls_required", True))
        await deliver_through(
            rig,
            *CHAIN,
            *tls_options(tmp_path / "tls-a", A_NAME),
            ("mtqp.chain_ca_file", str(tmp_path / "tls-b" / "cert.pem")),
            b_options=b_tls,
        )
        trace = await track_from_outside(rig, tls="may")
        (hop,) = trace.hops
        assert hop.tls and hop.error is None
        local, inner = hop.reports
        assert local.recipients[0].action == "transferred"
        assert inner.reporting_mta.value == B_NAME
        assert inner.recipients[0].action == "delivered"
