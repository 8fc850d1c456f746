"""One users file for mtrkmta and Dovecot: the hashes the real ``doveadm pw`` makes verify
with mtrkmta's code, the SHA512-CRYPT hashes `mtrkmta passwd` writes verify with doveadm,
and a running Dovecot and an mtrkmta node (SMTP AUTH) authenticate from one file
`mtrkmta passwd` wrote.

``doveadm pw`` needs no configuration: ``-c /dev/null`` keeps it from reading /etc/dovecot.
"""

from __future__ import annotations

import email
import os
import smtplib
import ssl
import subprocess
import sys

import pytest
import pytest_twisted
from certs import tls_options
from interop_lab import (
    Dovecot,
    final_record,
    in_thread,
    outcome,
    program,
    queue_id,
    require_programs,
    running_mtrkmta,
    start_dovecot,
)

from mtrkmta.auth import (
    MAX_CRYPT_ROUNDS,
    PasswordFileError,
    hash_sha512_crypt,
    parse_users,
    verify_password,
)
from mtrkmta.tracking.interfaces import RecipientState

PASSWORD = "s3cret, wïth spaces"  # not ASCII: both sides hash the UTF-8 bytes
SMTP_PASSWORD = "s3cret, with spaces"  # smtplib's AUTH PLAIN takes ASCII only


@pytest.fixture
def doveadm() -> str:
    require_programs()
    return program("doveadm")


def doveadm_pw(doveadm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [doveadm, "-c", "/dev/null", "pw", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def made_by_doveadm(doveadm: str, *args: str) -> str:
    made = doveadm_pw(doveadm, *args)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def mtrkmta_passwd(*args: str, password: str) -> subprocess.CompletedProcess[str]:
    """The real command, as an administrator runs it, the password on a pipe."""
    return subprocess.run(
        [sys.executable, "-m", "mtrkmta.cli.main", "passwd", *args],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


@pytest.mark.parametrize(
    "args",
    [
        ("-s", "SHA512-CRYPT"),
        ("-s", "SHA512-CRYPT", "-r", "12345"),
        ("-s", "SHA256-CRYPT"),
        ("-s", "SHA256-CRYPT", "-r", "1000"),
        ("-s", "SSHA512"),
        ("-s", "SSHA256"),
        ("-s", "PBKDF2"),
        ("-s", "PBKDF2", "-r", "1000"),
    ],
)
def test_doveadm_hashes_verify_with_mtrkmta(doveadm, args):
    stored = made_by_doveadm(doveadm, *args, "-p", PASSWORD)
    assert stored.startswith("{" + args[1] + "}")
    assert verify_password(PASSWORD.encode(), stored)
    assert not verify_password(PASSWORD.encode()[:-1], stored)
    assert parse_users(f"alice@example.test:{stored}::::::\n") == {"alice@example.test": stored}


@pytest.mark.parametrize("rounds", [1000, 5000, 50_000])
def test_sha512_crypt_hashes_mtrkmta_makes_verify_with_doveadm(doveadm, rounds):
    stored = hash_sha512_crypt(PASSWORD, rounds=rounds)
    checked = doveadm_pw(doveadm, "-t", stored, "-p", PASSWORD)
    assert (checked.returncode, checked.stdout.strip()) == (0, f"{stored} (verified)")
    wrong = doveadm_pw(doveadm, "-t", stored, "-p", PASSWORD + "!")
    assert wrong.returncode != 0
    assert "Password mismatch" in wrong.stderr


def test_mtrkmta_passwd_writes_a_hash_doveadm_verifies(doveadm, tmp_path):
    users = tmp_path / "users"
    done = mtrkmta_passwd(
        "--users-file", str(users), "--scheme", "SHA512-CRYPT", "alice", password=PASSWORD
    )
    assert (done.returncode, done.stderr) == (0, "")
    stored = parse_users(users.read_text())["alice"]
    checked = doveadm_pw(doveadm, "-t", stored, "-p", PASSWORD)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize(
    "scheme",
    ["PLAIN", "CLEARTEXT", "CRAM-MD5", "MD5", "PLAIN-MD5", "SHA1", "SHA256", "SHA512", "SSHA"],
)
def test_weak_doveadm_schemes_are_refused_at_load(doveadm, scheme):
    stored = made_by_doveadm(doveadm, "-s", scheme, "-p", PASSWORD)
    with pytest.raises(PasswordFileError) as refused:
        parse_users(f"# shared\nbob:{stored}\n", "/etc/mtrkmta/users")
    assert str(refused.value).startswith(f"/etc/mtrkmta/users:2: password scheme {{{scheme}}} ")


def test_a_rounds_count_beyond_mtrkmta_s_limit_is_refused(doveadm):
    stored = made_by_doveadm(
        doveadm, "-s", "SHA256-CRYPT", "-r", str(MAX_CRYPT_ROUNDS + 1), "-p", PASSWORD
    )
    # doveadm makes it (its limit is the specification's, 999,999,999): the limit is mtrkmta's.
    with pytest.raises(PasswordFileError, match=f"rounds={MAX_CRYPT_ROUNDS + 1} is above"):
        parse_users(f"bob:{stored}\n", "users")


def auth_test(doveadm: str, dovecot: Dovecot, user: str, password: str) -> str:
    """``doveadm auth test`` against the running Dovecot: its passdb's answer."""
    proc = subprocess.run(
        [doveadm, "-c", str(dovecot.config), "auth", "test", user, password],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.stdout + proc.stderr


def test_dovecot_and_mtrkmta_authenticate_from_one_file(lab, doveadm):
    dovecot = Dovecot(lab)
    dovecot.start()
    users = dovecot.dir / "users"  # Dovecot's passdb: passwd-file, username_format=%Lu
    for user in ("alice@example.test", "full@example.test"):
        done = mtrkmta_passwd(
            "--users-file", str(users), "--scheme", "SHA512-CRYPT", user, password=PASSWORD
        )
        assert done.returncode in (0, 1), done.stderr  # 1 until no {PLAIN} line is left
    bob = made_by_doveadm(doveadm, "-s", "SSHA512", "-p", "bobs password")
    text = users.read_text()
    users.write_text(text.replace("bob@example.test:{PLAIN}unused", f"bob@example.test:{bob}"))
    lines = users.read_text().splitlines()
    assert all(line.endswith("::::::") for line in lines if not line.startswith("#"))

    entries = parse_users(users.read_text(), str(users))  # mtrkmta takes the whole file
    assert verify_password(PASSWORD.encode(), entries["alice@example.test"])
    assert verify_password(b"bobs password", entries["bob@example.test"])
    assert not verify_password(b"bobs password", entries["alice@example.test"])

    assert "auth succeeded" in auth_test(doveadm, dovecot, "alice@example.test", PASSWORD)
    assert "auth succeeded" in auth_test(doveadm, dovecot, "bob@example.test", "bobs password")
    assert "auth failed" in auth_test(doveadm, dovecot, "alice@example.test", "bobs password")
    assert users.stat().st_mode & 0o777 == 0o644  # the mode the lab gave Dovecot's file


@pytest_twisted.ensureDeferred
async def test_smtp_auth_to_mtrkmta_uses_dovecot_s_file(lab, doveadm):
    # The file Dovecot authenticates from is mtrkmta's auth.users_file: a hash doveadm
    # made and one mtrkmta passwd wrote both log in over SMTP AUTH (Python's smtplib, a
    # real client: Debian's swaks lacks TLS without Net::SSLeay), and the mail arrives.
    dovecot = await start_dovecot(lab)
    users = dovecot.dir / "users"
    bob = made_by_doveadm(doveadm, "-s", "SHA256-CRYPT", "-p", "bobs password")
    users.write_text(
        users.read_text()
        .replace("bob@example.test:{PLAIN}unused", f"bob@example.test:{bob}")
        .replace("full@example.test:{PLAIN}unused::::::\n", "")
    )
    args = ("--users-file", str(users), "--scheme", "SHA512-CRYPT", "alice@example.test")
    done = await in_thread(mtrkmta_passwd, *args, password=SMTP_PASSWORD)
    assert (done.returncode, done.stderr) == (0, "")
    options = (*tls_options(lab.path("tls")), ("auth.users_file", str(users)))
    async with running_mtrkmta(
        lab, "to-dovecot.toml", options=options, DOVECOT_LMTP_PORT=dovecot.port
    ) as node:

        def submit(user: str, password: str) -> str:
            """Log in as ``user`` (STARTTLS, AUTH PLAIN) and send alice a message: the
            reply to the end of data, or the reply that refused the login."""
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            with smtplib.SMTP("127.0.0.1", node.port("smtp"), timeout=30) as client:
                client.starttls(context=context)
                try:
                    client.login(user, password)
                except smtplib.SMTPAuthenticationError as refused:
                    return f"{refused.smtp_code} {refused.smtp_error.decode()}"
                client.mail(user)
                client.rcpt("alice@example.test")
                code, text = client.data(f"Subject: from {user}\r\n\r\nAuthenticated.\r\n")
                return f"{code} {text.decode()}"

        alice = await in_thread(submit, "alice@example.test", SMTP_PASSWORD)
        bob_ok = await in_thread(submit, "bob@example.test", "bobs password")
        wrong = await in_thread(submit, "bob@example.test", SMTP_PASSWORD)
        assert wrong.startswith("535 5.7.8 ")
        for reply in (alice, bob_ok):
            record = await final_record(node, queue_id(reply))
            assert outcome(record, "alice@example.test").state == RecipientState.DELIVERED
    mails = [
        email.message_from_bytes(m.read_bytes()) for m in dovecot.maildir("alice@example.test")
    ]
    assert sorted(mail["Subject"] for mail in mails) == [
        "from alice@example.test",
        "from bob@example.test",
    ]
    assert "auth succeeded" in auth_test(doveadm, dovecot, "bob@example.test", "bobs password")
