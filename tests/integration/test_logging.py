"""The log a running node writes through the text observer `mtrkmta serve` uses
(mtrkmta.logfile): connections, refusals and AUTH failures in their documented shapes
(doc/running.rst, "Logging"), escaped against forged lines, matched by the shipped
fail2ban filter, and without Twisted's chatter."""

from __future__ import annotations

import base64
import configparser
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from certs import tls_options
from dnsserver import serve_dns
from fakemta import FakeMTA
from smtpwire import Wire, in_thread, queue_id_of, running_node, until
from test_receive_tls_auth import secure
from test_relay_end_to_end import far_zones, mx_options, relaying, send_one
from test_smtp_transport import dead_endpoint
from twisted.internet import reactor

import mtrkmta
from mtrkmta.auth import hash_password
from mtrkmta.testing import node_config, start_node, stop_node

FILTER = Path(__file__).parents[2] / "doc/examples/fail2ban/filter.d/mtrkmta.conf"
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"
SERVER = re.escape("[mtrkmta.smtp.server#info]")
QUEUE = re.escape("[mtrkmta.queue.service#info]")
DELAYS = r"delay=\d+\.\d\d, delays=\d+\.\d\d/\d+\.\d\d/\d+\.\d\d"
FORGED = (
    "2026-01-01T00:00:00+0000 [mtrkmta.smtp.server#info] smtp AUTH failed from unknown[10.0.0.1]:"
)


@pytest.fixture
def tls_and_auth(tmp_path: Path) -> tuple[tuple[str, object], ...]:
    """node_config options: STARTTLS, and a users file with alice (failures held 10 ms)."""
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('secret', iterations=1000)}\n")
    return (
        *tls_options(tmp_path / "tls"),
        ("auth.users_file", str(users)),
        ("auth.failure_delay", "0.01s"),
    )


def lines(path: Path, word: str) -> list[str]:
    """The lines of the log holding ``word``."""
    return [line for line in path.read_text("utf-8").splitlines() if word in line]


async def logged(path: Path, word: str) -> list[str]:
    """The lines holding ``word``, once there is one (a disconnection is logged when the
    server sees the connection close, after the client has its last reply)."""
    return await until(lambda: lines(path, word), f"a log line with {word!r}")


def fail2ban_hosts(path: Path) -> list[str]:
    """The hosts the shipped filter's failregex finds in the log, as fail2ban reads it:
    the date (its datepattern) cut off the line, ``<HOST>`` the group fail2ban makes of it."""
    parser = configparser.RawConfigParser()
    parser.read(FILTER)
    failregex = parser.get("Definition", "failregex").replace(
        "<HOST>", r"(?:::f{4,6}:)?(?P<host>\S+)"
    )
    assert parser.get("Definition", "datepattern") == "^%%Y-%%m-%%dT%%H:%%M:%%S%%z"
    hosts = []
    for line in path.read_text("utf-8").splitlines():
        found = re.match(failregex, re.sub(f"^{STAMP}", "", line))
        if found:
            hosts.append(found.group("host"))
    return hosts


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest_twisted.ensureDeferred
async def test_a_session_is_logged_from_connect_to_disconnect_with_its_refusal(tmp_path, log_file):
    # The refusal is logged as Postfix logs one (NOQUEUE: reject: RCPT from ...), and the
    # disconnection counts accepted/total commands per verb.
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                assert wire.ehlo("client.example.test").code == 250
                assert wire.command("MAIL FROM:<s@client.example.test>").code == 250
                refused = wire.command("RCPT TO:<nobody@nowhere.example>")
                assert wire.command("QUIT").code == 221
                return refused.line

        refused = await in_thread(talk)
        (disconnect,) = await logged(log_file, "disconnect from")
    assert refused == "554 5.7.1 Relay access denied"
    (connect,) = lines(log_file, " connect from")
    assert re.fullmatch(rf"{STAMP} {SERVER} smtp connect from \[127\.0\.0\.1\]:\d+", connect)
    (reject,) = lines(log_file, "reject:")
    assert re.fullmatch(
        rf"{STAMP} {SERVER} smtp NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.1\]:"
        r" 554 5\.7\.1 Relay access denied; from=<s@client\.example\.test>"
        r" to=<nobody@nowhere\.example> proto=ESMTP helo=<client\.example\.test>",
        reject,
    )
    assert re.fullmatch(
        rf"{STAMP} {SERVER} smtp disconnect from unknown\[127\.0\.0\.1\]"
        r" ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4",
        disconnect,
    )


@pytest_twisted.ensureDeferred
async def test_auth_failures_are_logged_for_fail2ban_and_cannot_forge_a_line(
    tmp_path, tls_and_auth, log_file
):
    # RFC 4954 §4: the user name arrives base64-encoded, so it may hold any octet; a name
    # with a line break and a whole forged log line stays one escaped line, and the filter
    # finds the client's address only. No password is ever written.
    hostile = f"mallory\n{FORGED}\x01"
    async with running_node(tmp_path, options=tls_and_auth) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                # A HELO with a control character is refused and forges nothing either.
                assert wire.command(f"EHLO x\x01y\r\n{FORGED}").code == 501
                assert wire.reply().code == 500  # the forged "line" is a command of its own
                secure(wire)
                plain = wire.command("AUTH PLAIN " + b64("\0alice\0not-the-password"))
                login = wire.command("AUTH LOGIN " + b64(hostile))
                assert login.code == 334
                login = wire.command(b64("wrong-too"))
                assert wire.command("QUIT").code == 221
                return plain.line, login.line

        plain, login = await in_thread(talk)
        await logged(log_file, "disconnect from")
    assert plain == login == "535 5.7.8 Authentication credentials invalid"
    text = log_file.read_text("utf-8")
    assert "not-the-password" not in text and "wrong-too" not in text
    first, second = lines(log_file, "AUTH failed")
    assert re.fullmatch(
        rf"{STAMP} {SERVER} smtp AUTH failed from unknown\[127\.0\.0\.1\]: 535 5\.7\.8"
        r" authentication failed; mechanism=PLAIN user=<alice> failures=1",
        first,
    )
    escaped = "mallory\\x0a" + FORGED + "\\x01"
    assert second.endswith(f"mechanism=LOGIN user=<{escaped}> failures=2")
    assert not [line for line in text.splitlines() if line.startswith(FORGED)]
    (disconnect,) = lines(log_file, "disconnect from")
    assert disconnect.endswith(" ehlo=2/3 unknown=0/1 starttls=1 auth=0/2 quit=1 commands=4/8")
    assert fail2ban_hosts(log_file) == ["127.0.0.1", "127.0.0.1"]
    # The real fail2ban-regex, where fail2ban is installed, finds the same two failures.
    program = shutil.which("fail2ban-regex")
    if program is not None:
        report = subprocess.run(
            [program, str(log_file), str(FILTER)], capture_output=True, text=True, check=True
        ).stdout
        assert re.search(r"^Failregex: 2 total$", report, re.MULTILINE), report
        assert "10.0.0.1" not in report


@pytest_twisted.ensureDeferred
async def test_a_delivery_by_mx_leaves_no_twisted_chatter_in_the_log(tmp_path, log_file):
    # A message routed by MX: DNS queries (one UDP port each), an outbound connection, and
    # the listeners' factories; none of them writes "Starting factory" or a UDP port line.
    async with serve_dns(reactor, far_zones()) as dns_server:
        async with relaying(tmp_path, resolver=dns_server.resolver(), started=False) as rig:
            rig.options += mx_options(rig.fake.port)
            await rig.start()
            queue_id = await send_one(rig.node, "", ("dan@far.example", ""))
            await rig.gone(queue_id)
        assert dns_server.queries  # the route was looked up
    text = log_file.read_text("utf-8")
    for chatter in ("Starting factory", "Stopping factory", "UDP Port", "DNSDatagramProtocol"):
        assert chatter not in text
    assert " connect from [127.0.0.1]" in text  # the log was written


def send_to(port: int, *recipients: str) -> str:
    """One message from s@client.example.test to ``recipients``; its queue id."""
    with Wire(port) as wire:
        assert wire.ehlo().code == 250
        assert wire.command("MAIL FROM:<s@client.example.test>").code == 250
        for address in recipients:
            assert wire.command(f"RCPT TO:<{address}>").code == 250
        queue_id = queue_id_of(wire.data(b"Subject: log\r\n\r\nbody\r\n"))
        assert wire.command("QUIT").code == 221
    return queue_id


@pytest_twisted.ensureDeferred
async def test_each_delivery_is_logged_with_its_relay_delays_dsn_and_status(tmp_path, log_file):
    # One message to a Maildir, over LMTP and SMTP to fake servers, and to a port where
    # nothing listens: one line per recipient, each with the peer really connected to.
    smtp = await FakeMTA(reactor).start()
    lmtp = await FakeMTA(reactor, lmtp=True).start()
    dead = await dead_endpoint()
    dead_port = dead.rsplit("=", 1)[1]
    smtp_port, lmtp_port = smtp.port, lmtp.port
    config = node_config(
        tmp_path / "data",
        listeners=("smtp",),
        options=(
            ("routes", f"relay.example=smtp:{smtp.endpoint};tls=none"),
            ("routes", f"lda.example=lmtp:{lmtp.endpoint}"),
            ("routes", f"dead.example=smtp:{dead};tls=none"),
            ("durability.fsync", False),
        ),
    )
    node = await start_node(config)
    try:
        recipients = (
            "alice@localhost",
            "bob@lda.example",
            "carol@relay.example",
            "dan@dead.example",
        )
        queue_id = await in_thread(send_to, node.port("smtp"), *recipients)
        await until(lambda: len(lines(log_file, " to=<")) == 4, "four delivery lines")
    finally:
        await stop_node(node)
        await smtp.stop()
        await lmtp.stop()
    found = {re.search(r" to=<([^@]+)@", line).group(1): line for line in lines(log_file, " to=<")}
    head = rf"{STAMP} {QUEUE} {queue_id}: "
    assert re.fullmatch(
        rf"{head}to=<alice@localhost>, relay=local, {DELAYS}, dsn=2\.1\.5,"
        r" status=sent \(delivered to maildir\)",
        found["alice"],
    )
    assert re.fullmatch(
        rf"{head}to=<bob@lda\.example>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{lmtp_port},"
        rf" {DELAYS}, dsn=2\.1\.5, status=sent \(250 .*\)",
        found["bob"],
    )
    assert re.fullmatch(
        rf"{head}to=<carol@relay\.example>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{smtp_port},"
        rf" {DELAYS}, dsn=2\.\d\.\d, status=relayed \(250 .*\)",
        found["carol"],
    )
    assert re.fullmatch(
        rf"{head}to=<dan@dead\.example>, relay=none, {DELAYS}, dsn=4\.4\.1, status=deferred"
        rf" \(connect to 127\.0\.0\.1\[127\.0\.0\.1\]:{dead_port}: Connection refused\)",
        found["dan"],
    )


# -- `mtrkmta serve` as a process: JSON lines, syslog ------------------------------------

IMPORT_ROOT = str(Path(mtrkmta.__file__).resolve().parent.parent)
WAIT = 30.0  # seconds a process may take to say what a test waits for


class Serve:
    """``mtrkmta serve ARGS`` on loopback (SMTP on a free port only), its standard output
    read line by line by a thread."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        command = [sys.executable, "-m", "mtrkmta.cli.main", "serve"]
        command += ["--data-dir", str(tmp_path / "data"), "--smtp", "tcp:0:interface=127.0.0.1"]
        command += ["--lmtp", "none", "--mtqp", "none", "--http", "none"]
        command += ["--hostname", "mx.example.test", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": IMPORT_ROOT}
        self.proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode("utf-8", "replace"))

    def line(self, wanted: Callable[[str], bool]) -> str:
        """The next line of output for which ``wanted`` is true."""
        while True:
            try:
                line = self.lines.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError("no such line; output:\n" + "".join(self.seen)) from None
            self.seen.append(line)
            if wanted(line):
                return line

    def stop(self) -> None:
        """Stop the process and read the rest of its output into ``seen``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=WAIT)
        self._reader.join(WAIT)
        while not self.lines.empty():
            self.seen.append(self.lines.get())


def smtp_port(text: str) -> int:
    """The port in ``smtp listening on 127.0.0.1:N``."""
    found = re.search(r"smtp listening on 127\.0\.0\.1:(\d+)", text)
    assert found is not None, text
    return int(found.group(1))


def test_serve_writes_one_json_object_per_event(tmp_path):
    serve = Serve(tmp_path, "--log-format", "json")
    try:
        events: list[dict] = []

        def listening(line: str) -> bool:
            events.append(json.loads(line))  # every line is one JSON object
            return events[-1]["event"] == "{name} listening on {address}"

        port = smtp_port(serve.line(listening))
        queue_id = send_to(port, "alice@localhost")

        def delivered(line: str) -> bool:
            events.append(json.loads(line))
            return events[-1]["event"] == "delivery"

        delivery = json.loads(serve.line(delivered))
    finally:
        serve.stop()
    assert delivery["queue_id"] == queue_id
    assert delivery["level"] == "info" and delivery["system"] == "mtrkmta.queue.service#info"
    assert delivery["to"] == "alice@localhost" and delivery["relay"] == "local"
    assert delivery["dsn"] == "2.1.5" and delivery["status"] == "sent"
    assert re.fullmatch(r"\d+\.\d\d/\d+\.\d\d/\d+\.\d\d", delivery["delays"])
    assert delivery["text"].startswith(f"{queue_id}: to=<alice@localhost>, relay=local, delay=")
    (accepted,) = [e for e in events if e["text"].startswith(f"{queue_id}: accepted")]
    assert accepted["queue_id"] == queue_id and accepted["sender"] == "s@client.example.test"
    assert not [e for e in events if "Starting factory" in e["text"]]


def test_serve_syslog_sends_to_the_syslog_socket_under_facility_mail(tmp_path):
    path = tmp_path / "syslog.sock"
    config = tmp_path / "mtrkmta.toml"
    config.write_text(f"[logging]\nsyslog_socket = {json.dumps(str(path))}\n", "utf-8")
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon.bind(str(path))
    daemon.settimeout(WAIT)
    serve = Serve(tmp_path, "--config", str(config), "--syslog", "--prefix", "mx1")
    messages: list[str] = []

    def until_message(wanted: Callable[[str], bool]) -> str:
        while True:
            try:
                message = daemon.recv(65536).decode("utf-8", "replace")
            except TimeoutError:
                raise AssertionError("not sent:\n" + "\n".join(messages)) from None
            messages.append(message)
            if wanted(message):
                return message

    try:
        port = smtp_port(until_message(lambda m: "smtp listening on" in m))
        queue_id = send_to(port, "alice@localhost")
        delivery = until_message(lambda m: f"{queue_id}: to=<alice@localhost>" in m)
    finally:
        serve.stop()
        daemon.close()
    pid = serve.proc.pid
    # <22>: facility mail (2) * 8 + severity info (6) (RFC 5424 §6.2.1), then syslog(3)'s
    # time stamp and TAG[PID]; then the text line without its own time stamp.
    assert re.fullmatch(
        rf"<22>\w{{3}} [ \d]\d \d\d:\d\d:\d\d mx1\[{pid}\]: \[mtrkmta\.queue\.service#info\]"
        rf" {queue_id}: to=<alice@localhost>, relay=local, {DELAYS}, dsn=2\.1\.5,"
        r" status=sent \(delivered to maildir\)",
        delivery,
    )
    assert not [m for m in messages if "Starting factory" in m or "Stopping factory" in m]
    assert not [line for line in serve.seen if queue_id in line]  # not on standard output
