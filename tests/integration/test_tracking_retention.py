"""Retention of tracking data: runtime cap, purge timer, per-client quota (RFC 3885 §3.1, §4.1)."""

from __future__ import annotations

import base64
import io

import pytest_twisted
from smtpwire import Wire, in_thread, queue_id_of
from twisted.internet.task import Clock

from mtrkmta.cli.tracking import main as tracking_main
from mtrkmta.envelope import ClientInfo
from mtrkmta.receive.acceptor import TrackedRate
from mtrkmta.testing import node_config, start_node, stop_node

DAY = 86400
CERTIFIER = base64.b64encode(bytes(20)).decode()


def send_tracked(port: int, envid: str, timeout: int = 20 * DAY) -> str:
    with Wire(port) as wire:
        wire.ehlo()
        assert (
            wire.command(f"MAIL FROM:<s@localhost> MTRK={CERTIFIER}:{timeout} ENVID={envid}").code
            == 250
        )
        assert wire.command("RCPT TO:<hold@hold.example>").code == 250
        queue_id = queue_id_of(wire.data(b"Subject: t\r\n\r\nx\r\n"))
        wire.command("QUIT")
    return queue_id


def run_tracking(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = tracking_main(args, out, err)
    return code, out.getvalue(), err.getvalue()


@pytest_twisted.ensureDeferred
async def test_set_max_retention_lowers_existing_records_of_a_running_server(tmp_path):
    data_dir = tmp_path / "data"
    node = await start_node(
        node_config(
            data_dir,
            listeners=("smtp",),
            options=(("routes", "hold.example=smtp:tcp:host=127.0.0.1:port=9"),),
        ),
        deliver=False,
    )
    try:
        queue_id = await in_thread(send_tracked, node.port("smtp"), "r1@origin.example")
        code, out, err = await in_thread(
            run_tracking, ["--data-dir", str(data_dir), "set-max-retention", "2d"]
        )
        assert (code, err) == (0, "")
        assert "1 record(s) now expire earlier" in out
        message = await node.tracking.message(queue_id)
        assert message.expires_at == message.arrival + 2 * DAY
        code, _, err = await in_thread(
            run_tracking, ["--data-dir", str(data_dir), "set-max-retention", "12h"]
        )
        assert code == 1 and "at least one day" in err
        code, _, err = await in_thread(
            run_tracking, ["--data-dir", str(data_dir), "set-max-retention", "9x"]
        )
        assert code == 2 and "duration" in err
    finally:
        await stop_node(node)


@pytest_twisted.ensureDeferred
async def test_purge_keeps_queued_messages(tmp_path):
    # RFC 3885 §3.1 (MUST): never drop tracking data while the message is still queued.
    node = await start_node(
        node_config(
            tmp_path / "data",
            listeners=("smtp",),
            options=(("routes", "hold.example=smtp:tcp:host=127.0.0.1:port=9"),),
        ),
        deliver=False,
    )
    try:
        queue_id = await in_thread(send_tracked, node.port("smtp"), "r2@origin.example", 1)
        await node._purge_tracking()
        assert await node.tracking.message(queue_id) is not None
    finally:
        await stop_node(node)


@pytest_twisted.ensureDeferred
async def test_tracked_message_quota_per_client_drops_mtrk_but_accepts(tmp_path):
    # project decision, doc/conformance.rst 3885-P8 (RFC 3885 §4.1): over the quota the mail is
    # accepted without tracking data.
    node = await start_node(
        node_config(
            tmp_path / "data",
            listeners=("smtp",),
            options=(
                ("routes", "hold.example=smtp:tcp:host=127.0.0.1:port=9"),
                ("tracking.max_tracked_per_hour", 2),
            ),
        ),
        deliver=False,
    )
    try:
        ids = [
            await in_thread(send_tracked, node.port("smtp"), f"q{n}@origin.example")
            for n in range(3)
        ]
        tracked = [(await node.tracking.message(q)).tracked for q in ids]
        assert tracked == [True, True, False]
    finally:
        await stop_node(node)


def test_tracked_rate_window_slides():
    clock = Clock()
    rate = TrackedRate(2, clock)
    alice = ClientInfo(address="192.0.2.1", authenticated_as="alice")
    other = ClientInfo(address="192.0.2.1")
    assert rate.allow(alice) and rate.allow(alice)
    assert not rate.allow(alice)
    assert rate.allow(other)  # per authenticated user, else per address
    clock.advance(3600)
    assert rate.allow(alice)
    assert TrackedRate(0, clock).allow(alice)  # 0: no limit
