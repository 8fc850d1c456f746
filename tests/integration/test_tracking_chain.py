"""Message tracking end to end: A -SMTP-> B -LMTP-> C, sent with `mtrkmta send`, followed
with `mtrkmta track` hop by hop (RFC 3885 §3, RFC 3886 §3, §3.5, RFC 3887 §2).

Three in-process nodes on loopback, each with its own host name and MTQP listener. A
routes ``chain.example`` by MX: the loopback DNS server says ``chain.example MX
mx-b.example.test``, and A's ``delivery.smtp_port`` is B's SMTP port, so A's
Remote-MTA names B (``dns; mx-b.example.test``) as it would on the Internet. B routes
``chain.example`` to C's LMTP listener (``lmtp:tcp:host=127.0.0.1:port=...``); C has
it as a local domain and delivers into its Maildir. The tracking client finds A and B
through ``_mtqp._tcp.<host>`` SRV records on that DNS server (RFC 3887 §2). B's
Remote-MTA for C is the fixed route's address ``[127.0.0.1]``: no SRV lookup applies to
an address, so the one explicit override, ``--connect-to 127.0.0.1=127.0.0.1:<C's
MTQP port>``, says where that host's tracking server listens.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest_twisted
from dnsserver import DNSServer, Zone, a, mx, serve_dns
from fakemta import ALL_EXTENSIONS, FakeMTA
from smtpwire import RefusingPort, queue_emptied
from srvdns import mtqp_name, publish, srv
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater
from twisted.names import dns

from mtrkmta.cli import send, track
from mtrkmta.mtqp.protocol import decode_secret
from mtrkmta.originator import TrackingSecret, last_record
from mtrkmta.service import MTAService
from mtrkmta.testing import node_config, start_node, stop_node
from mtrkmta.tracking.interfaces import RecipientState

DOMAIN = "chain.example"
RCPT = f"bob@{DOMAIN}"
SENDER = "alice@localhost"
A_NAME, B_NAME, C_NAME = "mx-a.example.test", "mx-b.example.test", "mx-c.example.test"
MESSAGE = b"From: alice@localhost\r\nTo: bob@chain.example\r\nSubject: chain\r\n\r\nHello.\r\n"
NO_MTRK = tuple(e for e in ALL_EXTENSIONS if e != "MTRK")
QUICK = (("durability.fsync", False),)
DEADLINE = 15.0
REPLY_TIMEOUT = 10.0  # the client's wait per reply; RFC 3887's 2-minute minimum is for real use


async def until(predicate: Callable[[], Any], what: str) -> Any:
    """Poll ``predicate`` (sync or async) until truthy; fail after DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    while True:
        value = predicate()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


@contextmanager
def local_zone(zone: str) -> Iterator[None]:
    """The local time zone (TZ) is ``zone`` inside the block."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = zone
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


@dataclass
class Chain:
    tmp: Path
    dns: DNSServer
    nodes: dict[str, MTAService] = field(default_factory=dict)

    @property
    def secrets(self) -> Path:
        return self.tmp / "sent.jsonl"

    def node(self, name: str) -> MTAService:
        return self.nodes[name]

    async def start(self, name: str, hostname: str, *options: tuple[str, object], **kw: Any):
        listeners = kw.pop("listeners", ("smtp", "mtqp"))
        config = node_config(
            self.tmp / name,
            hostname=hostname,
            listeners=listeners,
            options=(*QUICK, *options),
        )
        self.nodes[name] = await start_node(config, **kw)
        port = self.nodes[name].port("mtqp")
        if hostname != C_NAME:  # C is reached by its route's address: no SRV for it
            publish(self.dns, mtqp_name(hostname), srv(0, 0, port, hostname))
        return self.nodes[name]

    async def send(self, mtqp_server: str = A_NAME) -> str:
        """`mtrkmta send` through A; the URI it printed."""
        out, err = io.StringIO(), io.StringIO()
        args = [
            "--server",
            f"127.0.0.1:{self.node('a').port('smtp')}",
            "--from",
            SENDER,
            "--to",
            RCPT,
            "--secrets",
            str(self.secrets),
            "--mtqp-server",
            mtqp_server,
            "--hostname",
            "client.example.test",
            "--timeout",
            "86400",
        ]
        status = await threads.deferToThread(
            send.main, args, stdin=io.BytesIO(MESSAGE), out=out, err=err
        )
        assert status == 0, err.getvalue()
        return out.getvalue().strip()

    async def track(self, *extra: str) -> tuple[int, str]:
        """`mtrkmta track --last ...` with the loopback DNS server; exit status and output."""
        options = track.TrackOptions()
        args = ["--last", "--secrets", str(self.secrets), *extra]
        if "c" in self.nodes:
            args += ["--connect-to", f"127.0.0.1=127.0.0.1:{self.node('c').port('mtqp')}"]
        options.parseOptions(args)
        out = io.StringIO()
        resolver = self.dns.resolver()
        status = await track.run(options, reactor, resolver, out, reply_timeout=REPLY_TIMEOUT)
        return status, out.getvalue()

    async def recipient(self, name: str) -> Any:
        """The tracked recipient at node ``name`` (lookup by ENVID and SHA1(A))."""
        record = last_record(self.secrets)

        certifier = TrackingSecret(decode_secret(record.secret), record.envid).certifier
        node = self.node(name)
        assert node.tracking is not None
        found = await node.tracking.lookup_transactions(record.envid, certifier)
        return found[0].recipients[0] if found else None

    async def until_state(self, name: str, state: RecipientState) -> None:
        """Wait until the recipient's record at node ``name`` says ``state``."""

        async def reached() -> bool:
            recipient = await self.recipient(name)
            return recipient is not None and recipient.state is state

        await until(reached, f"{name}'s record to say {state.value}")


@asynccontextmanager
async def chain(tmp_path: Path) -> AsyncIterator[Chain]:
    zones = [
        Zone(
            "example.test",
            {A_NAME: [a("127.0.0.1")], B_NAME: [a("127.0.0.1")], C_NAME: [a("127.0.0.1")]},
        ),
        Zone(DOMAIN, {DOMAIN: [mx(10, B_NAME)]}),
    ]
    async with serve_dns(reactor, zones) as dns_server:
        rig = Chain(tmp_path, dns_server)
        try:
            yield rig
        finally:
            for name in ("a", "b", "c"):  # upstream first: nothing new reaches a stopped node
                if name in rig.nodes:
                    await stop_node(rig.nodes.pop(name))


async def start_a(rig: Chain) -> MTAService:
    return await rig.start(
        "a",
        A_NAME,
        ("routes", f"{DOMAIN}=mx"),
        ("delivery.smtp_port", rig.node("b").port("smtp")),
        resolver=rig.dns.resolver(),
    )


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def hop_recipient(hop: dict[str, Any]) -> dict[str, Any]:
    (report,) = hop["reports"]
    (recipient,) = report["recipients"]
    return recipient


@pytest_twisted.ensureDeferred
async def test_send_then_track_through_three_hops(tmp_path):
    async with chain(tmp_path) as rig:
        c = await rig.start("c", C_NAME, ("domains.local", (DOMAIN,)), listeners=("lmtp", "mtqp"))
        await rig.start(
            "b", B_NAME, ("routes", f"{DOMAIN}=lmtp:tcp:host=127.0.0.1:port={c.port('lmtp')}")
        )
        await start_a(rig)
        uri = await rig.send()
        assert uri.startswith(f"mtqp://{A_NAME}/track/")
        mailbox = rig.tmp / "c" / "mail" / "bob" / "new"
        await until(lambda: mailbox.is_dir() and any(mailbox.iterdir()), "delivery at C")
        for name in ("a", "b"):
            await rig.until_state(name, RecipientState.TRANSFERRED)
        await until(
            lambda: rig.recipient("c"), "C's tracking record"
        )  # C tracked it: MTRK went over LMTP (RFC 3886 §3.5)

        status, text = await rig.track("--json")
        assert status == 0, text
        trace = json.loads(text)
        record = last_record(rig.secrets)
        assert trace["envid"] == record.envid and trace["complete"] is True
        assert record.subject == "chain"  # saved by `mtrkmta send` from the message
        first, second, third = trace["hops"]

        # Hop 1: A, found by SRV, transferred to B (named by its MX host name).
        assert first["host"] == A_NAME and first["referred_by"] is None
        assert first["server"]["port"] == rig.node("a").port("mtqp")
        (report_a,) = first["reports"]
        assert report_a["original_envelope_id"] == record.envid
        assert report_a["reporting_mta"] == f"dns; {A_NAME}"
        rcpt_a = hop_recipient(first)
        assert rcpt_a["original_recipient"] == f"rfc822; {RCPT}"
        assert rcpt_a["final_recipient"] == f"rfc822; {RCPT}"
        assert (rcpt_a["action"], rcpt_a["status"]) == ("transferred", "2.4.0")
        assert rcpt_a["remote_mta"] == f"dns; {B_NAME}"
        assert rcpt_a["last_attempt_date"] is not None and rcpt_a["will_retry_until"] is None

        # Hop 2: B, asked because A named it, found by SRV; transferred to C's LMTP LDA.
        assert (second["host"], second["referred_by"]) == (B_NAME, A_NAME)
        assert second["server"]["port"] == rig.node("b").port("mtqp")
        (report_b,) = second["reports"]
        assert report_b["original_envelope_id"] == record.envid
        assert report_b["reporting_mta"] == f"dns; {B_NAME}"
        rcpt_b = hop_recipient(second)
        assert rcpt_b["original_recipient"] == f"rfc822; {RCPT}"
        assert rcpt_b["final_recipient"] == f"rfc822; {RCPT}"
        assert (rcpt_b["action"], rcpt_b["status"]) == ("transferred", "2.4.0")
        assert rcpt_b["remote_mta"] == "dns; [127.0.0.1]"
        assert rcpt_b["last_attempt_date"] is not None and rcpt_b["will_retry_until"] is None

        # Hop 3: C, reached through --connect-to, delivered into its Maildir.
        assert (third["host"], third["referred_by"]) == ("[127.0.0.1]", B_NAME)
        assert third["server"]["port"] == rig.node("c").port("mtqp")
        (report_c,) = third["reports"]
        assert report_c["original_envelope_id"] == record.envid
        assert report_c["reporting_mta"] == f"dns; {C_NAME}"
        rcpt_c = hop_recipient(third)
        assert rcpt_c["original_recipient"] == f"rfc822; {RCPT}"
        assert rcpt_c["final_recipient"] == f"rfc822; {RCPT}"
        assert (rcpt_c["action"], rcpt_c["status"]) == ("delivered", "2.1.5")
        assert rcpt_c["meaning"] == "destination address valid"  # RFC 3463 §3.2
        assert rcpt_c["remote_mta"] is None and rcpt_c["will_retry_until"] is None
        assert rcpt_c["last_attempt_date"] is not None

        # Times run forward along the chain (whole seconds).
        arrivals = [at(r["arrival_date"]) for r in (report_a, report_b, report_c)]
        assert arrivals == sorted(arrivals)
        for report, rcpt in ((report_a, rcpt_a), (report_b, rcpt_b), (report_c, rcpt_c)):
            assert at(report["arrival_date"]) <= at(rcpt["last_attempt_date"])

        (path,) = trace["recipients"]
        assert path["original_recipient"] == RCPT and path["outcome"] == "delivered"
        assert [step["hop"] for step in path["path"]] == [1, 2, 3]

        # The servers were found the RFC 3887 §2 way: SRV queries for A and B.
        asked = {(q.name, q.type) for q in rig.dns.queries}
        assert (mtqp_name(A_NAME), dns.SRV) in asked
        assert (mtqp_name(B_NAME), dns.SRV) in asked

        # The default output: the hops, the events across them, where each recipient ended.
        status, timeline = await rig.track()
        assert status == 0
        assert f"Hop 1: {A_NAME} (127.0.0.1 port {rig.node('a').port('mtqp')})" in timeline
        assert f"Hop 2: {B_NAME} (127.0.0.1 port {rig.node('b').port('mtqp')})" in timeline
        assert f"referred by {A_NAME}" in timeline and f"referred by {B_NAME}" in timeline
        assert f"  hop 1  {RCPT}: transferred to {B_NAME}[127.0.0.1]:" in timeline
        assert f"  hop 2  {RCPT}: transferred to 127.0.0.1[127.0.0.1]:" in timeline
        assert f"  hop 3  {RCPT}: delivered" in timeline
        assert f"{RCPT}: delivered (2.1.5: destination address valid) at {C_NAME}" in timeline

        # Times in the local time zone with its offset, or in UTC with --utc.
        with local_zone("XYZ-05:30"):  # POSIX TZ: UTC+05:30
            _, local = await rig.track()
            _, utc = await rig.track("--utc")
        first = r"\n  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+ZONE +\+0s  hop 1  accepted by "
        assert re.search(first.replace("ZONE", "0530"), local)
        assert "+0000" not in local
        assert re.search(first.replace("ZONE", "0000"), utc)
        assert "+0530" not in utc

        # --raw: each server's message/tracking-status answer as received.
        status, raw = await rig.track("--raw")
        assert status == 0
        assert raw.count('Content-Type: multipart/related; type="message/tracking-status"') == 3
        assert f"Reporting-MTA: dns; {C_NAME}" in raw and "Action: delivered" in raw


@pytest_twisted.ensureDeferred
async def test_next_hop_down_shows_delayed_at_b(tmp_path):
    with RefusingPort() as down:  # C is down
        async with chain(tmp_path) as rig:
            route = f"{DOMAIN}=lmtp:tcp:host=127.0.0.1:port={down.port}"
            await rig.start("b", B_NAME, ("routes", route))
            await start_a(rig)
            await rig.send()
            await rig.until_state("b", RecipientState.DEFERRED)  # its attempt to reach C failed
            status, text = await rig.track("--json")
            assert status == 1, text  # still queued: not final
            trace = json.loads(text)
            assert trace["complete"] is False
            assert [hop["host"] for hop in trace["hops"]] == [A_NAME, B_NAME]  # stops at B
            assert hop_recipient(trace["hops"][0])["action"] == "transferred"
            rcpt_b = hop_recipient(trace["hops"][1])
            assert rcpt_b["action"] == "delayed" and rcpt_b["status"].startswith("4.")
            assert rcpt_b["remote_mta"] == "dns; [127.0.0.1]"
            assert rcpt_b["last_attempt_date"] is not None
            assert (
                rcpt_b["will_retry_until"] is not None
            )  # RFC 3886 §3.3.7 (SHOULD): still in B's queue
            assert at(rcpt_b["will_retry_until"]) > at(rcpt_b["last_attempt_date"])
            (path,) = trace["recipients"]
            assert (path["outcome"], path["final"]) == ("delayed", False)

            status, timeline = await rig.track()
            assert status == 1
            assert f"{RCPT}: still queued at {B_NAME} (" in timeline
            assert "will retry until 20" in timeline


@pytest_twisted.ensureDeferred
async def test_next_hop_without_mtrk_shows_relayed_and_stops(tmp_path):
    fake = await FakeMTA(reactor, extensions=NO_MTRK, hostname="legacy.example.test").start()
    try:
        async with chain(tmp_path) as rig:
            await rig.start("b", B_NAME, ("routes", f"{DOMAIN}=smtp:{fake.endpoint};tls=none"))
            await start_a(rig)
            await rig.send()
            await until(lambda: [t for t in fake.transactions if t.content], "relay to the fake")
            (relayed,) = [t for t in fake.transactions if t.content]
            assert not any(p.upper().startswith("MTRK=") for p in relayed.mail_params)
            await rig.until_state("b", RecipientState.RELAYED)
            status, text = await rig.track("--json")
            assert status == 0, text  # relayed is final: nothing more will be known
            trace = json.loads(text)
            assert [hop["host"] for hop in trace["hops"]] == [A_NAME, B_NAME]
            rcpt_b = hop_recipient(trace["hops"][1])
            assert (rcpt_b["action"], rcpt_b["status"]) == ("relayed", "2.1.9")
            assert rcpt_b["remote_mta"] == "dns; [127.0.0.1]"
            assert rcpt_b["last_attempt_date"] is not None
            (path,) = trace["recipients"]
            assert (path["outcome"], path["final"]) == ("relayed", True)
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_two_nodes_on_one_address_at_two_mtqp_ports(tmp_path):
    # A relays to B by a fixed route to 127.0.0.1, so A's Remote-MTA is "dns; [127.0.0.1]"
    # (RFC 3461 §9.3): the address A's own tracking server has, on another port. The
    # client asks A at the URI's port, then B where --connect-to says 127.0.0.1 is
    # (a Remote-MTA names no port): two servers, not a loop.
    async with chain(tmp_path) as rig:
        b = await rig.start("b", B_NAME, ("domains.local", (DOMAIN,)))
        route = f"{DOMAIN}=smtp:tcp:host=127.0.0.1:port={b.port('smtp')};tls=none"
        a = await rig.start("a", A_NAME, ("routes", route))
        uri = await rig.send(mtqp_server=f"127.0.0.1:{a.port('mtqp')}")
        assert uri.startswith(f"mtqp://127.0.0.1:{a.port('mtqp')}/track/")
        await queue_emptied(a)  # relayed: B said 250
        await queue_emptied(b)  # delivered into B's Maildir
        options = track.TrackOptions()
        options.parseOptions(
            ["--json", "--connect-to", f"127.0.0.1=127.0.0.1:{b.port('mtqp')}", uri]
        )
        out = io.StringIO()
        status = await track.run(
            options, reactor, rig.dns.resolver(), out, reply_timeout=REPLY_TIMEOUT
        )
        trace = json.loads(out.getvalue())
        assert status == 0, trace
        first, second = trace["hops"]
        assert (first["host"], first["server"]["port"]) == ("127.0.0.1", a.port("mtqp"))
        assert hop_recipient(first)["remote_mta"] == "dns; [127.0.0.1]"
        assert (second["host"], second["referred_by"]) == ("[127.0.0.1]", A_NAME)
        assert second["server"]["port"] == b.port("mtqp")
        assert second["reports"][0]["reporting_mta"] == f"dns; {B_NAME}"
        (path,) = trace["recipients"]
        assert (path["outcome"], path["final"]) == ("delivered", True)


@pytest_twisted.ensureDeferred
async def test_timeline_of_a_deferral_then_a_delivery_across_two_nodes(tmp_path):
    with RefusingPort() as down:  # B is down until it starts on this port
        # A cannot reach B at first (connection refused): its attempt fails with a next
        # attempt; once B listens, A transfers the message and B delivers it. The events of
        # both hops reach the client in their MTQP answers (X-Mtrkmta-Event, RFC 3464 §2.4).
        async with chain(tmp_path) as rig:
            route = f"{DOMAIN}=smtp:tcp:host=127.0.0.1:port={down.port};tls=none"
            a = await rig.start("a", A_NAME, ("routes", route))
            await rig.send()
            await rig.until_state("a", RecipientState.DEFERRED)  # its attempt to reach B failed
            status, pending = await rig.track("--utc")
            assert status == 1, pending  # still queued at A
            assert f"{RCPT}: still queued at {A_NAME} (4." in pending
            assert ", next attempt 20" in pending

            b = await rig.start(
                "b",
                B_NAME,
                ("domains.local", (DOMAIN,)),
                ("listeners.smtp", f"tcp:{down.release()}:interface=127.0.0.1"),
            )
            assert a.queue is not None
            await a.queue.flush()
            mailbox = rig.tmp / "b" / "mail" / "bob" / "new"
            await until(lambda: mailbox.is_dir() and any(mailbox.iterdir()), "delivery at B")
            await queue_emptied(a)
            await queue_emptied(b)

            to_b = ("--connect-to", f"127.0.0.1=127.0.0.1:{b.port('mtqp')}")  # B by its address
            status, text = await rig.track("--utc", "--json", *to_b)
            assert status == 0, text
            events = json.loads(text)["events"]
            kinds = [(e["hop"], e["kind"]) for e in events if e["kind"] != "dsn-sent"]
            assert kinds == [
                (1, "arrived"),
                (1, "deferred"),
                (1, "transferred"),
                (2, "arrived"),
                (2, "delivered"),
            ]
            failed = events[1]
            assert failed["status"].startswith("4.") and failed["next_attempt"] is not None
            assert "Connection refused" in failed["diagnostic"]
            assert failed["text"].startswith(f"attempt failed: {failed['status']} ")

            status, timeline = await rig.track("--utc", *to_b)
            assert status == 0, timeline
            lines = [line for line in timeline.splitlines() if re.match(r"  \d{4}-", line)]
            texts = [re.sub(r"^  \S+ \S+ \+0000 +\+\S+  ", "", line) for line in lines]
            assert texts[0] == f"hop 1  accepted by {A_NAME} over ESMTP"
            assert re.fullmatch(
                rf"hop 1  {RCPT}: attempt failed: 4\.\d\.\d [^(]+\(.*Connection refused.*\); "
                r"next attempt \d\d:\d\d:\d\d",
                texts[1],
            ), texts[1]
            assert texts[2].startswith(f"hop 1  {RCPT}: transferred to ")
            assert texts[3] == f"hop 2  accepted by {B_NAME} over ESMTP"
            assert texts[4].startswith(f"hop 2  {RCPT}: delivered")
            assert lines[0].split()[3] == "+0s"
            assert f"{RCPT}: delivered (2.1.5: destination address valid) at {B_NAME}" in timeline
