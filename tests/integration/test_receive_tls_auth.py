"""STARTTLS (RFC 3207) and AUTH (RFC 4954) on the receive path, over real loopback sockets:
what is offered when, the STARTTLS command-injection defence, TLS >= 1.2 (RFC 8996), PLAIN and
LOGIN, and the submission listener's rules."""

from __future__ import annotations

import base64
import ssl
import threading

import pytest
import pytest_twisted
from certs import tls_options
from smtpwire import (
    Wire,
    WireError,
    client_tls_context,
    in_thread,
    message,
    nothing_queued,
    queue_id_of,
    queued_everywhere,
    running_node,
    until,
)

from mtrkmta.auth import hash_password
from mtrkmta.testing import database_url, node_config, start_node, stop_node

USER = "alice"
PASSWORD = "secret"
SENDER = "MAIL FROM:<alice@client.example>"
KEYWORDS = ["PIPELINING", "SIZE 36700160", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN", "MTRK"]
KEYWORDS.insert(KEYWORDS.index("8BITMIME") + 1, "CHUNKING")  # RFC 3030, after 8BITMIME
KEYWORDS.insert(KEYWORDS.index("CHUNKING") + 1, "BINARYMIME")  # RFC 3030 §3, with CHUNKING
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_BAD = "535 5.7.8 Authentication credentials invalid"
AUTH_CANCELLED = "501 5.0.0 Authentication cancelled"
TOO_MANY = "421 4.7.0 mx.example.test Too many authentication failures"
LOCKED_OUT = "421 4.7.0 mx.example.test Too many authentication failures from your address"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


PLAIN = b64(f"\0{USER}\0{PASSWORD}")


@pytest.fixture
def tls_only(tmp_path):
    """node_config options: STARTTLS with a fresh self-signed certificate, no AUTH."""
    return tls_options(tmp_path / "tls")


@pytest.fixture
def tls_and_auth(tmp_path, tls_only):
    """node_config options: STARTTLS plus a users file with alice:secret.

    Replies to failures are held 10 ms, 20 ms, ... instead of 1 s, 2 s, ...
    """
    users = tmp_path / "users"
    users.write_text(f"# test users\n{USER}:{hash_password(PASSWORD, iterations=1000)}\n")
    return (*tls_only, ("auth.users_file", str(users)), ("auth.failure_delay", "0.01s"))


def secure(wire: Wire) -> None:
    """EHLO, STARTTLS, handshake, EHLO again."""
    assert wire.ehlo().code == 250
    assert wire.command("STARTTLS").line == "220 2.0.0 Ready to start TLS"
    wire.starttls()
    assert wire.ehlo().code == 250


# -- what EHLO offers --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_starttls_offered_only_with_a_certificate(tmp_path, tls_only):
    async with (
        running_node(tmp_path / "plain") as plain,
        running_node(tmp_path / "tls", options=tls_only) as with_tls,
    ):

        def talk(port):
            with Wire(port) as wire:
                return wire.ehlo(), wire.command("STARTTLS")

        no_cert, refused = await in_thread(talk, plain.port("smtp"))
        cert, _ = await in_thread(talk, with_tls.port("smtp"))
    assert "STARTTLS" not in no_cert.keywords
    assert refused.line == "502 5.5.1 STARTTLS not available"
    assert cert.keywords == [*KEYWORDS, "SMTPUTF8", "DELIVERBY", "STARTTLS"]


@pytest_twisted.ensureDeferred
async def test_auth_offered_only_after_tls_and_starttls_no_longer(tmp_path, tls_and_auth):
    # RFC 3207 §4.2 (pre-TLS state discarded): the post-TLS EHLO list is fresh, offers AUTH
    # and no longer STARTTLS (RFC 3207 §4.2).
    async with running_node(tmp_path, options=tls_and_auth) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                before = wire.ehlo()
                assert wire.command("STARTTLS").code == 220
                wire.starttls()
                after = wire.ehlo()
                return before, after, wire.command("STARTTLS"), wire.tls_version

        before, after, again, version = await in_thread(talk)
    assert before.keywords == [*KEYWORDS, "SMTPUTF8", "DELIVERBY", "STARTTLS"]
    assert after.keywords == [*KEYWORDS, "SMTPUTF8", "DELIVERBY", "AUTH PLAIN LOGIN"]
    assert again.line == "503 5.5.1 TLS already active"
    assert version in ("TLSv1.2", "TLSv1.3")


@pytest_twisted.ensureDeferred
async def test_no_auth_after_tls_without_users_file(tmp_path, tls_only):
    async with running_node(tmp_path, options=tls_only) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                return wire.ehlo(), wire.command(f"AUTH PLAIN {PLAIN}")

        ehlo, auth = await in_thread(talk)
    assert not [k for k in ehlo.keywords if k.startswith("AUTH")]
    assert auth.line == "502 5.5.1 AUTH not available"


# -- STARTTLS ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_commands_injected_after_starttls_are_discarded(tmp_path, tls_and_auth):
    # RFC 3207 §4.2 / CVE-2011-0411: commands sent in clear in the same packet as
    # STARTTLS must not run, neither before nor after the handshake; the TLS session
    # starts from scratch (EHLO required again).
    async with running_node(tmp_path, options=tls_and_auth) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                wire.send(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<alice@localhost>\r\n")
                ready = wire.reply()
                wire.starttls()  # fails if anything but the 220 came in clear
                first = wire.command("RCPT TO:<alice@localhost>")
                mail = wire.command(SENDER)
                ehlo = wire.ehlo()
                after = [wire.command(SENDER), wire.command("RCPT TO:<alice@localhost>")]
                return ready, first, mail, ehlo, after

        ready, first, mail, ehlo, after = await in_thread(talk)
        assert ready.line == "220 2.0.0 Ready to start TLS"
        # The first reply under TLS answers our RCPT: the injected MAIL (and RCPT) never ran.
        assert first.line == "503 5.5.1 Need MAIL before RCPT"
        assert mail.line == "503 5.5.1 Send EHLO first"
        assert "STARTTLS" not in ehlo.keywords
        assert "AUTH PLAIN LOGIN" in ehlo.keywords
        assert [r.line for r in after] == ["250 2.1.0 Ok", "250 2.1.5 Ok"]
        await nothing_queued(node)


@pytest_twisted.ensureDeferred
async def test_starttls_with_an_argument_is_refused(tmp_path, tls_only):
    async with running_node(tmp_path, options=tls_only) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                return wire.command("STARTTLS now"), wire.command("NOOP")

        refused, noop = await in_thread(talk)
    assert refused.line == "501 5.5.4 Syntax: STARTTLS"
    assert noop.line == "250 2.0.0 Ok"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_tls_older_than_1_2_is_refused(tmp_path, tls_only):
    # Negotiated protection checked (as RFC 3887 §11 asks of MTQP); RFC 8996: no TLS 1.0/1.1.
    async with running_node(tmp_path, options=tls_only) as node:

        def old_client():
            context = client_tls_context(
                minimum=ssl.TLSVersion.TLSv1, maximum=ssl.TLSVersion.TLSv1_1
            )
            try:
                context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this OpenSSL offer TLS 1.1
            except ssl.SSLError:
                return "client cannot offer TLS 1.1"
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                assert wire.command("STARTTLS").code == 220
                try:
                    wire.starttls(context)
                except ssl.SSLError as error:
                    return error.reason
                return f"negotiated {wire.tls_version}"

        def new_client():
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                return wire.tls_version, wire.command("NOOP").line

        outcome = await in_thread(old_client)
        version, noop = await in_thread(new_client)
    # The local OpenSSL either offered TLS 1.1 and the server answered with a
    # protocol_version alert, or could not offer it at all (then only the check below).
    assert outcome in (
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "NO_CIPHERS_AVAILABLE",
        "NO_PROTOCOLS_AVAILABLE",
        "UNSUPPORTED_PROTOCOL",
        "client cannot offer TLS 1.1",
    ), outcome
    assert version in ("TLSv1.2", "TLSv1.3")
    assert noop == "250 2.0.0 Ok"


@pytest_twisted.ensureDeferred
async def test_message_received_over_tls_is_recorded_as_esmtps(tmp_path, tls_only):
    async with running_node(tmp_path, options=tls_only) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                wire.command(SENDER)
                wire.command("RCPT TO:<bob@localhost>")
                return wire.data(message())

        stored = await queued_everywhere(node, queue_id_of(await in_thread(talk)))
        assert stored.client.protocol == "ESMTPS"
        assert stored.client.authenticated_as is None


# -- AUTH ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_auth_before_tls_needs_encryption(tmp_path, tls_and_auth):
    async with running_node(tmp_path, options=tls_and_auth) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                ehlo = wire.ehlo()
                return ehlo, wire.command(f"AUTH PLAIN {PLAIN}"), wire.command("AUTH LOGIN")

        ehlo, plain, login = await in_thread(talk)
    assert "AUTH PLAIN LOGIN" not in ehlo.keywords
    assert plain.line == "538 5.7.11 Encryption required for requested authentication mechanism"
    assert login.line == plain.line


@pytest_twisted.ensureDeferred
async def test_auth_plain_with_initial_response(tmp_path, tls_and_auth):
    async with running_node(tmp_path, options=tls_and_auth) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                return wire.command(f"AUTH PLAIN {PLAIN}"), wire.command(f"AUTH PLAIN {PLAIN}")

        auth, again = await in_thread(talk)
    assert auth.line == AUTH_OK
    assert again.line == "503 5.5.1 Already authenticated"


@pytest_twisted.ensureDeferred
async def test_auth_plain_after_empty_challenge(tmp_path, tls_and_auth):
    async with running_node(tmp_path, options=tls_and_auth) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                return wire.command("auth plain"), wire.command(PLAIN)

        challenge, auth = await in_thread(talk)
    assert challenge.code == 334 and challenge.texts in ((), ("",))
    assert auth.line == AUTH_OK


@pytest_twisted.ensureDeferred
async def test_auth_login_challenge_and_response(tmp_path, tls_and_auth):
    async with running_node(tmp_path, options=tls_and_auth) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                return (
                    wire.command("AUTH LOGIN"),
                    wire.command(b64(USER)),
                    wire.command(b64(PASSWORD)),
                )

        username, password, auth = await in_thread(talk)
    assert username.line == "334 " + b64("Username:")
    assert password.line == "334 " + b64("Password:")
    assert auth.line == AUTH_OK


@pytest_twisted.ensureDeferred
async def test_auth_login_with_initial_username(tmp_path, tls_and_auth):
    async with running_node(tmp_path, options=tls_and_auth) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                return wire.command(f"AUTH LOGIN {b64(USER)}"), wire.command(b64(PASSWORD))

        password, auth = await in_thread(talk)
    assert password.line == "334 " + b64("Password:")
    assert auth.line == AUTH_OK


@pytest_twisted.ensureDeferred
async def test_wrong_credentials_are_refused_and_session_continues(tmp_path, tls_and_auth):
    options = (*tls_and_auth, ("auth.max_failures", 5))
    async with running_node(tmp_path, options=options) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                replies = [
                    wire.command(f"AUTH PLAIN {b64(f'{USER}{chr(0)}{USER}{chr(0)}wrong')}"),
                    wire.command(f"AUTH PLAIN {b64(f'{chr(0)}mallory{chr(0)}{PASSWORD}')}"),
                    wire.command(f"AUTH PLAIN {b64(f'bob{chr(0)}{USER}{chr(0)}{PASSWORD}')}"),
                ]
                wire.command("AUTH LOGIN")
                wire.command(b64(USER))
                replies.append(wire.command(b64("Secret")))
                replies.append(wire.command(f"AUTH PLAIN {PLAIN}"))
                return replies

        replies = await in_thread(talk)
    assert [r.line for r in replies] == [AUTH_BAD, AUTH_BAD, AUTH_BAD, AUTH_BAD, AUTH_OK]


@pytest_twisted.ensureDeferred
async def test_star_cancels_authentication(tmp_path, tls_and_auth):
    async with running_node(tmp_path, options=tls_and_auth, listeners=("submission",)) as node:

        def talk():
            with Wire(node.port("submission")) as wire:
                secure(wire)
                replies = [wire.command("AUTH PLAIN"), wire.command("*")]
                replies += [wire.command("AUTH LOGIN"), wire.command("*")]
                replies += [
                    wire.command("AUTH LOGIN"),
                    wire.command(b64(USER)),
                    wire.command("*"),
                ]
                replies.append(wire.command(SENDER))  # still not authenticated
                return replies

        replies = await in_thread(talk)
    assert [r.code for r in replies] == [334, 501, 334, 501, 334, 334, 501, 530]
    assert replies[1].line == replies[3].line == replies[6].line == AUTH_CANCELLED
    assert replies[7].line == "530 5.7.0 Authentication required"


@pytest_twisted.ensureDeferred
async def test_malformed_auth_responses(tmp_path, tls_and_auth):
    async with running_node(tmp_path, options=tls_and_auth) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                return [
                    wire.command("AUTH CRAM-MD5"),
                    wire.command("AUTH PLAIN not*base64"),
                    wire.command(f"AUTH PLAIN {b64('no separators')}"),
                    wire.command("AUTH"),
                    wire.command("NOOP"),
                ]

        replies = await in_thread(talk)
    assert [r.line for r in replies] == [
        "504 5.5.4 Unrecognized authentication type",
        "501 5.5.2 Cannot decode response",
        "501 5.5.2 Malformed PLAIN response",
        "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
        "250 2.0.0 Ok",
    ]


@pytest_twisted.ensureDeferred
async def test_auth_not_allowed_inside_a_transaction(tmp_path, tls_and_auth):
    async with running_node(tmp_path, options=tls_and_auth) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                wire.command(SENDER)
                return wire.command(f"AUTH PLAIN {PLAIN}")

        assert (
            await in_thread(talk)
        ).line == "503 5.5.1 AUTH not permitted during a mail transaction"


# -- limits on password guessing ------------------------------------------------------------


def wrong(n: int = 0) -> str:
    return f"AUTH PLAIN {b64(f'{chr(0)}{USER}{chr(0)}wrong{n}')}"


def guess_until_closed(wire: Wire, attempts: int) -> list[str]:
    """Up to ``attempts`` wrong passwords, then the right one; every reply line until closed."""
    lines: list[str] = []
    try:
        for n in range(attempts):
            wire.send(wrong(n).encode() + b"\r\n")
            lines.append(wire.reply().line)
        wire.send(f"AUTH PLAIN {PLAIN}\r\n".encode())
        while True:
            lines.append(wire.reply().line)
    except (WireError, OSError):
        return lines


@pytest_twisted.ensureDeferred
async def test_thirty_wrong_passwords_then_the_right_one_do_not_get_in(tmp_path, tls_and_auth):
    # Reproduction: 30 wrong passwords on one connection, then the right one, got 235.
    async with running_node(tmp_path, options=tls_and_auth) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                guessed = guess_until_closed(wire, 30)
            with Wire(node.port("smtp")) as wire:  # the owner, on a new connection, may
                secure(wire)
                return guessed, wire.command(f"AUTH PLAIN {PLAIN}")

        guessed, owner = await in_thread(talk)
    assert guessed == [AUTH_BAD, AUTH_BAD, AUTH_BAD, TOO_MANY]
    assert owner.line == AUTH_OK


@pytest_twisted.ensureDeferred
async def test_an_address_with_too_many_failures_is_refused_even_the_right_password(
    tmp_path, tls_and_auth
):
    options = (*tls_and_auth, ("auth.max_failures", 2), ("auth.max_address_failures", 3))
    async with running_node(tmp_path, options=options) as node:

        def talk():
            guessed = []
            for _ in range(2):
                with Wire(node.port("smtp")) as wire:
                    secure(wire)
                    guessed.append(guess_until_closed(wire, 30))
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                return guessed, wire.command(f"AUTH PLAIN {PLAIN}"), wire.expect_closed()

        guessed, refused, rest = await in_thread(talk)
    assert guessed == [[AUTH_BAD, AUTH_BAD, TOO_MANY]] * 2
    assert refused.line == LOCKED_OUT
    assert rest == b""


@pytest_twisted.ensureDeferred
async def test_failures_on_one_node_count_on_another_sharing_its_database(tmp_path, tls_and_auth):
    # Worker processes and nodes on one database share the count per client address.
    shared = tmp_path / "shared"
    shared.mkdir()
    url = await in_thread(database_url, shared)
    options = (
        *tls_and_auth,
        ("server.database", url),
        ("auth.max_failures", 2),
        ("auth.max_address_failures", 3),
    )
    node_a = await start_node(
        node_config(tmp_path / "a", options=(*options, ("server.node_id", "a"))), deliver=False
    )
    try:
        node_b = await start_node(
            node_config(tmp_path / "b", options=(*options, ("server.node_id", "b"))),
            deliver=False,
        )
        try:

            def talk():
                guessed = []
                for _ in range(2):
                    with Wire(node_a.port("smtp")) as wire:
                        secure(wire)
                        guessed.append(guess_until_closed(wire, 30))
                with Wire(node_b.port("smtp")) as wire:
                    secure(wire)
                    return guessed, wire.command(f"AUTH PLAIN {PLAIN}")

            guessed, at_b = await in_thread(talk)
        finally:
            await stop_node(node_b)
    finally:
        await stop_node(node_a)
    assert guessed == [[AUTH_BAD, AUTH_BAD, TOO_MANY]] * 2
    assert at_b.line == LOCKED_OUT


@pytest_twisted.ensureDeferred
async def test_password_checks_do_not_wait_for_the_io_threads(tmp_path, tls_and_auth):
    # Reproduction: the checks ran in the pool Maildir delivery uses; 40 connections failing
    # AUTH slowed a delivery from 0.02 s to 2 s. Here every io thread is busy, and AUTH works.
    async with running_node(tmp_path, options=tls_and_auth) as node:
        busy, release = threading.Semaphore(0), threading.Event()

        def occupy():
            busy.release()
            release.wait(30)

        for _ in range(node.threadpool.max):
            node.threadpool.callInThread(occupy)
        try:
            for _ in range(node.threadpool.max):
                await until(lambda: busy.acquire(blocking=False), "an io thread to be taken")

            def talk():
                with Wire(node.port("smtp")) as wire:
                    secure(wire)
                    return wire.command(wrong()), wire.command(f"AUTH PLAIN {PLAIN}")

            failed, auth = await in_thread(talk)
        finally:
            release.set()
        assert (failed.line, auth.line) == (AUTH_BAD, AUTH_OK)
        assert node.auth.checker.threadpool is node.auth_pool is not node.threadpool


@pytest_twisted.ensureDeferred
async def test_a_held_failure_reply_does_not_hold_up_the_stop(tmp_path, tls_and_auth):
    options = (*tls_and_auth, ("auth.failure_delay", "1m"), ("auth.max_failure_delay", "1m"))
    node = await start_node(node_config(tmp_path / "data", options=options), deliver=False)
    wire = None
    try:
        wire = await in_thread(Wire, node.port("smtp"))
        await in_thread(secure, wire)
        await in_thread(wire.send, wrong().encode() + b"\r\n")
        await in_thread(wire.expect_silence)  # the 535 is held for a minute
        stopped = stop_node(node)

        def goodbye():
            with wire:
                return [wire.reply().line, wire.reply().line], wire.expect_closed()

        replies, rest = await in_thread(goodbye)  # within the 5 s timeout of each read
        await stopped
    finally:
        if wire is not None:
            wire.close()
        await stop_node(node)
    assert replies == [AUTH_BAD, "421 4.3.2 mx.example.test Service shutting down"]
    assert rest == b""


@pytest_twisted.ensureDeferred
async def test_a_stop_during_a_password_check_answers_it_then_closes(tmp_path, tls_and_auth):
    # The 235 comes first, then 421; the connection (under TLS) and the stop both end.
    options = (*tls_and_auth, ("auth.threads", 1))
    node = await start_node(node_config(tmp_path / "data", options=options), deliver=False)
    wire = None
    busy, release = threading.Semaphore(0), threading.Event()
    try:
        wire = await in_thread(Wire, node.port("smtp"))
        await in_thread(secure, wire)

        def occupy():
            busy.release()
            release.wait(30)

        node.auth_pool.callInThread(occupy)
        await until(lambda: busy.acquire(blocking=False), "the auth thread to be taken")
        await in_thread(wire.send, f"AUTH PLAIN {PLAIN}\r\n".encode())
        await in_thread(wire.expect_silence)
        stopped = stop_node(node)
        release.set()

        def goodbye():
            with wire:
                return [wire.reply().line, wire.reply().line], wire.expect_closed()

        replies, rest = await in_thread(goodbye)
        await stopped
    finally:
        release.set()
        if wire is not None:
            wire.close()
        await stop_node(node)
    assert replies == [AUTH_OK, "421 4.3.2 mx.example.test Service shutting down"]
    assert rest == b""


@pytest_twisted.ensureDeferred
async def test_non_ascii_sasl_responses_get_501(tmp_path, tls_and_auth):
    # Reproduction: a non-ASCII initial response dropped the connection without a reply.
    async with running_node(tmp_path, options=tls_and_auth) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                replies = [wire.command("AUTH PLAIN AGFsaWNlAHPDqWNyZXQ=é")]
                replies.append(wire.command(f"AUTH LOGIN {b64(USER)}é"))
                replies += [wire.command("AUTH LOGIN"), wire.command("é")]
                replies.append(wire.command(f"AUTH PLAIN {PLAIN}"))
                return replies

        replies = await in_thread(talk)
    assert [r.line for r in replies] == [
        "501 5.5.2 Cannot decode response",
        "501 5.5.2 Cannot decode response",
        "334 " + b64("Username:"),
        "501 5.5.2 Cannot decode response",
        AUTH_OK,
    ]


@pytest_twisted.ensureDeferred
async def test_an_overlong_sasl_line_ends_the_exchange(tmp_path, tls_and_auth):
    # Reproduction: after a 3,000-character response the next command was taken as SASL data.
    async with running_node(tmp_path, options=tls_and_auth) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                challenge = wire.command("AUTH PLAIN")
                return challenge, wire.command("A" * 3000), wire.command("MAIL FROM:<a@b.test>")

        challenge, overlong, mail = await in_thread(talk)
    assert challenge.code == 334
    assert overlong.line == "500 5.5.6 Authentication Exchange line is too long"
    assert mail.line == "250 2.1.0 Ok"


# -- the submission listener and authenticated relaying ----------------------------------


@pytest_twisted.ensureDeferred
async def test_submission_refuses_mail_without_auth(tmp_path, tls_and_auth):
    async with running_node(tmp_path, options=tls_and_auth, listeners=("submission",)) as node:

        def talk():
            with Wire(node.port("submission")) as wire:
                wire.ehlo()
                clear = wire.command(SENDER)
                assert wire.command("STARTTLS").code == 220
                wire.starttls()
                wire.ehlo()
                encrypted = wire.command(SENDER)
                rcpt = wire.command("RCPT TO:<bob@localhost>")
                return clear, encrypted, rcpt

        clear, encrypted, rcpt = await in_thread(talk)
        assert clear.line == "530 5.7.0 Authentication required"
        assert encrypted.line == "530 5.7.0 Authentication required"
        assert rcpt.line == "503 5.5.1 Need MAIL before RCPT"
        await nothing_queued(node)


@pytest_twisted.ensureDeferred
async def test_authenticated_submission_relays_to_any_domain(tmp_path, tls_and_auth):
    async with running_node(tmp_path, options=tls_and_auth, listeners=("submission",)) as node:

        def talk():
            with Wire(node.port("submission")) as wire:
                secure(wire)
                assert wire.command(f"AUTH PLAIN {PLAIN}").line == AUTH_OK
                replies = [
                    wire.command(SENDER),
                    wire.command("RCPT TO:<someone@far-away.example>"),
                    wire.command("RCPT TO:<other@[192.0.2.7]>"),
                ]
                return replies, wire.data(message())

        replies, done = await in_thread(talk)
        assert [r.line for r in replies] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok"]
        stored = await queued_everywhere(node, queue_id_of(done))
        assert [r.address for r in stored.recipients] == [
            "someone@far-away.example",
            "other@[192.0.2.7]",
        ]
        assert stored.client.authenticated_as == USER
        assert stored.client.listener == "submission"
        assert stored.client.protocol == "ESMTPSA"


@pytest_twisted.ensureDeferred
async def test_smtp_listener_relays_only_once_authenticated(tmp_path, tls_and_auth):
    async with running_node(tmp_path, options=tls_and_auth) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                secure(wire)
                wire.command(SENDER)
                before = wire.command("RCPT TO:<someone@far-away.example>")
                wire.command("RSET")
                assert wire.command(f"AUTH PLAIN {PLAIN}").line == AUTH_OK
                wire.command(SENDER)
                after = wire.command("RCPT TO:<someone@far-away.example>")
                return before, after

        before, after = await in_thread(talk)
    assert before.line == "554 5.7.1 Relay access denied"
    assert after.line == "250 2.1.5 Ok"


def test_wire_refuses_clear_bytes_before_tls():
    # The injection test relies on starttls() failing when anything came in clear.
    wire = Wire.__new__(Wire)
    wire._buffer = b"250 2.1.0 Ok\r\n"
    with pytest.raises(WireError):
        wire.starttls()
