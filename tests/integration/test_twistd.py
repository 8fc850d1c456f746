"""`twistd -n mtrkmta` as a real process: it greets, accepts a message, and stops on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servprocess import LISTENING

from mtrkmta.spool.filespool import bucket_of

HOSTNAME = "mx.example.test"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# twistd without a console script of its own, e.g. when the tests run from another environment.
_RUN_TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


def twistd_command() -> list[str]:
    """The twistd of the environment the tests run in (console script, else its entry point)."""
    script = Path(sys.executable).parent / "twistd"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", _RUN_TWISTD]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_for_port(proc: subprocess.Popen[bytes], log: Path) -> int:
    """The SMTP port twistd reports once the node is ready; fail with the log otherwise."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        text = log.read_text("utf-8", "replace")
        match = LISTENING.search(text)
        if match is not None:
            return int(match.group(1))
        if proc.poll() is not None:
            pytest.fail(f"twistd exited with {proc.returncode} before listening:\n{text}")
        if "could not start" in text:
            pytest.fail(f"mtrkmta did not start:\n{text}")
        time.sleep(0.1)
    pytest.fail(f"twistd did not open its SMTP listener in {START_TIMEOUT:g}s:\n{text}")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty directory to run twistd in (it writes twistd.pid there)."""
    path = tmp_path / "run"
    path.mkdir()
    return path


def test_twistd_serves_smtp_and_stops_cleanly_on_sigterm(tmp_path, workdir):
    data_dir = tmp_path / "data"
    log = tmp_path / "twistd.log"
    args = [
        *twistd_command(),
        "-n",
        "mtrkmta",
        "--data-dir",
        str(data_dir),
        # Port 0: the system picks a free port at run time, and the log line tells which.
        "--smtp",
        "tcp:0:interface=127.0.0.1",
        "--lmtp",
        "none",
        "--mtqp",
        "none",
        "--http",
        "none",
        "--hostname",
        HOSTNAME,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args, cwd=workdir, env=child_env(), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        port = wait_for_port(proc, log)
        with smtplib.SMTP(timeout=10) as smtp:
            code, greeting = smtp.connect("127.0.0.1", port)
            assert code == 220
            assert greeting.split()[0] == HOSTNAME.encode()
            code, ehlo = smtp.ehlo("client.example")
            assert code == 250
            assert ehlo.splitlines()[0] == HOSTNAME.encode()
            assert smtp.has_extn("mtrk") and smtp.has_extn("dsn")
            assert smtp.mail("sender@example.org") == (250, b"2.1.0 Ok")
            assert smtp.rcpt("alice@localhost") == (250, b"2.1.5 Ok")
            code, reply = smtp.data(b"Subject: twistd\r\n\r\nhello\r\n")
            assert code == 250
            match = re.fullmatch(rb"2\.0\.0 Ok: queued as (\S+)", reply)
            assert match is not None, reply
            queue_id = match.group(1).decode("ascii")
        # The queue delivers it to the local Maildir, then removes it from the spool.
        maildir = data_dir / "mail" / "alice" / "new"
        deadline = time.monotonic() + 20
        while not (maildir.is_dir() and any(maildir.iterdir())):
            assert time.monotonic() < deadline, log.read_text("utf-8", "replace")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"twistd did not stop within {STOP_TIMEOUT:g}s of SIGTERM")
    text = log.read_text("utf-8", "replace")
    # twistd shuts down cleanly, then ends itself with the signal it got (a shell shows 143).
    assert proc.returncode == -signal.SIGTERM, text
    assert "Received SIGTERM, shutting down." in text
    assert "Server Shut Down." in text
    assert "Traceback" not in text and "Unhandled" not in text, text
    assert f"{queue_id}: accepted from=<sender@example.org> nrcpt=1 via smtp" in text
    # Delivered: in the Maildir with Return-Path/Delivered-To, out of the spool, and the
    # tracking record says so.
    (delivered,) = list((data_dir / "mail" / "alice" / "new").iterdir())
    assert delivered.read_bytes().startswith(
        b"Return-Path: <sender@example.org>\nDelivered-To: <alice@localhost>\nReceived: "
    )
    assert not (data_dir / "spool" / "queue" / bucket_of(queue_id) / queue_id).exists()
    assert list((data_dir / "spool" / "incoming").iterdir()) == []
    conn = sqlite3.connect(data_dir / "tracking.sqlite")
    try:
        message = conn.execute(
            "SELECT sender, node_id, reporting_mta FROM messages WHERE queue_id = ?", (queue_id,)
        ).fetchall()
        recipients = conn.execute(
            "SELECT address, state, status FROM recipients WHERE queue_id = ?", (queue_id,)
        ).fetchall()
    finally:
        conn.close()
    assert message == [("sender@example.org", HOSTNAME, HOSTNAME)]
    assert recipients == [("alice@localhost", "delivered", "2.1.5")]
    assert not (workdir / "twistd.pid").exists()


def test_twistd_rejects_a_bad_option_value_with_status_two(tmp_path, workdir):
    data_dir = tmp_path / "data"
    proc = subprocess.run(
        [
            *twistd_command(),
            "-n",
            "mtrkmta",
            "--data-dir",
            str(data_dir),
            "--smtp",
            "bogus:endpoint",
        ],
        cwd=workdir,
        env=child_env(),
        capture_output=True,
        timeout=START_TIMEOUT,
    )
    assert proc.returncode == 2, proc
    err = proc.stderr.decode("utf-8", "replace")
    assert err.startswith("mtrkmta: config error: --smtp: expected a server endpoint description")
    assert "'bogus:endpoint'" in err
    assert "Traceback" not in err
    assert not data_dir.exists()
    assert list(workdir.iterdir()) == []


def test_twistd_help_lists_the_mtrkmta_options(workdir):
    proc = subprocess.run(
        [*twistd_command(), "mtrkmta", "--help"],
        cwd=workdir,
        env=child_env(),
        capture_output=True,
        timeout=START_TIMEOUT,
    )
    assert proc.returncode == 0, proc
    out = proc.stdout.decode()
    for option in ("--config=", "--data-dir=", "--hostname=", "--smtp=", "--lmtp=", "--route="):
        assert option in out
