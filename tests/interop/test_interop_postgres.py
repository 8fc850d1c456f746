"""Several nodes sharing one PostgreSQL tracking store (doc/scaling.rst).

Each node has its own data directory (spool, Maildirs, control socket) and
``node_id``; ``server.database`` is the same URL for all. They start together on
an empty database: each runs the migrations at start-up, serialised by
PostgreSQL's advisory lock, so exactly one creates the tables. Then every node
sees every node's records, and each queue only its own messages.
"""

from __future__ import annotations

import pytest_twisted
from interop_lab import in_thread, send_mail
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from twisted.internet import reactor
from twisted.internet.defer import DeferredList

from mtrkmta.service import MTAService
from mtrkmta.testing import node_config, stop_node
from mtrkmta.tracking.migrate import current_revision, head_revision

NODES = ("mx1", "mx2", "mx3")


def fresh_database(server_url: str, name: str) -> str:
    admin = make_url(server_url)
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return admin.set(database=name).render_as_string(hide_password=False)


@pytest_twisted.ensureDeferred
async def test_nodes_share_one_postgresql_store(postgres_server, tmp_path):
    url = await in_thread(fresh_database, postgres_server.url, "mtrkmta_shared")
    configs = [
        node_config(
            tmp_path / node_id,
            hostname=f"{node_id}.example.test",
            listeners=("smtp",),
            options=(("server.database", url), ("server.node_id", node_id)),
        )
        for node_id in NODES
    ]
    # All start at once on the empty database: the migration lock lets one create it.
    services = [MTAService(config, reactor, deliver=False) for config in configs]
    for service in services:
        service.startService()
    try:
        # (a lock wait cannot hang this: the test server has lock_timeout=60s)
        results = await DeferredList([s.ready for s in services], consumeErrors=True)
        failures = [failure.getTraceback() for ok, failure in results if not ok]
        assert failures == [], failures
        assert await in_thread(current_revision, url) == head_revision()
        queue_ids = {}
        for node in services:
            reply = await in_thread(
                send_mail,
                node.port("smtp"),
                "sender@localhost",
                [("user@localhost", "")],
                b"Subject: shared store\r\n\r\nx\r\n",
                mail_params=f"ENVID={node.config.node_id}-env",
            )
            queue_ids[node.config.node_id] = reply.rsplit(" ", 1)[-1]
        for node in services:
            assert node.tracking is not None
            own = node.config.node_id
            # Each node's queue holds its own message only...
            assert await node.tracking.queued_messages(own) == [queue_ids[own]]
            assert await node.spool.queue_ids() == [queue_ids[own]]
            # ...and every node can read every node's record.
            for other, qid in queue_ids.items():
                record = await node.tracking.message(qid)
                assert record is not None
                assert (record.node_id, record.envid) == (other, f"{other}-env")
                assert record.reporting_mta == f"{other}.example.test"
    finally:
        await DeferredList([stop_node(service) for service in services], consumeErrors=True)
