"""A whole node starts in-process, answers on loopback, and stops without leaking."""

from __future__ import annotations

import smtplib

import pytest
import pytest_twisted
from smtpwire import queue_emptied
from sqlalchemy import create_engine, text
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from mtrkmta.service import MTAService
from mtrkmta.testing import node_config, start_node, stop_node


@pytest_twisted.ensureDeferred
async def test_node_accepts_delivers_and_stops(tmp_path):
    node = await start_node(node_config(tmp_path / "data", hostname="mx.example.test"))
    try:
        port = node.port("smtp")

        def talk() -> tuple[int, bytes, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                code, text = smtp.ehlo("client.example")
                assert smtp.mail("a@b.example")[0] == 250
                assert smtp.rcpt("alice@localhost")[0] == 250
                _, reply = smtp.data(b"Subject: x\r\n\r\nhi\r\n")
                return code, text, reply

        code, text, reply = await threads.deferToThread(talk)
        assert code == 250 and text.startswith(b"mx.example.test\n")
        queue_id = reply.split()[-1].decode()
        # The queue delivers it into alice's Maildir, then drops it from the spool.
        for _ in range(250):
            if not await node.spool.queue_ids():
                break
            await deferLater(reactor, 0.02)
        assert await node.spool.queue_ids() == []
        stored = await node.tracking.message(queue_id)
        assert stored.sender == "a@b.example"
        assert [(r.address, r.state.value, r.status, r.action) for r in stored.recipients] == [
            ("alice@localhost", "delivered", "2.1.5", "delivered")
        ]
        (delivered,) = list((tmp_path / "data" / "mail" / "alice" / "new").iterdir())
        assert delivered.read_bytes().endswith(b"\nSubject: x\n\nhi\n")
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


def send_once(port: int) -> str:
    """Send one message to alice@localhost; its queue id (blocking: run it in a thread)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.example")
        smtp.mail("a@b.example")
        smtp.rcpt("alice@localhost")
        return smtp.data(b"Subject: once\r\n\r\nhi\r\n")[1].split()[-1].decode()


@pytest_twisted.ensureDeferred
async def test_a_removal_lost_in_a_crash_brings_back_a_finished_message_that_start_up_removes(
    tmp_path,
):
    # The spool does not fsync a directory after an unlink: a crash may undo the removal
    # of a delivered message. Its tracking record says it is finished, so start-up
    # removes it again and delivers nothing twice.
    config = node_config(tmp_path / "data", hostname="mx.example.test")
    node = await start_node(config, deliver=False)
    try:
        queue_id = await threads.deferToThread(send_once, node.port("smtp"))
        spool_file = node.spool.queue_path(queue_id)
        saved = spool_file.read_bytes()
    finally:
        await stop_node(node)
    maildir = tmp_path / "data" / "mail" / "alice" / "new"
    node = await start_node(config)  # delivers it and removes the spool file
    try:
        for _ in range(250):
            if not spool_file.exists():
                break
            await deferLater(reactor, 0.02)
        assert not spool_file.exists() and len(list(maildir.iterdir())) == 1
    finally:
        await stop_node(node)
    spool_file.write_bytes(saved)  # the unlink did not survive the "crash"
    node = await start_node(config)
    try:
        assert await node.spool.queue_ids() == []
        assert not (config.data_dir / "spool" / "quarantine").exists()
        await deferLater(reactor, 0.2)
        assert len(list(maildir.iterdir())) == 1  # delivered once
        (r,) = (await node.tracking.message(queue_id)).recipients
        assert r.state.value == "delivered"
    finally:
        await stop_node(node)


@pytest.mark.parametrize("moved_to_cur", [False, True], ids=["in-new", "read-into-cur"])
@pytest_twisted.ensureDeferred
async def test_a_delivery_outcome_lost_in_a_crash_does_not_deliver_a_second_copy(
    tmp_path, moved_to_cur
):
    # A crash after the rename into new/ and before the outcome commit: on restart the
    # tracking row still says queued and the spool file is still there, so the queue
    # delivers again. The Maildir name carries the queue id and recipient index: the
    # retry finds the copy (in new/, or in cur/ with the reader's ":2,S" flags) and
    # records "delivered" without writing a second one.
    config = node_config(tmp_path / "data", hostname="mx.example.test")
    node = await start_node(config, deliver=False)
    try:
        queue_id = await threads.deferToThread(send_once, node.port("smtp"))
        spool_file = node.spool.queue_path(queue_id)
        saved_spool = spool_file.read_bytes()
    finally:
        await stop_node(node)
    engine = create_engine(config.database)
    try:
        with engine.connect() as db:
            select = text("SELECT * FROM recipients WHERE queue_id = :q")
            (queued,) = db.execute(select, {"q": queue_id}).mappings().all()
        assert queued["state"] == "queued"
        node = await start_node(config)  # delivers it and removes the spool file
        try:
            await queue_emptied(node)  # real threads deliver: no clock drives them
            assert not spool_file.exists()
        finally:
            await stop_node(node)
        mailbox = tmp_path / "data" / "mail" / "alice"
        (copy,) = list((mailbox / "new").iterdir())
        if moved_to_cur:
            copy = copy.rename(mailbox / "cur" / f"{copy.name}:2,S")
        # The "crash": neither the outcome nor the spool removal reached the disk.
        spool_file.write_bytes(saved_spool)
        with engine.begin() as db:
            columns = [c for c in queued if c not in ("queue_id", "rcpt_index")]
            db.execute(
                text(
                    f"UPDATE recipients SET {', '.join(f'{c} = :{c}' for c in columns)} "
                    "WHERE queue_id = :queue_id AND rcpt_index = :rcpt_index"
                ),
                dict(queued),
            )
    finally:
        engine.dispose()
    node = await start_node(config)
    try:
        await queue_emptied(node)
        assert not spool_file.exists()
        (r,) = (await node.tracking.message(queue_id)).recipients
        assert (r.state.value, r.status) == ("delivered", "2.1.5")
        assert sorted(mailbox.glob("*/*")) == [copy]  # one copy, where the reader left it
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


@pytest_twisted.ensureDeferred
async def test_stop_does_not_wait_for_a_next_hop_that_never_answers(tmp_path):
    # A delivery hanging on a silent next hop is cut short after the grace period; the
    # recipient is recorded as deferred and tried again after the restart.
    import time

    from fakemta import FakeMTA
    from smtpwire import Wire, in_thread, queue_id_of, until

    fake = await FakeMTA(reactor, hostname="silent.example.test").start()
    fake.hang_at = "GREETING"
    config = node_config(
        tmp_path / "data",
        listeners=("smtp",),
        options=(("routes", f"silent.example=smtp:{fake.endpoint};tls=none"),),
    )
    node = MTAService(config, reactor, shutdown_grace=0.5)
    node.startService()
    try:
        await node.ready

        def send() -> str:
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                wire.command("MAIL FROM:<s@localhost>")
                wire.command("RCPT TO:<r@silent.example>")
                return queue_id_of(wire.data(b"Subject: x\r\n\r\ny\r\n"))

        queue_id = await in_thread(send)
        await until(lambda: fake.open_connections, "the delivery attempt to connect")
        started = time.monotonic()
        await stop_node(node)
        assert time.monotonic() - started < 5
        node = await start_node(config, deliver=False)
        (r,) = (await node.tracking.message(queue_id)).recipients
        assert r.state.value == "deferred"
        assert await node.spool.queue_ids() == [queue_id]
    finally:
        await stop_node(node)
        await fake.stop()
