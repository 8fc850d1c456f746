"""What a client names, end to end in a node: refused at the command when it cannot be
delivered (RFC 5321 §4.5.3.1, RFC 6531), never accepted and then bounced (no relaying
through bounces), and never able to forge a log line or share another's mailbox.

Each node has the local domain ``x.test`` and a route for ``other.test`` to a FakeMTA
that captures whatever the node sends there (a bounce, say).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest_twisted
from dnsserver import Zone, a, null_mx, serve_dns
from fakemta import FakeMTA
from smtpwire import Wire, WireReply, in_thread, queue_emptied, queue_id_of
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from mtrkmta.logfile import text_observer
from mtrkmta.service import MTAService
from mtrkmta.testing import node_config, start_node, stop_node


@asynccontextmanager
async def node_and_capture(
    tmp_path: Path, options: Sequence[tuple[str, object]] = (), resolver: Any = None
) -> AsyncIterator[tuple[MTAService, FakeMTA]]:
    fake = await FakeMTA(reactor).start()
    node = await start_node(
        node_config(
            tmp_path / "data",
            listeners=("smtp",),
            options=(
                ("domains.local", ("x.test",)),
                ("routes", f"other.test=smtp:{fake.endpoint};tls=none"),
                ("durability.fsync", False),
                *options,
            ),
        ),
        resolver=resolver,
    )
    try:
        yield node, fake
    finally:
        try:
            await stop_node(node)
        finally:
            await fake.stop()


def mailbox(tmp_path: Path, name: str) -> list[bytes]:
    folder = tmp_path / "data" / "mail" / name / "new"
    return [path.read_bytes() for path in sorted(folder.iterdir())] if folder.is_dir() else []


def mailboxes(tmp_path: Path) -> list[str]:
    root = tmp_path / "data" / "mail"
    return sorted(p.parent.relative_to(root).as_posix() for p in root.glob("**/new"))


def converse(port: int, *lines: str | bytes) -> list[WireReply]:
    """Blocking: EHLO, then each line, one reply each; QUIT."""
    with Wire(port) as wire:
        assert wire.ehlo().code == 250
        replies = [wire.command(line) for line in lines]
        wire.command("QUIT")
    return replies


def send(
    port: int, sender: str, recipients: Sequence[str], content: bytes, params: str = ""
) -> str:
    with Wire(port) as wire:
        assert wire.ehlo().code == 250
        assert wire.command(f"MAIL FROM:<{sender}> {params}".rstrip()).code == 250
        for rcpt in recipients:
            reply = wire.command(f"RCPT TO:<{rcpt}>")
            assert reply.code == 250, str(reply)
        queue_id = queue_id_of(wire.data(content))
        wire.command("QUIT")
    return queue_id


# -- 6: no relaying through bounces ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bare_postmaster_is_delivered_locally_and_nothing_bounces_to_the_sender(tmp_path):
    # RFC 5321 §4.5.1: <postmaster> without a domain is ours to deliver. It used to fail
    # "5.1.3 x-local; no domain to route" after the 250, and the bounce carried the whole
    # 370 KB message (RET=FULL) to the forged sender at other.test: a relay.
    body = b"".join(b"line %06d of a message for a third party\r\n" % i for i in range(8500))
    assert len(body) > 370_000
    content = b"From: victim@other.test\r\nSubject: relay me\r\n\r\n" + body
    async with node_and_capture(tmp_path) as (node, fake):
        queue_id = await in_thread(
            send, node.port("smtp"), "victim@other.test", ["postmaster"], content, "RET=FULL"
        )
        await queue_emptied(node)
        (delivered,) = mailbox(tmp_path, "postmaster")
        assert delivered.endswith(body.replace(b"\r\n", b"\n"))
        assert b"Delivered-To: <postmaster@x.test>" in delivered
        assert fake.transactions == []  # no message at all went to other.test
        (rcpt,) = (await node.tracking.message(queue_id)).recipients
        assert (rcpt.address, rcpt.state.value, rcpt.status) == ("postmaster", "delivered", "2.1.5")
        assert rcpt.final_recipient == "postmaster@x.test"


@pytest_twisted.ensureDeferred
async def test_bare_postmaster_follows_the_postmaster_alias_of_the_primary_domain(tmp_path):
    # The first of domains.local is the primary one; the alias's bare target is in it too.
    aliases = tmp_path / "aliases.toml"
    aliases.write_text('[alias.postmaster]\nto = "root"\n')
    options = (("domains.local", ("x.test", "y.test")), ("local.aliases", str(aliases)))
    async with node_and_capture(tmp_path, options) as (node, fake):
        await in_thread(send, node.port("smtp"), "victim@other.test", ["postmaster"], b"Hi.\r\n")
        await queue_emptied(node)
        (delivered,) = mailbox(tmp_path, "root")
        assert b"Delivered-To: <root@x.test>" in delivered
        assert fake.transactions == []


@pytest_twisted.ensureDeferred
async def test_what_cannot_be_routed_is_refused_at_rcpt(tmp_path):
    # Every recipient the queue would fail for a reason known now is refused at RCPT,
    # never accepted and then bounced: an address literal that is no IP address (the
    # router's 5.1.3), an alias that expands into itself (5.4.6), a <postmaster> with
    # no local domain to be delivered in.
    aliases = tmp_path / "aliases.toml"
    aliases.write_text('[alias.self]\nto = ["self", "x@other.test"]\n')
    options = (("relay.trusted_networks", ("127.0.0.0/8",)), ("local.aliases", str(aliases)))
    async with node_and_capture(tmp_path, options) as (node, _):
        replies = await in_thread(
            converse,
            node.port("smtp"),
            "MAIL FROM:<victim@other.test>",
            "RCPT TO:<a@[x-tag:foo]>",
            "RCPT TO:<self@x.test>",
            "RCPT TO:<alice@x.test>",
            "RCPT TO:<bob@[127.0.0.1]>",
        )
        assert [str(r) for r in replies] == [
            "250 2.1.0 Ok",
            "553 5.1.3 <a@[x-tag:foo]>: Recipient address rejected: "
            "[x-tag:foo] is not a valid address literal",
            "550 5.4.6 <self@x.test>: Recipient address rejected: "
            "mail loop: the alias expands into itself",
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
        ]
    async with node_and_capture(tmp_path / "none", (("domains.local", ()),)) as (node, _):
        (_, postmaster) = await in_thread(
            converse, node.port("smtp"), "MAIL FROM:<victim@other.test>", "RCPT TO:<postmaster>"
        )
        assert postmaster.line == (
            "553 5.1.3 <postmaster>: Recipient address rejected: no domain to route"
        )


@pytest_twisted.ensureDeferred
async def test_a_domain_known_to_take_no_mail_is_refused_at_rcpt(tmp_path):
    # RFC 7505: the first message to a null MX domain is accepted (nothing is known
    # yet; the queue fails it 5.1.10). While the answer is cached, the router knows,
    # and RCPT is refused (556, RFC 7504 §3): no second bounce.
    zones = [Zone("nomail.test", {"nomail.test": [null_mx(ttl=600), a("127.0.0.1")]})]
    async with serve_dns(reactor, zones) as dns_server:
        options = (("routes", "nomail.test=mx"),)
        async with node_and_capture(tmp_path, options, dns_server.resolver()) as (node, _):
            port = node.port("smtp")
            queue_id = await in_thread(send, port, "s@x.test", ["erin@nomail.test"], b"Hi.\r\n")
            await queue_emptied(node)
            (rcpt,) = (await node.tracking.message(queue_id)).recipients
            assert (rcpt.state.value, rcpt.status) == ("failed", "5.1.10")
            (_, again) = await in_thread(
                converse, port, "MAIL FROM:<s@x.test>", "RCPT TO:<erin@nomail.test>"
            )
            assert again.line == (
                "556 5.1.10 <erin@nomail.test>: Recipient address rejected: "
                "nomail.test does not accept mail (null MX, RFC 7505)"
            )


@pytest_twisted.ensureDeferred
async def test_an_alias_loop_is_refused_at_rcpt_and_failed_if_made_later(tmp_path):
    # RCPT judges by the aliases of the moment: a loop is refused (it used to be
    # accepted and bounced, 5.4.6). If the aliases change between RCPT and delivery,
    # the queue fails the recipient 5.4.6 as before.
    aliases = tmp_path / "aliases.toml"
    loop = '[alias.self]\nto = ["self", "x@other.test"]\n'
    aliases.write_text(loop)
    async with node_and_capture(tmp_path, (("local.aliases", str(aliases)),)) as (node, _):
        wire = await in_thread(Wire, node.port("smtp"))
        try:

            def ask() -> str:
                return str(wire.command("RCPT TO:<self@x.test>"))

            assert (await in_thread(wire.ehlo)).code == 250
            assert (await in_thread(wire.command, "MAIL FROM:<s@x.test>")).code == 250
            assert (await in_thread(ask)).startswith("550 5.4.6 <self@x.test>: ")
            aliases.write_text("")
            await node.aliases.refresh()
            assert await in_thread(ask) == "250 2.1.5 Ok"
            aliases.write_text(loop)
            await node.aliases.refresh()
            queue_id = queue_id_of(await in_thread(wire.data, b"Hi.\r\n"))
        finally:
            wire.close()
        await queue_emptied(node)
        (rcpt,) = (await node.tracking.message(queue_id)).recipients
        assert (rcpt.state.value, rcpt.status) == ("failed", "5.4.6")


# -- 1-3: refused at the command --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_names_longer_than_rfc_5321_allows_are_refused_at_the_command(tmp_path):
    async with node_and_capture(tmp_path) as (node, _):

        def talk() -> list[str]:
            with Wire(node.port("smtp")) as wire:
                replies = [wire.ehlo("h" * 1500), wire.ehlo("evil\x0bX-Injected:yes")]
                replies.append(wire.ehlo("evil\x1b[2J"))
                wire.ehlo()
                replies.append(wire.command("MAIL FROM:<s@other.test>"))
                replies.append(wire.command(f"RCPT TO:<{'a' * 300}@x.test>"))
                replies.append(wire.command("RCPT TO:<j\u00f6rg@x.test>"))
                replies.append(wire.command('RCPT TO:<""@x.test>'))
                return [str(reply) for reply in replies]

        assert await in_thread(talk) == [
            "501 5.5.2 EHLO argument too long (RFC 5321 §4.5.3.1.2)",
            "501 5.5.2 EHLO argument must be a domain or address literal in printable ASCII",
            "501 5.5.2 EHLO argument must be a domain or address literal in printable ASCII",
            "250 2.1.0 Ok",
            "553 5.1.3 Local part too long (RFC 5321 §4.5.3.1.1)",
            "553 5.6.7 Non-ASCII recipient address not permitted without SMTPUTF8 (RFC 6531)",
            "553 5.1.3 Empty local part: no such mailbox",
        ]


@pytest_twisted.ensureDeferred
async def test_address_limits_are_configured(tmp_path):
    # A raised limit is taken; a local part whose mailbox name would be longer than a
    # file name (29 characters of 3 UTF-8 octets: 261 once %-escaped) is still refused
    # at RCPT instead of being deferred for days on ENAMETOOLONG.
    options = (("limits.local_part_length", 100), ("limits.path_length", 300))
    async with node_and_capture(tmp_path, options) as (node, _):
        replies = await in_thread(
            converse,
            node.port("smtp"),
            "MAIL FROM:<s@other.test> SMTPUTF8",
            f"RCPT TO:<{'a' * 100}@x.test>",
            f"RCPT TO:<{'a' * 101}@x.test>",
            f"RCPT TO:<{chr(0x1234) * 29}@x.test>",
        )
        assert [r.code for r in replies] == [250, 250, 553, 553]
        assert replies[3].line.endswith(
            "Recipient address rejected: local part too long for a mailbox name"
        )


# -- 4: one event, one log line ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_sender_cannot_forge_a_log_line(tmp_path):
    forged = "2024-01-01T00:00:00+0000 [mtrkmta.queue.service#info] Q: delivered"
    sender = f'"a\u2028{forged[:40]}"@x.test'
    out = io.StringIO()
    observer = text_observer(out)
    globalLogPublisher.addObserver(observer)
    try:
        async with node_and_capture(tmp_path) as (node, _):
            await in_thread(
                send, node.port("smtp"), sender, ["alice@x.test"], b"Hi.\r\n", "SMTPUTF8"
            )
            await queue_emptied(node)
    finally:
        globalLogPublisher.removeObserver(observer)
    lines = out.getvalue().splitlines()
    (accepted,) = [line for line in lines if "accepted from=" in line]
    assert f'accepted from=<"a\\u2028{forged[:40]}"@x.test>' in accepted
    assert [line for line in lines if "2024-01-01" in line] == [accepted]


# -- 5: one mailbox per local part --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_local_parts_never_share_a_mailbox(tmp_path):
    # "\u01234" and "\u1234" both landed in %1234; "+detail" went to postmaster.
    async with node_and_capture(tmp_path) as (node, _):
        await in_thread(
            send,
            node.port("smtp"),
            "s@other.test",
            ["\u01234@x.test", "\u1234@x.test", "+detail@x.test", "alice+x@x.test"],
            b"Hi.\r\n",
            "SMTPUTF8",
        )
        await queue_emptied(node)
    assert mailboxes(tmp_path) == ["%2Bdetail", "%C4%A34", "%E1%88%B4", "alice"]


@pytest_twisted.ensureDeferred
async def test_the_mailbox_template_places_the_mailbox(tmp_path):
    # local.mailbox = "{domain}/{local}" was documented but not applied.
    options = (("local.mailbox", "{domain}/{local}"),)
    async with node_and_capture(tmp_path, options) as (node, _):
        await in_thread(send, node.port("smtp"), "s@other.test", ["Alice@X.test"], b"Hi.\r\n")
        await queue_emptied(node)
    assert mailboxes(tmp_path) == ["x.test/alice"]
