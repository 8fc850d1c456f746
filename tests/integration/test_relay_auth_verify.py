"""AUTH toward a smarthost (RFC 4954 client side) and ``tls = verify``, over real loopback sockets.

The smarthost is a second mtrkmta node with STARTTLS (a certificate from a throwaway test CA:
valid, expired, or for another name) and AUTH users; the relaying side is the SMTPTransport
with a next hop as the router builds it from a route with ``tls``, ``ca_file`` and ``auth``.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from certs import TestCA
from dnsserver import Zone, a, mx, serve_dns
from smtpwire import Wire, in_thread, queue_id_of, until
from twisted.internet import reactor

from mtrkmta.auth import hash_password
from mtrkmta.config import CAFile, RelayCredentials
from mtrkmta.delivery.interfaces import Attempt, NextHop, RecipientOutcome, Server
from mtrkmta.delivery.smtp import SMTPTransport, SMTPTransportSettings
from mtrkmta.envelope import Envelope, MailParams, RcptParams, Recipient
from mtrkmta.queue.service import QueueEvent
from mtrkmta.smtp.client import ClientTimeouts, TLSPolicy
from mtrkmta.testing import node_config, start_node, stop_node
from mtrkmta.tracking.interfaces import RecipientState as S
from mtrkmta.tracking.interfaces import RecipientUpdate

USER = "relay-user"
PASSWORD = "s3cret-Pa55"
HOST = "localhost"  # the name the route gives, and the certificate should carry
SETTINGS = SMTPTransportSettings(
    hostname="relay.example.test",
    default_retention=86400.0,
    timeouts=ClientTimeouts().scaled(0.05),
    idle_keep=0,
)
CONTENT = b"From: a@client.example\r\nSubject: smarthost\r\n\r\nHello.\r\n"


def secret_forms() -> list[str]:
    """The password as it could leak: plain, in AUTH PLAIN and in AUTH LOGIN."""
    b64 = base64.b64encode
    return [
        PASSWORD,
        b64(f"\0{USER}\0{PASSWORD}".encode()).decode(),
        b64(PASSWORD.encode()).decode(),
    ]


class Smarthost:
    """A node with STARTTLS (a certificate from ``ca``) and, with ``users``, AUTH."""

    def __init__(self, tmp_path: Path, ca: TestCA) -> None:
        self.tmp_path = tmp_path
        self.ca = ca
        self.node: Any = None

    async def start(
        self,
        name: str = HOST,
        *,
        expired: bool = False,
        users: bool = True,
        local: tuple[str, ...] = ("smarthost.example.test",),
    ) -> Any:
        certificate, key = self.ca.write_issued(self.tmp_path / "tls", name, expired=expired)
        options: list[tuple[str, object]] = [
            ("tls.certificate", str(certificate)),
            ("tls.private_key", str(key)),
            ("durability.fsync", False),
            ("domains.local", local),
        ]
        if users:
            users_file = self.tmp_path / "users"
            users_file.write_text(f"{USER}:{hash_password(PASSWORD, iterations=1000)}\n")
            options += [("auth.users_file", str(users_file)), ("auth.failure_delay", "0.01s")]
        config = node_config(
            self.tmp_path / "data", hostname="smarthost.example.test", options=tuple(options)
        )
        self.node = await start_node(config, deliver=False)
        return self.node

    @property
    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.node.port('smtp')}"

    async def stop(self) -> None:
        if self.node is not None:
            await stop_node(self.node)


def credentials(password: str = PASSWORD) -> RelayCredentials:
    return RelayCredentials(Path("/etc/mtrkmta/smarthost.auth"), USER, password)


async def relay(
    smarthost: Smarthost,
    *,
    tls: TLSPolicy = "verify",
    ca: TestCA | None = None,
    auth: RelayCredentials | None = None,
    recipient: str = "bob@elsewhere.example",
) -> RecipientOutcome:
    """Deliver one message to the smarthost over a hop like the router builds; its outcome."""
    hop = NextHop(
        transport="smtp",
        destination=f"route:smtp:{smarthost.endpoint}",
        servers=(Server(HOST, smarthost.endpoint),),
        tls=tls,
        ca=CAFile(Path("ca.pem"), ca.pem) if ca is not None else None,
        auth=auth,
    )
    envelope = Envelope(
        queue_id="RELAYAUTH1",
        sender="a@client.example",
        recipients=(Recipient(recipient, RcptParams()),),
        params=MailParams(),
        arrival=1_700_000_000.0,
    )
    transport = SMTPTransport(reactor, SETTINGS)
    try:
        (outcome,) = await transport.deliver(Attempt(envelope, CONTENT, (0,), hop, 1_700_000_000.0))
    finally:
        await transport.close()
    return outcome


def assert_no_secret(outcome: RecipientOutcome) -> None:
    text = repr(outcome)
    for secret in secret_forms():
        assert secret not in text


async def received(smarthost: Smarthost) -> int:
    return len(await smarthost.node.spool.queue_ids())


# -- AUTH -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_verified_tls_and_right_credentials_relay(smarthost, ca):
    await smarthost.start()
    outcome = await relay(smarthost, ca=ca, auth=credentials())
    assert (outcome.state, outcome.status) == (S.RELAYED, "2.1.9")
    assert await received(smarthost) == 1
    assert_no_secret(outcome)


@pytest_twisted.ensureDeferred
async def test_wrong_password_defers_4_7_8_and_tells_no_secret(smarthost, ca):
    # RFC 4954 §6: 535 5.7.8; deferred (a soft bounce, as Postfix by default), not failed.
    await smarthost.start()
    outcome = await relay(smarthost, ca=ca, auth=credentials("wrong-" + PASSWORD))
    assert (outcome.state, outcome.status) == (S.DEFERRED, "4.7.8")
    assert outcome.diagnostic == "smtp; 535 5.7.8 Authentication credentials invalid"
    assert outcome.remote_mta == f"dns; {HOST}"
    assert await received(smarthost) == 0
    assert_no_secret(outcome)
    assert "wrong-" not in repr(outcome)


@pytest_twisted.ensureDeferred
async def test_auth_not_offered_defers_without_sending_credentials(smarthost, ca):
    await smarthost.start(users=False)
    outcome = await relay(smarthost, ca=ca, auth=credentials())
    assert (outcome.state, outcome.status) == (S.DEFERRED, "4.7.0")
    assert outcome.diagnostic == (f"x-mtrkmta; {HOST} offers no AUTH: the credentials are not sent")
    assert await received(smarthost) == 0


# -- tls = verify -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_verify_refuses_an_expired_certificate(smarthost, ca):
    await smarthost.start(expired=True)
    outcome = await relay(smarthost, ca=ca, auth=credentials())
    assert (outcome.state, outcome.status) == (S.DEFERRED, "4.7.5")
    assert outcome.diagnostic == (
        f"x-mtrkmta; TLS certificate of {HOST} not verified: the certificate has expired"
    )
    assert await received(smarthost) == 0


@pytest_twisted.ensureDeferred
async def test_verify_refuses_a_certificate_for_another_name(smarthost, ca):
    await smarthost.start("other.example.test")
    outcome = await relay(smarthost, ca=ca, auth=credentials())
    assert (outcome.state, outcome.status) == (S.DEFERRED, "4.7.5")
    assert outcome.diagnostic == (
        f"x-mtrkmta; TLS certificate of {HOST} not verified: "
        f"the certificate is not for {HOST} (it names other.example.test)"
    )
    assert await received(smarthost) == 0


@pytest_twisted.ensureDeferred
async def test_verify_refuses_a_certificate_of_an_unknown_ca(smarthost):
    await smarthost.start()
    outcome = await relay(smarthost, ca=TestCA("another CA"), auth=credentials())
    assert (outcome.state, outcome.status) == (S.DEFERRED, "4.7.5")
    assert outcome.diagnostic == (
        f"x-mtrkmta; TLS certificate of {HOST} not verified: "
        "the certificate is issued by an unknown CA"
    )
    assert await received(smarthost) == 0


@pytest_twisted.ensureDeferred
async def test_verify_against_the_system_cas_refuses_a_private_ca(smarthost):
    await smarthost.start()
    outcome = await relay(smarthost, ca=None)
    assert (outcome.state, outcome.status) == (S.DEFERRED, "4.7.5")
    assert "not verified: the certificate is issued by an unknown CA" in outcome.diagnostic


@pytest_twisted.ensureDeferred
async def test_verify_without_auth_relays_to_a_valid_certificate(smarthost, ca):
    # No AUTH: the smarthost node relays for nobody, so the recipient is one of its own.
    await smarthost.start(users=False)
    outcome = await relay(smarthost, ca=ca, recipient="bob@smarthost.example.test")
    assert (outcome.state, outcome.status) == (S.RELAYED, "2.1.9")
    assert await received(smarthost) == 1


@pytest_twisted.ensureDeferred
async def test_encrypt_does_not_verify_a_wrong_name(smarthost, ca):
    await smarthost.start("other.example.test")
    outcome = await relay(smarthost, tls="encrypt", auth=credentials())
    assert (outcome.state, outcome.status) == (S.RELAYED, "2.1.9")
    assert await received(smarthost) == 1


# -- a whole node, its log and its tracking store -------------------------------------------


def submit(port: int, recipient: str) -> str:
    """Blocking: one message to ``recipient`` through the node's SMTP listener; its queue id."""
    with Wire(port) as wire:
        assert wire.ehlo().code == 250
        assert wire.command("MAIL FROM:<sender@localhost>").code == 250
        assert wire.command(f"RCPT TO:<{recipient}>").code == 250
        queue_id = queue_id_of(wire.data(CONTENT))
        assert wire.command("QUIT").code == 221
    return queue_id


@pytest_twisted.ensureDeferred
async def test_a_node_with_a_wrong_password_defers_and_logs_no_secret(
    tmp_path, smarthost, ca, log_file
):
    await smarthost.start()
    secret_file = tmp_path / "smarthost.auth"
    secret_file.write_text(f"# the smarthost account\n{USER}:{PASSWORD}x\n")
    secret_file.chmod(0o600)
    ca_file = ca.write(tmp_path / "ca.pem")
    port = smarthost.node.port("smtp")
    route = (
        f"relay.example=smtp:tcp:host={HOST}:port={port};tls=verify;ca_file={ca_file};"
        f"auth={secret_file}"
    )
    config = node_config(
        tmp_path / "relay",
        listeners=("smtp",),
        options=(("routes", route), ("durability.fsync", False)),
    )
    node = await start_node(config)
    events: list[QueueEvent] = []
    assert node.queue is not None
    node.queue.observers.append(events.append)
    try:
        queue_id = await in_thread(submit, node.port("smtp"), "bob@relay.example")
        await until(lambda: [u for e in events for u in e.updates], "the attempt's outcome")
        stored = await node.tracking.message(queue_id)
    finally:
        await stop_node(node)
    (update,) = [u for e in events for u in e.updates]
    assert (update.state, update.status) == (S.DEFERRED, "4.7.8")
    assert update.diagnostic == "smtp; 535 5.7.8 Authentication credentials invalid"
    logged = log_file.read_text()
    assert "535 5.7.8 Authentication credentials invalid" in logged
    base64_forms = [
        base64.b64encode(f"\0{USER}\0{PASSWORD}x".encode()).decode(),
        base64.b64encode(f"{PASSWORD}x".encode()).decode(),
    ]
    for secret in (f"{PASSWORD}x", *base64_forms):
        assert secret not in logged
        assert secret not in repr(stored)
        assert secret not in repr(events)


async def relay_through_node(
    tmp_path: Path, recipient: str, options: tuple[tuple[str, object], ...], resolver: Any = None
) -> RecipientUpdate:
    """Submit one message to a relaying node with ``options``; its first recipient update."""
    config = node_config(
        tmp_path / "relay",
        listeners=("smtp",),
        options=(("durability.fsync", False), *options),
    )
    node = await start_node(config, resolver=resolver)
    events: list[QueueEvent] = []
    assert node.queue is not None
    node.queue.observers.append(events.append)
    try:
        await in_thread(submit, node.port("smtp"), recipient)
        await until(lambda: [u for e in events for u in e.updates], "the attempt's outcome")
    finally:
        await stop_node(node)
    return next(u for e in events for u in e.updates)


def far_zone() -> list[Zone]:
    return [
        Zone(
            "far.example",
            {"far.example": [mx(10, "mx.far.example")], "mx.far.example": [a("127.0.0.1")]},
        )
    ]


@pytest.mark.parametrize(
    ("certified", "state", "status"),
    [("mx.far.example", S.RELAYED, "2.1.9"), ("far.example", S.DEFERRED, "4.7.5")],
)
@pytest_twisted.ensureDeferred
async def test_an_mx_route_verifies_the_mx_host_name(
    tmp_path, smarthost, ca, certified, state, status
):
    # The name checked is the MX host name the DNS gave, not the mail domain.
    await smarthost.start(certified, users=False, local=("far.example",))
    ca_file = ca.write(tmp_path / "ca.pem")
    async with serve_dns(reactor, far_zone()) as dns_server:
        update = await relay_through_node(
            tmp_path,
            "bob@far.example",
            (
                ("routes", f"far.example=mx;tls=verify;ca_file={ca_file}"),
                ("delivery.smtp_port", smarthost.node.port("smtp")),
            ),
            resolver=dns_server.resolver(),
        )
    assert (update.state, update.status) == (state, status)
    if state is S.DEFERRED:
        assert update.diagnostic == (
            "x-mtrkmta; TLS certificate of mx.far.example not verified: "
            "the certificate is not for mx.far.example (it names far.example)"
        )
