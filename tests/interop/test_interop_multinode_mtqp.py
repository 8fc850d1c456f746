"""Two nodes behind one MX name, sharing one PostgreSQL tracking store (RFC 3887 §2.1).

A tracked message accepted by node 1 and still queued there (its next hop is down)
is answered by node 2's MTQP server, since both read the same store; a wrong secret
gets the same ``-ERR/noinfo`` as an unknown message. Queues stay per node: node 2
holds and attempts nothing of node 1's.
"""

from __future__ import annotations

import socket

import pytest_twisted
from interop_lab import final_record, in_thread, queue_id, send_mail
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater

from mtrkmta.mtqp.protocol import Response, ResponseReader
from mtrkmta.originator import mail_options, new_tracking
from mtrkmta.testing import node_config, start_node, stop_node
from mtrkmta.tracking.interfaces import RecipientState
from mtrkmta.tracking.status import parse_related

RCPT = "someone@hold.example"
ROUTE = "hold.example=smtp:tcp:host=127.0.0.1:port=9"  # nothing listens: stays queued
TIMEOUT = 15.0


def fresh_database(server_url: str, name: str) -> str:
    admin = make_url(server_url)
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return admin.set(database=name).render_as_string(hide_password=False)


def mtqp(port: int, *commands: str) -> list[Response]:
    """Blocking: the greeting, then the response to each command (QUIT is sent last)."""
    reader = ResponseReader()
    buffer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:

        def response() -> Response:
            nonlocal buffer
            while True:
                while b"\r\n" not in buffer:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise AssertionError(f"closed; unparsed {buffer!r}")
                    buffer += chunk
                line, _, buffer = buffer.partition(b"\r\n")
                parsed = reader.feed(line)
                if parsed is not None:
                    return parsed

        answers = [response()]
        for command in (*commands, "QUIT"):
            sock.sendall(command.encode() + b"\r\n")
            answers.append(response())
        return answers


@pytest_twisted.ensureDeferred
async def test_node_2_answers_track_for_node_1s_queued_message(postgres_server, tmp_path):
    url = await in_thread(fresh_database, postgres_server.url, "mtrkmta_mtqp_shared")
    nodes = []
    try:
        for node_id in ("mx1", "mx2"):
            config = node_config(
                tmp_path / node_id,
                hostname=f"{node_id}.example.test",
                listeners=("smtp", "mtqp"),
                options=(
                    ("server.database", url),
                    ("server.node_id", node_id),
                    ("durability.fsync", False),
                    ("routes", ROUTE),
                ),
            )
            nodes.append(await start_node(config))
        node1, node2 = nodes

        tracking = new_tracking("client.example.test")
        reply = await in_thread(
            send_mail,
            node1.port("smtp"),
            "sender@localhost",
            [(RCPT, "")],
            b"From: sender@localhost\r\nSubject: held\r\n\r\nStill queued.\r\n",
            mail_params=" ".join(mail_options(tracking)),
        )
        qid = queue_id(reply)
        record = await final_record(node1, qid, TIMEOUT)
        (held,) = record.recipients
        assert (held.state, held.action) == (RecipientState.DEFERRED, "delayed")
        assert record.node_id == "mx1"
        assert await node1.spool.queue_ids() == [qid]

        wrong = new_tracking("client.example.test").secret_text
        greeting, right, bad, bye = await in_thread(
            mtqp,
            node2.port("mtqp"),
            f"TRACK {tracking.envid} {tracking.secret_text}",
            f"TRACK {tracking.envid} {wrong}",
        )
        assert greeting.status_line() == b"+OK/MTQP mx2.example.test MTQP server ready"
        assert right.indicator == "+OK+"
        assert bad.status_line() == b"-ERR/noinfo No tracking information"
        assert bye.indicator == "+OK"
        (report,) = parse_related(right.body)
        assert report.original_envelope_id == tracking.envid
        assert str(report.reporting_mta) == "dns; mx1.example.test"  # node 1's record
        (status,) = report.recipients
        assert str(status.final_recipient) == f"rfc822; {RCPT}"
        assert status.action == "delayed"
        assert status.status.startswith("4.")

        # Queue ownership: node 2 has nothing queued and a flush attempts nothing.
        assert node2.queue is not None and node2.tracking is not None
        assert await node2.tracking.queued_messages("mx2") == []
        assert await node2.tracking.queued_messages("mx1") == [qid]
        assert await node2.queue.flush() == 0
        await deferLater(reactor, 1.0, lambda: None)  # time for any attempt it might start
        assert await node2.spool.queue_ids() == []
        after = await node2.tracking.message(qid)
        assert after is not None and after.node_id == "mx1"
        (same,) = after.recipients
        assert (same.state, same.attempts, same.last_attempt) == (
            RecipientState.DEFERRED,
            held.attempts,
            held.last_attempt,
        )
        assert await node1.spool.queue_ids() == [qid]
    finally:
        await DeferredList([stop_node(node) for node in nodes], consumeErrors=True)
