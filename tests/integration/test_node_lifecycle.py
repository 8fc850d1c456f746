"""A whole node starts in-process, answers on loopback, and stops without leaking."""

from __future__ import annotations

import smtplib

import pytest
import pytest_twisted
from twisted.internet import threads

from mtrkmta.testing import node_config, start_node, stop_node


@pytest_twisted.ensureDeferred
async def test_node_greets_accepts_and_stops(tmp_path):
    node = await start_node(node_config(tmp_path / "data", hostname="mx.example.test"))
    try:
        port = node.port("smtp")

        def talk() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                code, text = smtp.ehlo("client.example")
                errors = smtp.sendmail(
                    "a@b.example", ["alice@localhost"], b"Subject: x\r\n\r\nhi\r\n"
                )
                assert errors == {}
                return code, text

        code, text = await threads.deferToThread(talk)
        assert code == 250 and text.startswith(b"mx.example.test\n")
        on_disk = await node.spool.queue_ids()
        assert len(on_disk) == 1
        stored = await node.tracking.message(on_disk[0])
        assert stored.sender == "a@b.example"
        assert [r.address for r in stored.recipients] == ["alice@localhost"]
    finally:
        await stop_node(node)


@pytest_twisted.ensureDeferred
async def test_restart_quarantines_unacknowledged_spool_files(tmp_path):
    # A spool file without a tracking record was never acknowledged: start-up moves it
    # out of the queue, into spool/quarantine/ for the administrator.
    config = node_config(tmp_path / "data")
    node = await start_node(config)
    try:
        from mtrkmta.envelope import Envelope, Recipient

        orphan = Envelope(
            queue_id="orphan0000000000001", sender="", recipients=(Recipient("x@localhost"),)
        )
        await node.spool.store(orphan, b"Subject: orphan\r\n\r\n")
        assert "orphan0000000000001" in await node.spool.queue_ids()
    finally:
        await stop_node(node)
    node = await start_node(config)
    try:
        assert await node.spool.queue_ids() == []
        assert (config.data_dir / "spool" / "quarantine" / "orphan0000000000001").is_file()
    finally:
        await stop_node(node)


@pytest.mark.parametrize("listener", ["smtp", "lmtp"])
@pytest_twisted.ensureDeferred
async def test_listeners_bind_ephemeral_ports(tmp_path, listener):
    node = await start_node(node_config(tmp_path / "data", listeners=(listener,)))
    try:
        assert node.port(listener) > 0
        assert list(node.ports) == [listener]
    finally:
        await stop_node(node)
