"""SMTP AUTH (RFC 4954) in the server core, through StringTransport on a fake clock: the limits
on failures per connection and per client address, the growing delays, the bound on waiting
password checks, undecodable responses and over-long SASL lines."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from test_smtp_server import Client, RecordingReceiver
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mtrkmta.auth import PasswordFileChecker, hash_password
from mtrkmta.authlimits import AuthGuard, AuthLimits, MemoryAuthFailures
from mtrkmta.smtp.server import ServerSettings, SMTPServerFactory

USER = "alice"
PASSWORD = "secret"
WINDOW = 900.0
OK = b"235 2.7.0 Authentication successful"
BAD = b"535 5.7.8 Authentication credentials invalid"
CLOSED = b"421 4.7.0 mx.example.test Too many authentication failures"
LOCKED_OUT = b"421 4.7.0 mx.example.test Too many authentication failures from your address"
CANNOT_DECODE = b"501 5.5.2 Cannot decode response"


def plain(user: str = USER, password: str = PASSWORD) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


def auth_plain(password: str = PASSWORD) -> bytes:
    return b"AUTH PLAIN " + plain(password=password) + b"\r\n"


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that takes STARTTLS (the handshake itself is the integration tests')."""

    def startTLS(self, context, normal=True):
        self.tls_context = context


class TLSClient(Client):
    """A client past EHLO, STARTTLS and EHLO again, from ``peer``."""

    def __init__(self, factory, peer=("192.0.2.7", 40000)):
        from twisted.internet.address import IPv4Address

        self.proto = factory.buildProtocol(None)
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", *peer))
        self.proto.makeConnection(self.transport)
        self.send(b"EHLO c.example\r\nSTARTTLS\r\n")
        assert self.lines()[-1] == b"220 2.0.0 Ready to start TLS"
        assert b"250 AUTH PLAIN LOGIN" in self.send(b"EHLO c.example\r\n")


class CountingChecker(InMemoryUsernamePasswordDatabaseDontUse):
    """Twisted's in-memory checker, counting the passwords it was asked to check."""

    def __init__(self, **users):
        super().__init__(**users)
        self.checks = 0

    def requestAvatarId(self, credentials):
        self.checks += 1
        return super().requestAvatarId(credentials)


@pytest.fixture
def checker():
    return CountingChecker(**{USER: PASSWORD.encode()})


def make_factory(clock, checker, **settings):
    settings = {"tls": object(), "checker": checker, **settings}
    return SMTPServerFactory(
        ServerSettings(hostname="mx.example.test", **settings), RecordingReceiver(), clock
    )


def guarded(checker, failures=None, **limits):
    return AuthGuard(checker, AuthLimits(**limits), failures)


def fail_once(client: TLSClient, clock, delay: float) -> list[bytes]:
    """A wrong password: no reply before ``delay`` seconds, then the reply(ies)."""
    assert client.send(auth_plain("wrong")) == []
    clock.advance(delay - 0.001)
    assert client.lines() == []
    clock.advance(0.001)
    return client.lines()


# -- reproduction 1: guessing on one connection ------------------------------------------------


def test_thirty_wrong_passwords_do_not_lead_to_the_right_one(clock, checker):
    # The default limits, around a plain checker: after 3 failures the connection ends.
    client = TLSClient(make_factory(clock, checker))
    client.transport.clear()
    client.proto.dataReceived(auth_plain("wrong") * 30 + auth_plain())
    clock.pump([1] * 60)
    assert client.lines() == [BAD, BAD, BAD, CLOSED]
    assert client.transport.disconnecting
    assert checker.checks == 3
    client.close()


def test_failure_replies_are_delayed_more_and_more(clock, checker):
    # Defaults 1 s and 30 s: the n-th failure waits min(1 * 2**(n-1), 30) s.
    guard = guarded(checker, max_failures=7, failure_delay=1.0, max_failure_delay=10.0)
    client = TLSClient(make_factory(clock, guard))
    for delay in (1, 2, 4, 8, 10, 10):
        assert fail_once(client, clock, delay) == [BAD]
    assert fail_once(client, clock, 10) == [BAD, CLOSED]
    assert client.transport.disconnecting
    client.close()


def test_pipelined_commands_wait_for_the_delayed_failure(clock, checker):
    client = TLSClient(make_factory(clock, checker))
    assert client.send(auth_plain("wrong") + b"NOOP\r\n") == []
    assert client.transport.producerState == "paused"
    clock.advance(1)
    assert client.lines() == [BAD, b"250 2.0.0 Ok"]
    assert client.transport.producerState == "producing"
    client.close()


def test_the_right_password_within_the_limit_still_works(clock, checker):
    client = TLSClient(make_factory(clock, checker))
    assert fail_once(client, clock, 1) == [BAD]
    assert fail_once(client, clock, 2) == [BAD]
    assert client.send(auth_plain()) == [OK]
    client.close()


def test_a_mismatched_authorization_identity_is_a_failure(clock, checker):
    client = TLSClient(make_factory(clock, guarded(checker, max_failures=1)))
    line = b"AUTH PLAIN " + base64.b64encode(f"bob\0{USER}\0{PASSWORD}".encode()) + b"\r\n"
    assert client.send(line) == []
    clock.advance(1)
    assert client.lines() == [BAD, CLOSED]
    assert checker.checks == 0
    client.close()


def test_login_failures_count_too(clock, checker):
    client = TLSClient(make_factory(clock, guarded(checker, max_failures=2)))
    user, wrong = base64.b64encode(USER.encode()), base64.b64encode(b"wrong")
    for delay, expected in ((1, [BAD]), (2, [BAD, CLOSED])):
        assert client.send(b"AUTH LOGIN " + user + b"\r\n") == [b"334 UGFzc3dvcmQ6"]
        assert client.send(wrong + b"\r\n") == []
        clock.advance(delay)
        assert client.lines() == expected
    client.close()


# -- per client address, shared through the failure store -----------------------------------


def test_an_address_over_its_limit_is_refused_without_a_password_check(clock, checker):
    failures = MemoryAuthFailures(WINDOW)
    factory = make_factory(clock, guarded(checker, failures, max_address_failures=4))
    for port, delays in ((1, (1, 2)), (2, (4, 8))):  # two connections, two failures each
        client = TLSClient(factory, ("192.0.2.7", port))
        for delay in delays:
            assert fail_once(client, clock, delay) == [BAD]
        client.close()
    other = TLSClient(factory, ("192.0.2.8", 1))
    assert other.send(auth_plain()) == [OK]  # another address is not affected
    client = TLSClient(factory, ("192.0.2.7", 3))
    assert fail_once(client, clock, 16) == [BAD]  # the 5th: more than 4
    checks = checker.checks
    client.close()
    client = TLSClient(factory, ("192.0.2.7", 4))
    assert client.send(auth_plain()) == [LOCKED_OUT]
    assert client.transport.disconnecting
    assert checker.checks == checks  # the right password was not even looked at
    client.close()
    other.close()


def test_the_delay_grows_with_the_failures_of_the_address(clock, checker):
    # A new connection does not start the delays over: n counts the address's failures.
    failures = MemoryAuthFailures(WINDOW)
    factory = make_factory(clock, guarded(checker, failures))
    for port, delay in ((1, 1), (2, 2), (3, 4)):
        client = TLSClient(factory, ("192.0.2.7", port))
        assert fail_once(client, clock, delay) == [BAD]
        client.close()


def test_failures_are_forgotten_after_the_window(clock, checker):
    failures = MemoryAuthFailures(WINDOW)
    factory = make_factory(clock, guarded(checker, failures, max_address_failures=1))
    client = TLSClient(factory)
    assert fail_once(client, clock, 1) == [BAD]
    assert fail_once(client, clock, 2) == [BAD]
    client.close()
    client = TLSClient(factory)
    assert client.send(auth_plain()) == [LOCKED_OUT]
    client.close()
    clock.advance(WINDOW)
    client = TLSClient(factory)
    assert client.send(auth_plain()) == [OK]
    client.close()


def test_stopping_the_guard_ends_held_replies(clock, checker):
    # At service stop, a session must not keep the service waiting for up to 30 s.
    guard = guarded(checker, max_failure_delay=30.0, failure_delay=30.0)
    factory = make_factory(clock, guard)
    client = TLSClient(factory)
    assert client.send(auth_plain("wrong")) == []
    factory.shutdown()
    assert client.lines() == []
    guard.stop()
    assert client.lines() == [BAD, b"421 4.3.2 mx.example.test Service shutting down"]
    client.close()
    assert clock.getDelayedCalls() == []


# -- reproduction 3: a bound on checks waiting for the checker's threads ------------------------


def test_auth_beyond_the_pending_checks_gets_454_at_once(clock, tmp_path: Path):
    users = tmp_path / "users"
    users.write_text(f"{USER}:{hash_password(PASSWORD, iterations=1000)}\n")
    pool = ThreadPool(minthreads=0, maxthreads=1)  # not started: every check stays waiting
    checker = PasswordFileChecker(users, clock, pool, max_pending=2)
    factory = make_factory(clock, checker)
    clients = [TLSClient(factory, ("192.0.2.7", port)) for port in range(3)]
    assert clients[0].send(auth_plain()) == []
    assert clients[1].send(auth_plain()) == []
    assert clients[2].send(auth_plain()) == [b"454 4.7.0 Temporary authentication failure"]
    assert checker.pending == 2
    for client in clients:
        client.close()


# -- reproduction 4: undecodable responses ------------------------------------------------------


@pytest.mark.parametrize("mechanism", [b"PLAIN", b"LOGIN"])
def test_non_ascii_or_undecodable_sasl_data_is_refused(clock, checker, mechanism):
    # RFC 4954 §4: responses are base64; anything else gets 501 and the session goes on.
    client = TLSClient(make_factory(clock, checker))
    replies = client.send(
        b"AUTH " + mechanism + " AGFsaWNlAHPDqWNyZXQ=é\r\n".encode() + b"NOOP\r\n"
    )
    assert replies == [CANNOT_DECODE, b"250 2.0.0 Ok"]
    for response in ("é".encode(), b"\xff\xfe", "AGFsaWNlAHPDqWNyZXQ=é".encode()):
        assert client.send(b"AUTH " + mechanism + b"\r\n")[0].startswith(b"334 ")
        assert client.send(response + b"\r\nNOOP\r\n") == [CANNOT_DECODE, b"250 2.0.0 Ok"]
    assert not client.transport.disconnecting
    assert checker.checks == 0
    client.close()


# -- reproduction 5: an over-long SASL line ends the exchange (RFC 4954 §4) ---------------------


@pytest.mark.parametrize("mechanism", [b"PLAIN", b"LOGIN"])
def test_overlong_sasl_line_ends_the_exchange(clock, checker, mechanism):
    client = TLSClient(make_factory(clock, checker))
    assert client.send(b"AUTH " + mechanism + b"\r\n")[0].startswith(b"334 ")
    replies = client.send(b"A" * 3000 + b"\r\nMAIL FROM:<a@b.test>\r\n")
    assert replies == [b"500 5.5.6 Authentication Exchange line is too long", b"250 2.1.0 Ok"]
    assert checker.checks == 0
    client.close()
