"""AUTH toward a next hop and ``tls = verify``: route options checked at load, the AUTH
encodings (RFC 4616, LOGIN) and decisions (RFC 4954), the client's bytes over a StringTransport."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import pytest_twisted
from test_queue_service import Node, started
from twisted.internet.defer import succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mtrkmta.config import ConfigError, Override, RelayCredentials, load_config
from mtrkmta.config.show import render
from mtrkmta.delivery.interfaces import NextHop, Server
from mtrkmta.routing.router import Router
from mtrkmta.smtp.client import ClientSettings, SessionError, SMTPClient, TLSPolicy
from mtrkmta.smtp.clientauth import (
    choose_mechanism,
    failure_status,
    login_responses,
    plain_command,
    redact,
)
from mtrkmta.smtp.reply import Reply
from mtrkmta.tls import VerifyingClientTLS

USER = "relay"
PASSWORD = "pa:ss word"
ENDPOINT = "tcp:host=smarthost.example.net:port=587"


def fqdn() -> str:
    return "mx.example.org"


def secret(tmp_path: Path, text: str = f"{USER}:{PASSWORD}\n", mode: int = 0o600) -> Path:
    path = tmp_path / "smarthost.auth"
    path.write_text(text)
    path.chmod(mode)
    return path


def load_route(tmp_path: Path, table: str):
    path = tmp_path / "mtrkmta.toml"
    path.write_text(f'[routes]\n"relay.example" = {table}\n')
    return load_config(path, fqdn=fqdn).route_for("relay.example")


def route_error(tmp_path: Path, table: str) -> str:
    path = tmp_path / "mtrkmta.toml"
    path.write_text(f'[routes]\n"relay.example" = {table}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, fqdn=fqdn)
    return str(info.value).removeprefix(f'config error: {path}: routes."relay.example": ')


# -- route options ----------------------------------------------------------------------------


def test_route_table_with_verify_ca_file_and_auth(tmp_path):
    auth = secret(tmp_path)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    route = load_route(
        tmp_path,
        f'{{ target = "smtp:{ENDPOINT}", tls = "verify", ca_file = "ca.pem", '
        f'auth = "smarthost.auth" }}',
    )
    assert (route.tls, route.ca.path, route.auth) == (
        "verify",
        ca,
        RelayCredentials(auth, USER, PASSWORD),  # the password: all after the first colon
    )
    assert PASSWORD not in repr(route)
    assert route.ca.pem not in repr(route).encode()


def test_route_option_string_with_suffixes(tmp_path):
    auth = secret(tmp_path, f"# the account\n\n{USER}:{PASSWORD}\n")
    text = f"relay.example=smtp:{ENDPOINT};tls=encrypt;auth={auth}"
    config = load_config(None, (Override("--route", "routes", text),), fqdn=fqdn)
    route = config.route_for("relay.example")
    assert (route.endpoint, route.tls, route.auth) == (
        ENDPOINT,
        "encrypt",
        RelayCredentials(auth, USER, PASSWORD),
    )
    (line,) = [x for x in render(config, ["routes"]) if "relay.example" in x]
    assert line == f'routes."relay.example" = "smtp:{ENDPOINT};tls=encrypt;auth={auth}"'


def test_auth_is_refused_without_tls(tmp_path):
    secret(tmp_path)
    for tls in ("", ', tls = "may"', ', tls = "none"'):
        assert route_error(
            tmp_path, f'{{ target = "smtp:{ENDPOINT}"{tls}, auth = "smarthost.auth" }}'
        ) == (
            'auth needs tls = "encrypt" or "verify" on the same route '
            "(credentials are never sent in clear)"
        )


def test_auth_is_refused_on_lmtp_routes(tmp_path):
    secret(tmp_path)
    assert route_error(
        tmp_path,
        '{ target = "lmtp:unix:path=/run/lmtp", tls = "encrypt", auth = "smarthost.auth" }',
    ) == ("auth is for smtp and mx routes, not lmtp")


def test_credentials_readable_by_others_are_refused_with_the_chmod(tmp_path):
    path = secret(tmp_path, mode=0o644)
    assert route_error(
        tmp_path, f'{{ target = "smtp:{ENDPOINT}", tls = "verify", auth = "smarthost.auth" }}'
    ) == (f"{path} is readable by group or others (mode 644); run chmod 600 {path}")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "must hold exactly one USERNAME:PASSWORD line, found 0"),
        ("a:b\nc:d\n", "must hold exactly one USERNAME:PASSWORD line, found 2"),
        ("no-colon\n", ": expected one line USERNAME:PASSWORD (both non-empty)"),
        (":only-password\n", ": expected one line USERNAME:PASSWORD (both non-empty)"),
        ("user:\n", ": expected one line USERNAME:PASSWORD (both non-empty)"),
    ],
)
def test_malformed_credentials_files(tmp_path, text, problem):
    path = secret(tmp_path, text)
    error = route_error(
        tmp_path, f'{{ target = "smtp:{ENDPOINT}", tls = "verify", auth = "smarthost.auth" }}'
    )
    assert error == f"{path}{' ' if problem[0] != ':' else ''}{problem}"


def test_missing_credentials_file(tmp_path):
    assert route_error(
        tmp_path, f'{{ target = "smtp:{ENDPOINT}", tls = "verify", auth = "nothere" }}'
    ) == (f"no such file: {tmp_path / 'nothere'}")


def test_ca_file_needs_verify_and_a_certificate(tmp_path):
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    assert route_error(
        tmp_path, f'{{ target = "smtp:{ENDPOINT}", tls = "encrypt", ca_file = "ca.pem" }}'
    ) == ('ca_file needs tls = "verify" on the same route')
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    assert route_error(
        tmp_path, f'{{ target = "smtp:{ENDPOINT}", tls = "verify", ca_file = "ca.pem" }}'
    ) == (f"{tmp_path / 'ca.pem'} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")


def test_router_hands_the_credentials_and_ca_to_the_next_hop(tmp_path):
    secret(tmp_path)
    config_path = tmp_path / "mtrkmta.toml"
    config_path.write_text(
        "[routes]\n"
        f'"a.example" = {{ target = "smtp:{ENDPOINT}", tls = "verify", auth = "smarthost.auth" }}\n'
        f'"b.example" = {{ target = "smtp:{ENDPOINT}", tls = "verify" }}\n'
    )
    config = load_config(config_path, fqdn=fqdn)
    router = Router(config.routes, (), resolver=None)  # type: ignore[arg-type]
    a, b = router.known("a.example"), router.known("b.example")
    assert a.auth == RelayCredentials(tmp_path / "smarthost.auth", USER, PASSWORD)
    assert (a.tls, b.tls, b.auth) == ("verify", "verify", None)
    assert a.destination == b.destination  # one smarthost, one concurrency limit


# -- the AUTH encodings and decisions ------------------------------------------------------------

CREDENTIALS = RelayCredentials(Path("/etc/mtrkmta/smarthost.auth"), "tim", "tanstaaftanstaaf")


def test_plain_initial_response_rfc_4616():
    # RFC 4616 §4 example: authcid "tim", passwd "tanstaaftanstaaf", empty authzid.
    assert plain_command(CREDENTIALS) == "AUTH PLAIN AHRpbQB0YW5zdGFhZnRhbnN0YWFm"


def test_login_responses_are_username_then_password():
    assert login_responses(CREDENTIALS) == ("dGlt", "dGFuc3RhYWZ0YW5zdGFhZg==")


@pytest.mark.parametrize(
    ("auth", "chosen"),
    [("PLAIN LOGIN", "PLAIN"), ("login cram-md5", "LOGIN"), ("CRAM-MD5", None), (None, None)],
)
def test_mechanism_choice(auth, chosen):
    keywords = {"PIPELINING": ""} | ({"AUTH": auth} if auth is not None else {})
    assert choose_mechanism(keywords) == chosen


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (Reply(535, "5.7.8", ("Authentication credentials invalid",)), "4.7.8"),
        (Reply(535, None, ("bad",)), "4.7.8"),
        (Reply(534, "5.7.9", ("too weak",)), "4.7.9"),
        (Reply(454, "4.7.0", ("try later",)), "4.7.0"),
        (Reply(504, None, ("unknown mechanism",)), "4.7.0"),
    ],
)
def test_every_refusal_defers(reply, status):
    # RFC 4954 §6 codes; deferred like Postfix's default smtp_sasl_auth_soft_bounce.
    assert failure_status(reply) == status


def test_redact_hides_an_echoed_secret():
    echoed = Reply(535, "5.7.8", ("bad AHRpbQB0YW5zdGFhZnRhbnN0YWFm for tanstaaftanstaaf",))
    assert redact(echoed, CREDENTIALS).lines == ("bad [credentials] for [credentials]",)


# -- the client over a StringTransport ------------------------------------------------------------


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that takes STARTTLS (the handshake is the integration tests')."""

    tls_context: object = None

    def startTLS(self, context, normal=True):
        self.tls_context = context


class Session:
    """An SMTPClient on a TLSStringTransport; ``say`` feeds server replies."""

    def __init__(self, tls: TLSPolicy, auth: RelayCredentials | None = CREDENTIALS) -> None:
        self.client = SMTPClient(
            ClientSettings("relay.example.test"),
            Clock(),
            server_name="smarthost.example.net",
            tls=tls,
            auth=auth,
        )
        self.transport = TLSStringTransport()
        self.client.makeConnection(self.transport)
        self.ready = self.client.when_ready()
        self.outcome: list[object] = []
        self.ready.addBoth(self.outcome.append)

    def say(self, *lines: str) -> bytes:
        """Feed reply lines; what the client wrote in answer."""
        self.transport.clear()
        self.client.dataReceived(b"".join(line.encode() + b"\r\n" for line in lines))
        return self.transport.value()

    def to_tls(self, after: str) -> bytes:
        """Greeting, EHLO with STARTTLS, 220, handshake; the EHLO sent over TLS."""
        assert self.say("220 smarthost ESMTP") == b"EHLO relay.example.test\r\n"
        assert self.say("250-smarthost", "250 STARTTLS") == b"STARTTLS\r\n"
        self.say("220 2.0.0 Ready")
        self.client.handshakeCompleted()
        return self.say(*after.split("\n")) if after else b""

    def error(self) -> SessionError:
        (failure,) = self.outcome
        assert isinstance(failure, Failure)
        assert isinstance(failure.value, SessionError)
        return failure.value


def test_auth_plain_after_starttls_and_the_second_ehlo():
    session = Session("verify")
    sent = session.to_tls("")
    assert isinstance(session.transport.tls_context, VerifyingClientTLS)
    assert session.transport.tls_context.hostname == "smarthost.example.net"
    assert session.say("250-smarthost", "250 AUTH PLAIN LOGIN") == (
        b"AUTH PLAIN AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n"
    )
    assert sent == b""
    assert session.say("235 2.7.0 Authentication successful") == b""
    assert session.outcome == [None] and session.client.authenticated


def test_auth_login_when_plain_is_not_offered():
    session = Session("encrypt")
    session.to_tls("")
    assert session.say("250-smarthost", "250 AUTH LOGIN") == b"AUTH LOGIN\r\n"
    assert session.say("334 VXNlcm5hbWU6") == b"dGlt\r\n"
    assert session.say("334 UGFzc3dvcmQ6") == b"dGFuc3RhYWZ0YW5zdGFhZg==\r\n"
    assert session.say("235 2.7.0 Authentication successful") == b""
    assert session.outcome == [None]


def test_refused_credentials_fail_the_session_with_4_7_8_and_no_secret():
    session = Session("verify")
    session.to_tls("250-smarthost\n250 AUTH PLAIN")
    assert session.say("535 5.7.8 Authentication credentials invalid") == b""
    error = session.error()
    assert (error.status, error.message) == ("4.7.8", "smarthost.example.net refused AUTH PLAIN")
    assert error.reply == Reply(535, "5.7.8", ("Authentication credentials invalid",))
    assert "tanstaaf" not in repr(error.__dict__) and "AHRpbQ" not in repr(error.__dict__)


def test_no_auth_offered_sends_no_credentials():
    session = Session("verify")
    session.to_tls("")
    assert session.say("250-smarthost", "250 PIPELINING") == b""
    error = session.error()
    assert (error.status, error.message) == (
        "4.7.0",
        "smarthost.example.net offers no AUTH: the credentials are not sent",
    )


def test_no_starttls_offered_sends_no_credentials_in_clear():
    session = Session("encrypt")
    assert session.say("220 smarthost ESMTP") == b"EHLO relay.example.test\r\n"
    assert session.say("250-smarthost", "250 AUTH PLAIN LOGIN") == b""
    assert session.error().status == "4.7.4"
    assert b"AUTH" not in session.transport.value()


def test_a_failed_verification_is_4_7_5_with_the_reason():
    session = Session("verify")
    session.say("220 smarthost ESMTP")
    session.say("250-smarthost", "250 STARTTLS")
    session.say("220 2.0.0 Ready")
    verifier = session.transport.tls_context
    assert isinstance(verifier, VerifyingClientTLS)
    # OpenSSL's verify callback with X509_V_ERR_CERT_HAS_EXPIRED (10) at depth 0.
    assert verifier._verify(None, None, 10, 0, 0) is False  # type: ignore[arg-type]
    session.client.connectionLost(Failure(ConnectionError("handshake failed")))
    error = session.error()
    assert (error.status, error.message) == (
        "4.7.5",
        "TLS certificate of smarthost.example.net not verified: the certificate has expired",
    )


def test_encrypt_uses_the_unverified_context():
    session = Session("encrypt", auth=None)
    session.to_tls("250-smarthost\n250 AUTH PLAIN")
    assert not isinstance(session.transport.tls_context, VerifyingClientTLS)
    assert session.outcome == [None] and not session.client.authenticated
    assert b"AUTH" not in session.transport.value()


def test_credentials_file_content_round_trip_base64(tmp_path):
    # The password may hold spaces and colons: everything after the first colon.
    path = secret(tmp_path)
    route = load_route(
        tmp_path, f'{{ target = "smtp:{ENDPOINT}", tls = "verify", auth = "{path}" }}'
    )
    assert route.auth is not None
    wire = plain_command(route.auth).split(" ")[2]
    assert base64.b64decode(wire) == f"\0{USER}\0{PASSWORD}".encode()


def test_a_challenge_to_plain_with_initial_response_is_cancelled():
    # RFC 4954 §4: "*" cancels; the refusal that follows decides (deferred).
    session = Session("verify")
    session.to_tls("250-smarthost\n250 AUTH PLAIN")
    assert session.say("334 ") == b"*\r\n"
    assert session.say("501 5.0.0 Authentication cancelled") == b""
    assert session.error().status == "4.0.0"


# -- the queue never mixes credentials in one attempt ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_one_smarthost_with_two_accounts_gets_two_attempts():
    node = Node()
    accounts = {
        "one.example": RelayCredentials(Path("/etc/mtrkmta/one.auth"), "one", "x"),
        "two.example": RelayCredentials(Path("/etc/mtrkmta/two.auth"), "two", "y"),
    }
    hops = {
        domain: NextHop(
            transport="smtp",
            destination="route:smtp:tcp:host=127.0.0.1:port=9",
            servers=(Server("127.0.0.1", "tcp:host=127.0.0.1:port=9"),),
            tls="verify",
            auth=account,
        )
        for domain, account in accounts.items()
    }
    node.router.route = lambda domain: succeed(hops[domain])  # type: ignore[method-assign]
    await started(node)
    try:
        await node.accept("q0100", "a@one.example", "b@two.example", "c@one.example")
        await node.advance(0)
        assert sorted(node.transport.attempts) == [
            ("q0100", ("a@one.example", "c@one.example")),
            ("q0100", ("b@two.example",)),
        ]
    finally:
        await node.close()
