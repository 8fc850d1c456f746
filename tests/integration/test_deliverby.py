"""DELIVERBY end to end (RFC 2852 §4.1.3, §4.1.4): a node relaying toward a next hop that
is down until after the deliver-by-time, and BY= relayed to a second mtrkmta node.

The queue runs on the real reactor clock (a whole node), so the by-times are a few
seconds; each test waits on the spool or the sender's Maildir, not on a sleep.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest_twisted
from fakemta import ALL_EXTENSIONS
from smtpwire import in_thread, queue_emptied, until
from test_dsn_end_to_end import SENDER, delivery_status, dsns, send
from test_relay_end_to_end import relaying

from mtrkmta.dsn.render import format_date
from mtrkmta.envelope import DeliverBy
from mtrkmta.queue.service import QueueEvent
from mtrkmta.testing import node_config, start_node, stop_node
from mtrkmta.tracking.interfaces import RecipientState
from mtrkmta.tracking.status import DELIVER_BY_FIELD, report_from_store

RCPT = "bob@relay.example"
DOWN = "421 4.3.2 fake.example.test down, try again later"
BY_HOP = (*ALL_EXTENSIONS, "DELIVERBY")


@pytest_twisted.ensureDeferred
async def test_r_mode_fails_with_5_4_7_at_the_deadline_while_the_hop_is_down(tmp_path):
    # RFC 2852 §4.1.3: by-mode R not relayed by deliver-by-time: no further attempt, a
    # "failed" DSN with 5.4.7. The next retry would be an hour away: the queue acts AT
    # the deadline.
    async with relaying(tmp_path, extensions=BY_HOP, options=(("queue.first_retry", "1h"),)) as rig:
        node, fake = rig.node, rig.fake
        assert node is not None
        fake.greeting = DOWN
        started = time.monotonic()
        queue_id = await in_thread(send, node.port("smtp"), SENDER, [(RCPT, "")], "BY=2;R")
        await queue_emptied(node)
        assert time.monotonic() - started < 60
        (rcpt,) = (await node.tracking.message(queue_id)).recipients
        assert (rcpt.state, rcpt.status) == (RecipientState.FAILED, "5.4.7")
        assert len(fake.sessions) == 1  # the first attempt; none at the deadline
        (dsn,) = dsns(tmp_path)
        per_message, block = delivery_status(dsn)
        assert (block["action"], block["status"]) == ("failed", "5.4.7")
        stored = await node.tracking.message(queue_id)
        assert stored.deliver_by is not None and stored.deliver_by - stored.arrival in (2, 3)
        # RFC 2852 §5: the DSN carries the Deliver-By-Date.
        assert per_message["deliver-by-date"] == format_date(stored.deliver_by)


@pytest_twisted.ensureDeferred
async def test_n_mode_notifies_at_the_deadline_and_delivers_when_the_hop_is_up(tmp_path):
    # RFC 2852 §4.1.3: by-mode N: a "delayed" DSN with 4.4.7 at the deadline, then the
    # queue goes on; the hop, up again, gets the message with a by-time now negative
    # (RFC 2852 §4.1.4).
    options = (("queue.first_retry", "1s"), ("queue.max_retry_interval", "2s"))
    async with relaying(tmp_path, extensions=BY_HOP, options=options) as rig:
        node, fake = rig.node, rig.fake
        fake.greeting = DOWN
        assert node.queue is not None

        def up_after_the_notice(event: QueueEvent) -> None:
            if any(u.status == "4.4.7" for u in event.updates):
                fake.greeting = "220 fake.example.test ESMTP fake"

        node.queue.observers.append(up_after_the_notice)
        queue_id = await in_thread(send, node.port("smtp"), SENDER, [(RCPT, "")], "BY=2;N")
        await queue_emptied(node)
        (rcpt,) = (await node.tracking.message(queue_id)).recipients
        assert rcpt.state is RecipientState.RELAYED
        (dsn,) = dsns(tmp_path)
        _, block = delivery_status(dsn)
        assert (block["action"], block["status"]) == ("delayed", "4.4.7")
        (delivered,) = [t for t in fake.transactions if t.content is not None]
        (by,) = [p for p in delivered.mail_params if p.startswith("BY=")]
        assert by.endswith(";N") and int(by[3:-2]) <= 0


@pytest_twisted.ensureDeferred
async def test_r_mode_is_not_relayed_to_a_hop_without_deliverby(tmp_path):
    # RFC 2852 §4.1.4.1: MUST NOT be relayed there; undeliverable for permanent reasons.
    async with relaying(tmp_path) as rig:
        node, fake = rig.node, rig.fake
        assert node is not None
        queue_id = await in_thread(send, node.port("smtp"), SENDER, [(RCPT, "")], "BY=600;R")
        await queue_emptied(node)
        (rcpt,) = (await node.tracking.message(queue_id)).recipients
        assert (rcpt.state, rcpt.status) == (RecipientState.FAILED, "5.3.3")
        assert [t for t in fake.transactions if t.content is not None] == []
        (dsn,) = dsns(tmp_path)
        assert delivery_status(dsn)[1]["action"] == "failed"


@pytest_twisted.ensureDeferred
async def test_n_mode_to_a_hop_without_deliverby_owes_a_relayed_dsn(tmp_path):
    # RFC 2852 §4.1.4.2: the relaying client MUST issue a "relayed" DSN (NOTIFY absent),
    # and asks a DSN hop for NOTIFY=FAILURE,DELAY.
    async with relaying(tmp_path) as rig:
        node, fake = rig.node, rig.fake
        assert node is not None
        await in_thread(send, node.port("smtp"), SENDER, [(RCPT, "")], "BY=600;N")
        await queue_emptied(node)
        (delivered,) = [t for t in fake.transactions if t.content is not None]
        assert not any(p.startswith("BY=") for p in delivered.mail_params)
        assert "NOTIFY=FAILURE,DELAY" in delivered.rcpt_params[0]
        (dsn,) = dsns(tmp_path)
        assert delivery_status(dsn)[1]["action"] == "relayed"


@pytest_twisted.ensureDeferred
async def test_by_goes_to_a_second_node_with_the_time_remaining(tmp_path):
    # RFC 2852 §4.1.4: a new BY parameter with the seconds remaining; the second node's
    # deliver-by-time is (within a second) the first node's. T: a relayed DSN (§4.1.4).
    second = await start_node(
        node_config(
            tmp_path / "second",
            hostname="mx2.example.test",
            listeners=("smtp",),
            options=(("domains.local", ("relay.example",)), ("durability.fsync", False)),
        ),
        deliver=False,
    )
    first: Any = None
    hop = f"tcp:host=127.0.0.1:port={second.port('smtp')}"
    try:
        first = await start_node(
            node_config(
                tmp_path / "data",
                listeners=("smtp",),
                options=(
                    ("routes", f"relay.example=smtp:{hop};tls=none"),
                    ("durability.fsync", False),
                ),
            )
        )
        queue_id = await in_thread(
            send, first.port("smtp"), SENDER, [(RCPT, "")], "BY=600;RT ENVID=e1@origin.example"
        )
        await queue_emptied(first)
        assert second.spool is not None
        (relayed_id,) = await until(second.spool.queue_ids, "the message at the second node")
        relayed, _ = await second.spool.load(relayed_id)
        assert relayed.params.deliver_by is not None
        assert relayed.params.deliver_by.mode == "R" and relayed.params.deliver_by.trace
        assert 595 <= relayed.params.deliver_by.seconds <= 600
        stored = await first.tracking.message(queue_id)
        first_deadline = stored.arrival + 600
        second_deadline = relayed.arrival + relayed.params.deliver_by.seconds
        assert abs(second_deadline - first_deadline) <= 2
        # The second node's tracking record and report show its deliver-by-time.
        assert second.tracking is not None
        record = await second.tracking.message(relayed_id)
        assert record is not None and record.deliver_by == math.ceil(second_deadline)
        (block,) = report_from_store(record, now=time.time()).recipients
        assert (DELIVER_BY_FIELD, format_date(record.deliver_by)) in block.extensions
        (dsn,) = dsns(tmp_path)
        assert delivery_status(dsn)[1]["action"] == "relayed"
        assert isinstance(relayed.params.deliver_by, DeliverBy)
    finally:
        if first is not None:
            await stop_node(first)
        await stop_node(second)
