"""BY= toward a real loopback next hop (RFC 2852 §4.1.4, §4.1.4.1)."""

from __future__ import annotations

from dataclasses import replace

import pytest_twisted
from fakemta import ALL_EXTENSIONS
from test_smtp_transport import attempt, envelope, hop, server, states, world  # noqa: F401

from mtrkmta.envelope import DeliverBy
from mtrkmta.tracking.interfaces import RecipientState as S


def with_by(by: DeliverBy):
    env = envelope()
    return replace(env, params=replace(env.params, deliver_by=by))


@pytest_twisted.ensureDeferred
async def test_by_goes_on_with_the_seconds_left_to_a_deliverby_hop(world):  # noqa: F811
    fake = await world.fake(extensions=(*ALL_EXTENSIONS, "DELIVERBY 60"))
    (outcome,) = await world.smtp().deliver(
        attempt(hop(server(fake)), with_by(DeliverBy(600, "R", True)))
    )
    assert outcome.state == S.TRANSFERRED
    # 100.9 s after arrival: 100 whole seconds spent here, 500 left (RFC 2852 §4.1.4)
    assert "BY=500;RT" in fake.transactions[0].mail_params


@pytest_twisted.ensureDeferred
async def test_an_r_message_is_not_relayed_to_a_hop_without_deliverby(world):  # noqa: F811
    fake = await world.fake()  # no DELIVERBY
    (outcome,) = await world.smtp().deliver(
        attempt(hop(server(fake)), with_by(DeliverBy(600, "R")))
    )
    assert states([outcome]) == [(S.FAILED, "5.3.3")]  # RFC 2852 §4.1.4.1
    assert not fake.transactions
    n_fake = await world.fake()
    (n_outcome,) = await world.smtp().deliver(
        attempt(hop(server(n_fake)), with_by(DeliverBy(600, "N")))
    )
    assert n_outcome.state == S.TRANSFERRED  # N goes anywhere (§4.1.4.2), without BY=
    assert not any(p.startswith("BY=") for p in n_fake.transactions[0].mail_params)


@pytest_twisted.ensureDeferred
async def test_an_r_message_is_delivered_over_lmtp_which_is_no_relay(world):  # noqa: F811
    """RFC 2852 §4.1.4.1 forbids relaying R to a server without DELIVERBY; LMTP delivers."""
    fake = await world.fake(lmtp=True, extensions=("8BITMIME", "ENHANCEDSTATUSCODES"))
    the_hop = hop(server(fake), transport="lmtp")
    (outcome,) = await world.lmtp().deliver(attempt(the_hop, with_by(DeliverBy(600, "R"))))
    assert outcome.state != S.FAILED and fake.transactions
