"""sendmail, mailq and newaliases as real processes against a node in this process: mail
written while the node is down or up, cron's invocation, -t with Bcc, -bs, -bp and -bi.

Each command runs as ``python -m mtrkmta.cli.sendmail -C FILE`` in a thread (the node's
reactor keeps running: sendmail nudges it over the control socket and waits for the answer).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from smtpwire import queue_emptied, until
from test_crash_safety import IMPORT_ROOT
from twisted.internet import threads

from mtrkmta.testing import database_url, node_config, start_node, stop_node
from mtrkmta.tracking.interfaces import RecipientState

HOSTNAME = "mx.example.test"
NEVER = ("pickup.poll_interval", "1h")  # only the start-up scan and sendmail's nudge remain
ALIASES = '[alias.staff]\nto = ["alice", "bob"]\n'


def sendmail_config(data_dir: Path, extra: str = "") -> Path:
    """The configuration file sendmail reads with -C: the node's data directory and name."""
    path = data_dir.parent / "sendmail.toml"
    path.write_text(
        f'[server]\nhostname = "{HOSTNAME}"\ndata_dir = "{data_dir}"\n'
        f'database = "{database_url(data_dir)}"\n{extra}',
        "utf-8",
    )
    return path


def run_sendmail(config: Path, args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    """``sendmail -C config ARGS < stdin`` (blocking); stdout and stderr as text."""
    env = {**os.environ, "PYTHONPATH": IMPORT_ROOT}
    command = [sys.executable, "-m", "mtrkmta.cli.sendmail", "-C", str(config), *args]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=60, env=env)


def sendmail(config: Path, args: list[str], stdin: bytes = b"") -> object:
    """``run_sendmail`` in a thread: a Deferred of its CompletedProcess."""
    return threads.deferToThread(run_sendmail, config, args, stdin)


def mailbox(data_dir: Path, user: str) -> list[bytes]:
    new = data_dir / "mail" / user / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def login() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


async def node_on(data_dir: Path, *options: tuple[str, object], deliver: bool = True) -> object:
    config = node_config(
        data_dir, hostname=HOSTNAME, listeners=("smtp",), options=(NEVER, *options)
    )
    return await start_node(config, deliver=deliver)


@pytest_twisted.ensureDeferred
async def test_mail_sent_while_the_node_is_down_waits_and_is_delivered_when_it_starts(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = sendmail_config(data_dir)
    done = await sendmail(config, ["-i", "alice"], b"Subject: down\n\nwritten while down\n")
    assert (done.returncode, done.stderr) == (0, b"")
    [waiting] = list((data_dir / "pickup").iterdir())
    node = await node_on(data_dir)
    try:
        await until(lambda: mailbox(data_dir, "alice"), "the delivery")
        await queue_emptied(node)
        [copy] = mailbox(data_dir, "alice")
        assert f"Received: by {HOSTNAME} (mtrkmta, from userid {os.getuid()})".encode() in copy
        assert copy.endswith(b"\n\nwritten while down\n")
        record = await node.tracking.message(waiting.name)  # tracked like any message
        assert record is not None and record.client.listener == "pickup"
        assert record.sender == f"{login()}@localhost"
        assert [(r.address, r.state) for r in record.recipients] == [
            ("alice@localhost", RecipientState.DELIVERED)
        ]
        assert list((data_dir / "pickup").iterdir()) == []
    finally:
        await stop_node(node)


@pytest_twisted.ensureDeferred
async def test_mail_sent_while_the_node_is_up_is_picked_up_at_once(tmp_path):
    data_dir = tmp_path / "data"
    node = await node_on(data_dir)  # polls once an hour: sendmail's nudge must do it
    try:
        config = sendmail_config(data_dir)
        done = await sendmail(config, ["-v", "bob@localhost"], b"Subject: up\n\nnow\n")
        assert done.returncode == 0
        assert b"the node picks it up now" in done.stderr
        await until(lambda: mailbox(data_dir, "bob"), "the delivery")
    finally:
        await stop_node(node)


@pytest_twisted.ensureDeferred
async def test_cron_style_invocation(tmp_path):
    data_dir = tmp_path / "data"
    node = await node_on(data_dir)
    try:
        config = sendmail_config(data_dir)
        output = b"Subject: Cron <root@host> run-parts\n\nline one\n.\nline after a dot\n"
        done = await sendmail(config, ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"], output)
        assert (done.returncode, done.stderr) == (0, b"")
        [copy] = await until(lambda: mailbox(data_dir, "root"), "the delivery")
        header, _, body = copy.partition(b"\n\n")
        assert f"\nFrom: CronDaemon <{login()}@localhost>\n".encode() in header + b"\n"
        assert b"\nDate: " in header and b"\nMessage-ID: <" in header
        assert body == b"line one\n.\nline after a dot\n"  # -i: the lone dot is content
    finally:
        await stop_node(node)


@pytest_twisted.ensureDeferred
async def test_t_takes_the_recipients_from_the_header_and_drops_bcc(tmp_path):
    data_dir = tmp_path / "data"
    node = await node_on(data_dir)
    try:
        config = sendmail_config(data_dir)
        message = (
            b"From: App <app@localhost>\nTo: alice@localhost\nCc: Bob <bob@localhost>\n"
            b"Bcc: carol@localhost\nSubject: t\n\nbody\n"
        )
        done = await sendmail(config, ["-t", "-i"], message)
        assert (done.returncode, done.stderr) == (0, b"")
        for user in ("alice", "bob", "carol"):
            [copy] = await until(lambda user=user: mailbox(data_dir, user), f"{user}'s copy")
            assert b"\nBcc" not in copy
            assert b"\nTo: alice@localhost\nCc: Bob <bob@localhost>\nSubject: t\n" in copy
            assert b"\nFrom: App <app@localhost>\n" in copy
    finally:
        await stop_node(node)


@pytest_twisted.ensureDeferred
async def test_bs_speaks_smtp_on_standard_input_and_output(tmp_path):
    data_dir = tmp_path / "data"
    node = await node_on(data_dir)
    try:
        config = sendmail_config(data_dir)
        dialogue = (
            b"EHLO client.example\r\nMAIL FROM:<app@localhost>\r\n"
            b"RCPT TO:<dave@localhost>\r\nDATA\r\nSubject: bs\r\n\r\nvia -bs\r\n.\r\nQUIT\r\n"
        )
        done = await sendmail(config, ["-bs"], dialogue)
        assert done.returncode == 0, done.stderr
        replies = done.stdout.decode().splitlines()
        assert replies[0] == f"220 {HOSTNAME} ESMTP mtrkmta"
        assert replies[-1] == f"221 2.0.0 {HOSTNAME} Bye"
        queued = replies[-2]
        assert queued.startswith("250 2.0.0 Ok: queued as ")
        [copy] = await until(lambda: mailbox(data_dir, "dave"), "the delivery")
        assert copy.endswith(b"Subject: bs\n\nvia -bs\n")
        # One Received: for this hop, the node's, naming the uid (none from the session).
        assert copy.count(b"Received:") == 1
        assert f"(mtrkmta, from userid {os.getuid()})".encode() in copy
        record = await node.tracking.message(queued.rsplit(" ", 1)[1])
        assert record is not None and record.sender == "app@localhost"
    finally:
        await stop_node(node)


@pytest_twisted.ensureDeferred
async def test_bp_lists_the_queue_and_says_when_the_node_is_down(tmp_path):
    data_dir = tmp_path / "data"
    node = await node_on(data_dir, deliver=False)
    config = sendmail_config(data_dir)
    try:
        done = await sendmail(config, ["-v", "-f", "app@localhost", "erin@localhost"], b"held\n")
        assert done.returncode == 0
        queue_id = done.stderr.decode().split(":")[1].strip()
        await until(
            lambda: node.tracking.queued_messages(node.config.node_id), "the message queued"
        )
        listing = await sendmail(config, ["-bp"])
        assert listing.returncode == 0
        assert "app@localhost" in listing.stdout.decode()
        assert "erin@localhost" in listing.stdout.decode()
        assert queue_id in listing.stdout.decode()
    finally:
        await stop_node(node)
    down = await sendmail(config, ["-bp"])
    assert down.returncode == 69
    assert down.stderr.decode().count("\n") == 1 and "is mtrkmta running?" in down.stderr.decode()


@pytest_twisted.ensureDeferred
async def test_bi_checks_the_aliases_and_tells_the_running_node(tmp_path):
    data_dir = tmp_path / "data"
    aliases = tmp_path / "aliases.toml"
    aliases.write_text(ALIASES)
    config = sendmail_config(data_dir, f'[local]\naliases = "{aliases}"\n')
    down = await sendmail(config, ["-bi"])
    assert (down.returncode, down.stdout.decode()) == (
        0,
        f"newaliases: {aliases}: 1 alias(es), 0 list(s); the node is not running (or not "
        "reachable): it reads the file when it starts\n",
    )
    node = await node_on(data_dir, ("local.aliases", str(aliases)))
    try:
        before = node.aliases.book
        up = await sendmail(config, ["-bi"])
        assert up.stdout.decode().endswith("; the running node re-reads it now\n")
        await until(lambda: node.aliases.book is not before, "the aliases re-read")
        aliases.write_text('[alias.staff]\ntoo = ["alice"]\n')
        broken = await sendmail(config, ["-bi"])
        assert broken.returncode == 65
        assert broken.stderr.decode().count("\n") == 1
        assert str(aliases) in broken.stderr.decode()
    finally:
        await stop_node(node)


@pytest_twisted.ensureDeferred
async def test_dsn_options_reach_the_tracking_record(tmp_path):
    data_dir = tmp_path / "data"
    node = await node_on(data_dir, deliver=False)
    try:
        config = sendmail_config(data_dir)
        args = ["-v", "-N", "failure,delay", "-R", "hdrs", "-V", "job-42", "grace@localhost"]
        done = await sendmail(config, args, b"Subject: dsn\n\nx\n")
        assert done.returncode == 0, done.stderr
        queue_id = done.stderr.decode().split(":")[1].strip()
        record = await until(lambda: node.tracking.message(queue_id), "the record")
        assert (record.envid, record.ret) == ("job-42", "HDRS")
        [recipient] = record.recipients
        assert recipient.notify == frozenset({"FAILURE", "DELAY"})
    finally:
        await stop_node(node)
