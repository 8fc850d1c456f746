"""A node's MTQP listener over loopback: TRACK, STARTTLS, no existence oracle (RFC 3887,
RFC 3885 §4.2, doc/conformance.rst 3887-P1).

Messages are submitted with `mtrkmta send`'s code path, then asked about over the wire
with a raw blocking socket (in a thread) or with mtrkmta's own MTQP client.
"""

from __future__ import annotations

import base64
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest_twisted
from certs import tls_options
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from mtrkmta.cli.main import main as mtrkmta_main
from mtrkmta.mtqp.client import (
    HostMap,
    TrackingClient,
    trust_root_from_pem,
    verifying_tls_context,
)
from mtrkmta.mtqp.protocol import Response, ResponseReader
from mtrkmta.originator import SentRecord, last_record
from mtrkmta.service import MTAService
from mtrkmta.testing import node_config, start_node, stop_node
from mtrkmta.tracking.status import parse_related

HOSTNAME = "mx.example.test"
RCPT = "bob@localhost"
MESSAGE = b"From: alice@localhost\r\nSubject: tracked\r\n\r\nHello.\r\n"
TIMEOUT = 10.0
REPO = Path(__file__).resolve().parents[2]


class MtqpWire:
    """A blocking MTQP conversation: send raw bytes, read whole responses."""

    def __init__(self, port: int) -> None:
        self.sock: Any = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self._buffer = b""
        self._reader = ResponseReader()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed; unparsed {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def response(self) -> Response:
        while True:
            response = self._reader.feed(self.line())
            if response is not None:
                return response

    def command(self, line: str) -> Response:
        self.send(line.encode() + b"\r\n")
        return self.response()

    def start_tls(self, context: ssl.SSLContext, name: str) -> None:
        assert not self._buffer, f"bytes left before TLS: {self._buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=name)

    def closed(self) -> bool:
        """True once the server has closed the connection (waits up to TIMEOUT)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True


@asynccontextmanager
async def mtqp_node(tmp_path: Path, *options: tuple[str, object]) -> AsyncIterator[MTAService]:
    config = node_config(
        tmp_path / "data",
        hostname=HOSTNAME,
        listeners=("smtp", "mtqp"),
        options=(("durability.fsync", False), *options),
    )
    node = await start_node(config)
    try:
        yield node
    finally:
        await stop_node(node)


async def send_tracked(node: MTAService, tmp_path: Path, capsys: Any) -> SentRecord:
    """`mtrkmta send` (through cli.main) to the node's SMTP listener; its secrets-file record."""
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)
    secrets = tmp_path / "sent.jsonl"
    args = [
        "send",
        "--server",
        f"127.0.0.1:{node.port('smtp')}",
        "--mtqp-server",
        f"127.0.0.1:{node.port('mtqp')}",
        "--from",
        "alice@localhost",
        "--to",
        RCPT,
        "--hostname",
        "client.example.test",
        "--secrets",
        str(secrets),
        str(message),
    ]
    status = await threads.deferToThread(mtrkmta_main, args)
    out, err = capsys.readouterr()
    assert status == 0, err
    record = last_record(secrets)
    assert out.strip() == record.mtqp
    assert oct(secrets.stat().st_mode & 0o777) == "0o600"
    return record


async def delivered(node: MTAService) -> None:
    mailbox = node.config.data_dir / "mail" / "bob" / "new"
    for _ in range(500):
        if mailbox.is_dir() and any(mailbox.iterdir()) and not await node.spool.queue_ids():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("the message was not delivered")


def node_at(port: int) -> HostMap:
    """The client's override: HOSTNAME, asked without a port, is at 127.0.0.1:``port``."""

    def where(host: str, asked: int | None) -> tuple[str, int] | None:
        return ("127.0.0.1", port) if (host, asked) == (HOSTNAME, None) else None

    return where


def client_context(cafile: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile=str(cafile))
    return context


@pytest_twisted.ensureDeferred
async def test_track_a_message_sent_with_mtrk(tmp_path, capsys):
    # RFC 3885 §3.1-§3.2, §4.2: A is 32 random octets, B = SHA1(A) went out as MTRK=, the ENVID is
    # <random>@<fqdn>; RFC 3887 §3: +OK/MTQP greeting; §4: TRACK with A answers +OK+
    # and one multipart/related of message/tracking-status (RFC 3886 §3); RFC 3887 §8: pipelined
    # commands answered in order; §7: QUIT, then the server closes.
    async with mtqp_node(tmp_path) as node:
        record = await send_tracked(node, tmp_path, capsys)
        assert len(base64.b64decode(record.secret)) == 32
        local, _, domain = record.envid.partition("@")
        assert domain == "client.example.test" and len(local) >= 20
        await delivered(node)

        def talk() -> tuple[Response, list[Response], bool]:
            wire = MtqpWire(node.port("mtqp"))
            try:
                greeting = wire.response()
                wire.send(
                    f"TRACK {record.envid} {record.secret}\r\nCOMMENT in between\r\n"
                    f"TRACK <{record.envid}> {base64.b64encode(bytes(32)).decode()}\r\n"
                    "QUIT\r\n".encode()
                )
                answers = [wire.response() for _ in range(4)]
                return greeting, answers, wire.closed()
            finally:
                wire.close()

        greeting, answers, closed = await threads.deferToThread(talk)
        assert greeting.status_line() == f"+OK/MTQP {HOSTNAME} MTQP server ready".encode()
        track, comment, wrong, bye = answers
        assert track.indicator == "+OK+"
        assert (comment.indicator, wrong.status_line(), bye.indicator) == (
            "+OK",
            b"-ERR/noinfo No tracking information",
            "+OK",
        )
        assert closed
        (report,) = parse_related(track.body)
        assert report.original_envelope_id == record.envid
        assert str(report.reporting_mta) == f"dns; {HOSTNAME}"
        (rcpt,) = report.recipients
        assert str(rcpt.original_recipient) == f"rfc822; {RCPT}"
        assert str(rcpt.final_recipient) == f"rfc822; {RCPT}"
        assert (rcpt.action, rcpt.status) == ("delivered", "2.1.5")
        assert rcpt.last_attempt_date is not None and rcpt.will_retry_until is None
        assert report.arrival_date <= rcpt.last_attempt_date

        # The same through the `mtrkmta track` command, in its own process.
        status, out, err = await track_process(record.mtqp)
        assert status == 0, err
        assert f"{RCPT}: delivered (2.1.5: destination address valid) at {HOSTNAME}" in out


def mtrkmta_process(*args: str) -> subprocess.CompletedProcess[str]:
    """Blocking: run the `mtrkmta` command in its own process (killed after 60 s)."""
    return subprocess.run(
        [sys.executable, "-m", "mtrkmta.cli.main", *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
        timeout=60,
        check=False,
    )


async def track_process(*args: str) -> tuple[int, str, str]:
    result = await threads.deferToThread(mtrkmta_process, "track", *args)
    return result.returncode, result.stdout, result.stderr


@pytest_twisted.ensureDeferred
async def test_starttls_then_a_fresh_greeting_without_starttls(tmp_path, capsys):
    # RFC 3887 §3 (MUST): STARTTLS listed; §6 (MUST): -BAD/bad-fqdn for a name the certificate
    # does not carry; §6 (MUST): after +OK the handshake, input sent in clear after
    # STARTTLS is forgotten, and the new greeting lacks STARTTLS; RFC 8996: TLS 1.2 or later.
    certificate_dir = tmp_path / "tls"
    async with mtqp_node(tmp_path, *tls_options(certificate_dir, HOSTNAME)) as node:
        record = await send_tracked(node, tmp_path, capsys)
        cafile = certificate_dir / "cert.pem"

        def talk() -> dict[str, Any]:
            wire = MtqpWire(node.port("mtqp"))
            seen: dict[str, Any] = {}
            try:
                seen["greeting"] = wire.response()
                seen["bad"] = wire.command("STARTTLS other.example.test")
                wire.send(
                    f"STARTTLS {HOSTNAME}\r\nTRACK {record.envid} {record.secret}\r\n".encode()
                )
                seen["go"] = wire.response()
                wire.start_tls(client_context(cafile), HOSTNAME)
                seen["version"] = wire.sock.version()
                seen["after"] = wire.response()
                seen["comment"] = wire.command("COMMENT the injected TRACK got no answer")
                seen["again"] = wire.command(f"STARTTLS {HOSTNAME}")
                seen["track"] = wire.command(f"TRACK {record.envid} {record.secret}")
                return seen
            finally:
                wire.close()

        seen = await threads.deferToThread(talk)
        assert seen["greeting"].indicator == "+OK+"
        assert seen["greeting"].data_lines == (b"STARTTLS",)
        assert seen["bad"].status_line().startswith(b"-BAD/bad-fqdn")
        assert seen["go"].status_line() == b"+OK Begin TLS negotiation"
        assert seen["version"] in ("TLSv1.2", "TLSv1.3")
        assert seen["after"].status_line() == f"+OK/MTQP {HOSTNAME} MTQP server ready".encode()
        assert seen["comment"].status_line() == b"+OK Ok"
        assert seen["again"].status_line().startswith(b"-BAD/tls-in-progress")
        assert seen["track"].indicator == "+OK+"

        # mtrkmta's client: --tls require verifies the certificate (here against the test
        # CA file) for the name it gives STARTTLS; a server it cannot verify gets no TRACK.
        here = node_at(node.port("mtqp"))
        trust = verifying_tls_context(trust_root_from_pem(cafile.read_bytes()))
        client = TrackingClient(
            reactor, None, tls="require", tls_context=trust, connect_to=here, reply_timeout=5
        )
        hop = await client.query(HOSTNAME, record.envid, record.secret)
        assert hop.error is None and hop.tls and hop.reports
        assert [g.starttls for g in hop.greetings] == [True, False]
        untrusted = TrackingClient(reactor, None, tls="require", connect_to=here, reply_timeout=5)
        hop = await untrusted.query(HOSTNAME, record.envid, record.secret)
        assert hop.error == f"TLS handshake with {HOSTNAME} failed" and hop.response is None
        # A name the certificate lacks: STARTTLS is refused, and under "require" no TRACK.
        hop = await client.query("127.0.0.1", record.envid, record.secret, port=node.port("mtqp"))
        assert hop.error is not None and hop.error.startswith("TLS required, but STARTTLS")
        assert hop.response is None


@pytest_twisted.ensureDeferred
async def test_tls_required_refuses_track_in_clear(tmp_path, capsys):
    # RFC 3887 §3 (MUST): "STARTTLS required" in the greeting; -ERR/tls-required (RFC 3887 §4).
    certificate_dir = tmp_path / "tls"
    options = (*tls_options(certificate_dir, HOSTNAME), ("mtqp.tls_required", True))
    async with mtqp_node(tmp_path, *options) as node:
        record = await send_tracked(node, tmp_path, capsys)
        here = node_at(node.port("mtqp"))
        plain = TrackingClient(reactor, None, tls="none", connect_to=here, reply_timeout=5)
        hop = await plain.query(HOSTNAME, record.envid, record.secret)
        assert hop.greetings[0].starttls_required
        assert hop.response is not None and hop.response.has_code("tls-required")
        assert hop.error == "-ERR/tls-required TLS required; use STARTTLS first"
        opportunistic = TrackingClient(reactor, None, tls="may", connect_to=here, reply_timeout=5)
        hop = await opportunistic.query(HOSTNAME, record.envid, record.secret)
        assert hop.tls and hop.reports and hop.error is None


@pytest_twisted.ensureDeferred
async def test_wrong_secret_and_unknown_envid_are_indistinguishable(tmp_path, capsys):
    # doc/conformance.rst 3887-P1: the same reply, in about the same time (generous bound: the
    # store does the same work for both, doc/conformance.rst 3887-P1).
    async with mtqp_node(tmp_path, ("mtqp.failure_rate", 0)) as node:
        record = await send_tracked(node, tmp_path, capsys)
        wrong_secret = base64.b64encode(b"\x00" * 32).decode()
        rounds = 30

        def talk() -> tuple[set[bytes], list[float], list[float]]:
            wire = MtqpWire(node.port("mtqp"))
            replies: set[bytes] = set()
            times: dict[str, list[float]] = {"wrong": [], "unknown": []}
            try:
                wire.response()
                for number in range(rounds):
                    for kind, line in (
                        ("wrong", f"TRACK {record.envid} {wrong_secret}"),
                        (
                            "unknown",
                            f"TRACK {number}-never-sent@client.example.test {record.secret}",
                        ),
                    ):
                        started = time.perf_counter()
                        response = wire.command(line)
                        times[kind].append(time.perf_counter() - started)
                        replies.add(response.render())
                return replies, times["wrong"], times["unknown"]
            finally:
                wire.close()

        replies, wrong, unknown = await threads.deferToThread(talk)
        assert replies == {b"-ERR/noinfo No tracking information\r\n"}
        assert abs(statistics.median(wrong) - statistics.median(unknown)) < 0.05


@pytest_twisted.ensureDeferred
async def test_failed_attempts_are_rate_limited(tmp_path, capsys):
    # RFC 3887 §2.5: after mtqp.failure_rate failures a minute, TRACK gets -TEMP.
    async with mtqp_node(tmp_path, ("mtqp.failure_rate", 2)) as node:
        record = await send_tracked(node, tmp_path, capsys)
        wrong = base64.b64encode(b"\x01" * 32).decode()

        def talk() -> list[bytes]:
            wire = MtqpWire(node.port("mtqp"))
            try:
                wire.response()
                lines = [f"TRACK {record.envid} {wrong}"] * 2 + [
                    f"TRACK {record.envid} {record.secret}"
                ]
                return [wire.command(line).status_line() for line in lines]
            finally:
                wire.close()

        assert await threads.deferToThread(talk) == [
            b"-ERR/noinfo No tracking information",
            b"-ERR/noinfo No tracking information",
            b"-TEMP/rate-limit Too many TRACK commands; try again later",
        ]


@pytest_twisted.ensureDeferred
async def test_stopping_the_node_closes_mtqp_sessions(tmp_path):
    # The listener opens after the mail listeners and stops with them.
    config = node_config(tmp_path / "data", hostname=HOSTNAME, listeners=("smtp", "mtqp"))
    node = await start_node(config)
    assert list(node.ports) == ["smtp", "mtqp"]
    wire = await threads.deferToThread(MtqpWire, node.port("mtqp"))
    try:
        greeting = await threads.deferToThread(wire.response)
        assert greeting.indicator == "+OK"
        await stop_node(node)
        assert await threads.deferToThread(wire.closed)
    finally:
        wire.close()
        await stop_node(node)


def test_track_command_usage_errors_exit_64():
    # `mtrkmta track` exit status 64 (EX_USAGE) for usage errors, before any network use:
    # its 2 means "some recipient failed".
    result = mtrkmta_process("track", "http://not-mtqp/")
    assert result.returncode == 64
    assert "not an mtqp URI" in result.stderr
