"""Load from Postfix's smtp-source and a pipelining client, relayed by mtrkmta to smtp-sink.

smtp-source (10 sessions, each sending its messages over one connection) does
not pipeline; a raw client pipelines a long series of transactions in one
session (RFC 2920: the final dot and the next MAIL/RCPT/DATA in one write), and
mtrkmta's own client pipelines toward smtp-sink. Every message must reach the
sink exactly once (counted by Message-ID) and nothing may be left in mtrkmta's
queue or tracked as queued.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest_twisted
from interop_lab import (
    Client,
    Lab,
    SmtpSink,
    eventually,
    in_thread,
    program,
    queue_id,
    run,
    running_mtrkmta,
    stuff,
)

from mtrkmta.tracking.interfaces import RecipientState

SOURCE_MESSAGES = 500
SOURCE_SESSIONS = 10
PIPELINED_MESSAGES = 100
SETTLE_TIMEOUT = 180.0


def pipelined_session(port: int, count: int) -> list[str]:
    """``count`` transactions in one session, pipelined; the queue ids, in order."""
    replies: list[str] = []
    with Client(port) as client:
        assert client.reply().code == 220
        assert "PIPELINING" in str(client.command("EHLO pipeliner.example.test"))
        envelope = b"MAIL FROM:<sender@localhost>\r\nRCPT TO:<pipe@sink.test>\r\nDATA\r\n"
        client.send(envelope)
        for number in range(count):
            for expected in (250, 250, 354):
                reply = client.reply()
                assert reply.code == expected, f"message {number}: {reply}"
            content = (
                f"Message-ID: <pipelined-{number}@pipeliner.example.test>\r\n"
                f"Subject: pipelined {number}\r\n\r\nbody {number}\r\n"
            ).encode()
            last = number == count - 1
            client.send(stuff(content) + (b"QUIT\r\n" if last else envelope))
            done = client.reply()
            assert done.code == 250, f"message {number} after the dot: {done}"
            replies.append(str(done))
        assert client.reply().code == 221
    return [queue_id(reply) for reply in replies]


@pytest_twisted.ensureDeferred
async def test_every_message_reaches_the_sink_exactly_once(lab: Lab):
    sink = SmtpSink(lab)
    await in_thread(sink.start)
    async with running_mtrkmta(lab, "to-sink.toml", SINK_PORT=sink.port) as node:
        port = node.port("smtp")
        source = in_thread(
            run,
            [
                program("smtp-source"),
                "-d",  # all of a session's messages over one connection
                "-s",
                str(SOURCE_SESSIONS),
                "-m",
                str(SOURCE_MESSAGES),
                "-l",
                "300",
                "-f",
                "sender@localhost",
                "-t",
                "load@sink.test",
                "-M",
                "source.example.test",
                f"127.0.0.1:{port}",
            ],
            timeout=SETTLE_TIMEOUT,
        )
        pipelined = await in_thread(pipelined_session, port, PIPELINED_MESSAGES)
        await source
        total = SOURCE_MESSAGES + PIPELINED_MESSAGES
        await eventually(lambda: sink.count() >= total, f"{total} messages at the sink", 180)
        assert node.spool is not None and node.tracking is not None
        spool, tracking = node.spool, node.tracking
        await eventually(
            lambda: spool.queue_ids().addCallback(lambda ids: ids == []), "an empty spool"
        )
        assert await tracking.queued_messages(node.config.node_id) == []
        records = [await tracking.message(qid) for qid in pipelined]

    dumps = sink.dumps()
    ids = Counter(value for dump in dumps for value in dump.header("Message-ID"))
    assert len(dumps) == total
    assert sum(ids.values()) == total
    assert [i for i, seen in ids.items() if seen > 1] == []
    pipelined_ids = {i for i in ids if re.fullmatch(r"<pipelined-\d+@pipeliner\.example\.test>", i)}
    assert len(pipelined_ids) == PIPELINED_MESSAGES
    assert Counter(dump.rcpt_args[0].split()[0] for dump in dumps) == {
        "<load@sink.test>": SOURCE_MESSAGES,
        "<pipe@sink.test>": PIPELINED_MESSAGES,
    }
    for record in records:
        assert record is not None
        assert [(r.state, r.status) for r in record.recipients] == [
            (RecipientState.RELAYED, "2.1.9")
        ]
