"""Aliases, lists and forwarding in a whole node: what went downstream and what tracking says
(RFC 3885 §3.3, §4.2; RFC 3461 §5.2.7; RFC 3886 §4.2)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest_twisted
from fakemta import FakeMTA
from smtpwire import Wire, in_thread, queue_emptied, queue_id_of
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher

from mtrkmta.queue.control import RELOAD_ALIASES, SOCKET_NAME, request
from mtrkmta.testing import node_config, start_node, stop_node

ALIASES = """
[alias.info]
to = ["alice", "bob@relay.example"]
primary = "alice"

[alias.sales]
to = "carol@relay.example"

[alias.secret]
to = "hidden@relay.example"
confidential = true

[alias.self]
to = ["self", "x@relay.example"]

[list.team]
members = ["alice", "dave@relay.example"]
owner = "team-owner@localhost"
"""
CERTIFIER = base64.b64encode(bytes(range(20))).decode()
MTRK = f"MTRK={CERTIFIER}:3600 ENVID=e1@origin.example"
CONTENT = b"Subject: aliases\r\n\r\nHello.\r\n"


@asynccontextmanager
async def aliased_node(tmp_path: Path, users: tuple[str, ...] = ()) -> AsyncIterator[tuple]:
    aliases = tmp_path / "aliases.toml"
    aliases.write_text(ALIASES)
    fake = await FakeMTA(reactor).start()
    options: list[tuple[str, object]] = [
        ("routes", f"relay.example=smtp:{fake.endpoint};tls=none"),
        ("local.aliases", str(aliases)),
        ("durability.fsync", False),
    ]
    if users:
        options.append(("local.users", users))
    node = await start_node(
        node_config(tmp_path / "data", listeners=("smtp",), options=tuple(options))
    )
    try:
        yield node, fake
    finally:
        try:
            await stop_node(node)
        finally:
            await fake.stop()


def send(port: int, rcpt: str, mail_params: str = MTRK, rcpt_params: str = "") -> str:
    with Wire(port) as wire:
        assert wire.ehlo().code == 250
        assert wire.command(f"MAIL FROM:<s@localhost> {mail_params}").code == 250
        reply = wire.command(f"RCPT TO:<{rcpt}> {rcpt_params}".rstrip())
        assert reply.code == 250, str(reply)
        queue_id = queue_id_of(wire.data(CONTENT))
        wire.command("QUIT")
    return queue_id


def received(fake: FakeMTA) -> dict[str, object]:
    """Recipient -> the transaction that carried it to the fake."""
    return {r: t for t in fake.transactions if t.content is not None for r in t.recipients}


def params(transaction: object) -> set[str]:
    return {p.split("=", 1)[0].upper() for p in transaction.mail_params}


@pytest_twisted.ensureDeferred
async def test_single_target_alias_is_an_ordinary_hop(tmp_path):
    # RFC 3885 §3.3, RFC 3461 §5.2.7.2: MTRK/ENVID/ORCPT kept, timeout decremented, the address
    # rewritten.
    async with aliased_node(tmp_path) as (node, fake):
        queue_id = await in_thread(send, node.port("smtp"), "sales@localhost")
        await queue_emptied(node)
        carol = received(fake)["carol@relay.example"]
        assert {"MTRK", "ENVID"} <= params(carol)
        assert any(p.startswith("ORCPT=rfc822;sales@localhost") for p in carol.rcpt_params[0])
        (r,) = (await node.tracking.message(queue_id)).recipients
        assert (r.address, r.final_recipient, r.state.value) == (
            "sales@localhost",
            "carol@relay.example",
            "transferred",
        )


@pytest_twisted.ensureDeferred
async def test_multi_target_alias_gives_the_certifier_to_the_primary_only(tmp_path):
    # RFC 3885 §3.3, RFC 3461 §5.2.7.3: expanded; the non-primary target gets no MTRK.
    async with aliased_node(tmp_path) as (node, fake):
        queue_id = await in_thread(send, node.port("smtp"), "info@localhost")
        await queue_emptied(node)
        bob = received(fake)["bob@relay.example"]
        assert "MTRK" not in params(bob)
        assert "ENVID" in params(bob)  # option (c): ENVID/RET/ORCPT go on
        (r,) = (await node.tracking.message(queue_id)).recipients
        assert (r.state.value, r.status) == ("expanded", "2.1.5")
        assert len(list((tmp_path / "data" / "mail" / "alice" / "new").iterdir())) == 1


@pytest_twisted.ensureDeferred
async def test_aliases_send_envid_and_orcpt_on_as_received(tmp_path):
    # RFC 3885 §3.3: on aliasing the ENVID= and ORCPT= values "MUST NOT be modified";
    # RFC 3461 §5.2.1(a)/(d): the same esmtp-value, so "+31" is not re-encoded as "1".
    mail_params = f"MTRK={CERTIFIER}:3600 ENVID=e+31@origin.example"
    async with aliased_node(tmp_path) as (node, fake):
        port = node.port("smtp")
        await in_thread(send, port, "sales@localhost", mail_params, "ORCPT=rfc822;s+61les@x")
        await in_thread(send, port, "info@localhost", mail_params, "ORCPT=rfc822;+69nfo@x")
        await queue_emptied(node)
        carol = received(fake)["carol@relay.example"]  # single target: an ordinary hop
        bob = received(fake)["bob@relay.example"]  # multi-target, not the primary
        for transaction, orcpt in (
            (carol, "ORCPT=rfc822;s+61les@x"),
            (bob, "ORCPT=rfc822;+69nfo@x"),
        ):
            assert "ENVID=e+31@origin.example" in transaction.mail_params
            assert orcpt in transaction.rcpt_params[0]


@pytest_twisted.ensureDeferred
async def test_list_expansion_sends_nothing_of_the_original(tmp_path):
    # RFC 3885 §3.3, RFC 3461 §5.2.7.1(b), RFC 3886 §4.2: owner as sender, no
    # MTRK/ENVID/NOTIFY/RET/ORCPT; members
    # never appear in the tracking record.
    async with aliased_node(tmp_path) as (node, fake):
        queue_id = await in_thread(
            send, node.port("smtp"), "team@localhost", MTRK + " RET=FULL", "NOTIFY=SUCCESS"
        )
        await queue_emptied(node)
        dave = received(fake)["dave@relay.example"]
        assert dave.sender == "team-owner@localhost"
        assert params(dave) & {"MTRK", "ENVID", "RET"} == set()
        # No NOTIFY, and no ORCPT from the original (one naming the member itself is fine).
        (dave_params,) = [
            ps for r, ps in zip(dave.recipients, dave.rcpt_params, strict=True) if "dave" in r
        ]
        assert all(not p.startswith("NOTIFY") for p in dave_params)
        assert all("team" not in p for p in dave_params)
        message = await node.tracking.message(queue_id)
        (r,) = message.recipients
        assert r.state.value == "expanded"
        assert "alice" not in repr(message) and "dave" not in repr(message)
        # The sender asked for SUCCESS: a list exploder reports "delivered" (RFC 3461 §5.2.7.1).
        (dsn_file,) = list((tmp_path / "data" / "mail" / "s" / "new").iterdir())
        assert b"Action: delivered" in dsn_file.read_bytes()


@pytest_twisted.ensureDeferred
async def test_confidential_forwarding_stops_tracking_and_hides_the_target(tmp_path):
    # RFC 3886 §4.2 option (b), RFC 3464 §4.2.
    async with aliased_node(tmp_path) as (node, fake):
        queue_id = await in_thread(send, node.port("smtp"), "secret@localhost")
        await queue_emptied(node)
        hidden = received(fake)["hidden@relay.example"]
        assert "MTRK" not in params(hidden) and "ENVID" not in params(hidden)
        message = await node.tracking.message(queue_id)
        (r,) = message.recipients
        assert (r.state.value, r.final_recipient) == ("delivered", "secret@localhost")
        assert "hidden" not in repr(message)


@pytest_twisted.ensureDeferred
async def test_alias_loop_is_refused_at_rcpt_with_5_4_6(tmp_path):
    # Known at RCPT: refused there rather than accepted and bounced (a loop made after
    # acceptance still fails 5.4.6 in the queue: test_receive_addresses.py).
    async with aliased_node(tmp_path) as (node, fake):

        def talk() -> str:
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                wire.command("MAIL FROM:<s@localhost>")
                return str(wire.command("RCPT TO:<self@localhost>"))

        assert await in_thread(talk) == (
            "550 5.4.6 <self@localhost>: Recipient address rejected: "
            "mail loop: the alias expands into itself"
        )
        assert received(fake) == {}


@pytest_twisted.ensureDeferred
async def test_unknown_local_users_are_refused_at_rcpt_when_users_are_listed(tmp_path):
    async with aliased_node(tmp_path, users=("alice",)) as (node, _):

        def talk() -> list[str]:
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                wire.command("MAIL FROM:<s@localhost>")
                replies = [
                    str(wire.command(f"RCPT TO:<{rcpt}>"))
                    for rcpt in ("nobody@localhost", "alice+x@localhost", "info@localhost")
                ]
                wire.command("QUIT")
                return replies

        nobody, alice, info = await in_thread(talk)
        assert nobody.startswith("550 5.1.1")
        assert alice.startswith("250") and info.startswith("250")


@pytest_twisted.ensureDeferred
async def test_aliases_file_is_reloaded_when_it_changes(tmp_path):
    async with aliased_node(tmp_path) as (node, fake):
        (tmp_path / "aliases.toml").write_text('[alias.sales]\nto = "erin@relay.example"\n')
        await node.aliases.refresh()
        await in_thread(send, node.port("smtp"), "sales@localhost", "")
        await queue_emptied(node)
        assert "erin@relay.example" in received(fake)


@pytest_twisted.ensureDeferred
async def test_reload_reads_the_aliases_again_and_keeps_them_when_the_file_breaks(tmp_path):
    async with aliased_node(tmp_path) as (node, fake):
        aliases = tmp_path / "aliases.toml"
        aliases.write_text('[alias.sales]\nto = "erin@relay.example"\n')
        assert await node.reload() is True
        assert node.aliases.book.aliases.keys() == {"sales"}
        aliases.write_text('[alias.sales]\nto = "nobody@relay.example"\n[alias.broken\n')
        assert await node.reload() is False  # logged; the aliases read before stay
        await in_thread(send, node.port("smtp"), "sales@localhost", "")
        await queue_emptied(node)
        assert "erin@relay.example" in received(fake)


@pytest_twisted.ensureDeferred
async def test_newaliases_asks_the_node_for_the_same_reload_as_sighup(tmp_path):
    async with aliased_node(tmp_path) as (node, _):
        reloaded: Deferred[str] = Deferred()

        def watch(event: dict) -> None:
            text = formatEvent(event)
            if text.startswith("reloaded: ") and not reloaded.called:
                reloaded.callback(text)

        globalLogPublisher.addObserver(watch)
        try:
            (tmp_path / "aliases.toml").write_text('[alias.sales]\nto = "erin@relay.example"\n')
            await in_thread(request, node.config.data_dir / SOCKET_NAME, RELOAD_ALIASES)
            line = await reloaded.addTimeout(10, reactor)
        finally:
            globalLogPublisher.removeObserver(watch)
        assert f"aliases file {tmp_path / 'aliases.toml'}" in line
        assert node.aliases.book.aliases.keys() == {"sales"}
