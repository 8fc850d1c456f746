"""Real Dovecot, Postfix and smtp-sink beside an in-process mtrkmta node, on loopback.

Each daemon runs in a directory of its own under a per-test lab directory, from
the configuration templates in this folder (``dovecot/``, ``postfix/``), on ports
chosen at run time; nothing under /etc is read or changed. As root, Dovecot
delivers as nobody and its internal processes run as the package's users; Postfix
always needs root (its master daemon insists). The processes are plain
subprocesses, not reactor processes, so the leak guard does not see them; every
one is stopped at teardown, and registered with the session's reaper (see
``tests/conftest.py``) in case pytest itself dies.

Blocking helpers (clients, waiting for daemons) must not run on the reactor
thread while an mtrkmta node is serving: tests call them through ``in_thread``.
"""

from __future__ import annotations

import abc
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher, textFileLogObserver

from mtrkmta.service import MTAService
from mtrkmta.testing import node_config, start_node, stop_node
from mtrkmta.tracking.interfaces import RecipientState, StoredMessage

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

R = TypeVar("R")
T = TypeVar("T")

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
START_TIMEOUT = 20.0
IO_TIMEOUT = 15.0

# What the interop tests need, as the Debian packages that bring it; tools/bootstrap.sh
# test installs the same packages (tests/interop/test_interop_lab.py checks that).
PACKAGES = (
    "dovecot-core",
    "dovecot-lmtpd",
    "postfix",
    "swaks",
    "bsd-mailx",
    "chromium",
    "prometheus",
)
PROGRAMS = {  # program -> package
    "dovecot": "dovecot-core",
    "doveadm": "dovecot-core",
    "/usr/lib/dovecot/lmtp": "dovecot-lmtpd",
    "postfix": "postfix",
    "postconf": "postfix",
    "postqueue": "postfix",
    "smtp-sink": "postfix",
    "smtp-source": "postfix",
    "swaks": "swaks",
    "bsd-mailx": "bsd-mailx",  # mail(1), which hands its mail to sendmail
    "chromium": "chromium",  # headless, for the tracking page
    "prometheus": "prometheus",  # scrapes /metrics (tests/interop/test_prometheus_scrape.py)
}
POSTFIX_PRESEED = "postfix postfix/main_mailer_type select No configuration"
INSTALL_LINE = (
    f"echo '{POSTFIX_PRESEED}' | sudo debconf-set-selections && "
    f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
    f"{' '.join(PACKAGES)}"
)
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin"]
)

IS_ROOT = os.geteuid() == 0
NOBODY = 65534  # Dovecot refuses to deliver as root: mail belongs to nobody:nogroup


def program(name: str) -> str:
    """The full path of a program the interop tests run; fails the test when it is missing."""
    found = shutil.which(name, path=_SEARCH_PATH)
    if found is None:
        missing = sorted({pkg for prog, pkg in PROGRAMS.items() if not _have(prog)})
        pytest.fail(
            f"{name} not found (missing packages: {' '.join(missing) or PROGRAMS.get(name)}). "
            f"The interop tests need real Dovecot, Postfix, swaks and Prometheus; "
            f"tools/bootstrap.sh test "
            f"installs them when run as root, or run:\n  {INSTALL_LINE}",
            pytrace=False,
        )
    return found


def _have(name: str) -> bool:
    return shutil.which(name, path=_SEARCH_PATH) is not None


def require_programs() -> None:
    """Fail (never skip) with the install line unless every program is installed."""
    for name in PROGRAMS:
        program(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def can_connect(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def render(template: Path, values: Mapping[str, object]) -> str:
    """The template with every ``@NAME@`` replaced; an unknown placeholder is an error."""
    text = template.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    left = sorted(set(re.findall(r"@([A-Z_]+)@", text)))
    if left:
        raise AssertionError(f"{template}: no value for {', '.join(left)}")
    return text


def mtrkmta_options(snippet: str, **values: object) -> tuple[tuple[str, object], ...]:
    """``node_config`` options from one of the TOML snippets in ``mtrkmta/`` (the docs show them).

    Placeholders are filled in first; ``[routes]`` entries become ``--route``-style
    ``DOMAIN=TARGET`` overrides, every other key a ``section.key`` override.
    """
    document = tomllib.loads(render(HERE / "mtrkmta" / snippet, values))
    options: list[tuple[str, object]] = []
    for section, table in document.items():
        for key, value in table.items():
            if section == "routes":
                options.append(("routes", f"{key}={value}"))
            else:
                setting = tuple(value) if isinstance(value, list) else value
                options.append((f"{section}.{key}", setting))
    return tuple(options)


# -- the lab directory and its logs ----------------------------------------------------------


class Lab:
    """A per-test directory the daemons' users can reach (pytest's tmp_path is root-only, 0700).

    ``logs`` maps a name to a log file; the conftest prints their ends when a test fails.
    """

    def __init__(self, reaper: Any) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mtrkmta-interop-"))
        self.root.chmod(0o755)
        self.reaper = reaper
        reaper.add(self, [["rmtree", str(self.root)]])  # after the daemons (reaped first)
        self.logs: dict[str, Path] = {}
        self.kept: dict[str, str] = {}  # log texts, read before the directory goes
        self.daemons: list[Daemon] = []

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def close(self) -> None:
        errors = []
        for daemon in reversed(self.daemons):
            try:
                daemon.stop()
            except Exception as exc:  # stop the others all the same
                errors.append(f"{daemon.name}: {exc}")
        self.daemons.clear()
        for name, path in self.logs.items():
            self.kept[name] = path.read_text(errors="replace") if path.exists() else ""
        shutil.rmtree(self.root, ignore_errors=True)
        self.reaper.remove(self)
        if errors:
            raise AssertionError("daemons did not stop cleanly: " + "; ".join(errors))

    def log_tail(self, name: str, lines: int = 150) -> str:
        """The last ``lines`` lines of a log (also after close())."""
        path = self.logs[name]
        if name in self.kept:
            text = self.kept[name]
        elif path.exists():
            text = path.read_text(errors="replace")
        else:
            return f"({path} does not exist)"
        return "\n".join(text.splitlines()[-lines:])


class Daemon(abc.ABC):
    """One long-running program, started in the foreground as a subprocess."""

    name = "daemon"

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = lab.path(f"{self.name}.log")
        lab.logs[self.name] = self.log
        self.port = 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _spawn(self, argv: Sequence[str], cleanup: list[list[object]]) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.lab.reaper.add(self, cleanup or [["kill", self.proc.pid, argv[0]]])
        self.lab.daemons.append(self)

    def _wait_listening(self, port: int) -> bool:
        """True once ``port`` answers; False if the process died first (say, port taken)."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if can_connect(port):
                return self.proc.poll() is None  # (not another program that took the port)
            if self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        log = self.lab.log_tail(self.name, 40)
        raise AssertionError(f"{self.name} not listening on {port} after {START_TIMEOUT}s:\n{log}")

    def start(self) -> None:
        """Start on a fresh port; retried, since another process may take the port first."""
        for _ in range(3):
            self.port = free_port()
            self._start_once()
            if self._wait_listening(self.port):
                return
            self._reap()
        raise AssertionError(f"{self.name} did not start:\n{self.lab.log_tail(self.name, 40)}")

    @abc.abstractmethod
    def _start_once(self) -> None:
        """Spawn the program once (each daemon knows its own command line)."""

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.wait(timeout=10)
        self.lab.reaper.remove(self)
        if self in self.lab.daemons:
            self.lab.daemons.remove(self)

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.lab.reaper.remove(self)


# -- Dovecot ---------------------------------------------------------------------------------


class Dovecot(Daemon):
    """``dovecot -F`` with an LMTP listener only (``dovecot/dovecot.conf.in``).

    Mailboxes are the lines of ``dovecot/users``; ``full@example.test`` has a 1-byte
    quota (``dovecot/special-users``). ``quota_tempfail`` makes a full mailbox a
    ``452 4.2.2`` instead of ``552 5.2.2``.
    """

    name = "dovecot"

    def __init__(self, lab: Lab, *, quota_tempfail: bool = False) -> None:
        super().__init__(lab)
        self.quota_tempfail = quota_tempfail
        self.dir = lab.path("dovecot")
        self.config = self.dir / "dovecot.conf"

    def _start_once(self) -> None:
        for sub in ("run", "state", "mail"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        if IS_ROOT:
            user = group = "dovecot"
            auth_worker, mail_uid, mail_gid = "root", NOBODY, NOBODY
            os.chown(self.dir / "mail", NOBODY, NOBODY)
        else:
            import grp
            import pwd

            user = pwd.getpwuid(os.getuid()).pw_name
            group = grp.getgrgid(os.getgid()).gr_name
            auth_worker, mail_uid, mail_gid = user, os.getuid(), os.getgid()
        for name in ("users", "special-users"):
            shutil.copyfile(HERE / "dovecot" / name, self.dir / name)
            (self.dir / name).chmod(0o644)
        self.config.write_text(
            render(
                HERE / "dovecot" / "dovecot.conf.in",
                {
                    "DIR": self.dir,
                    "LMTP_PORT": self.port,
                    "INTERNAL_USER": user,
                    "INTERNAL_GROUP": group,
                    "AUTH_WORKER_USER": auth_worker,
                    "MAIL_UID": mail_uid,
                    "MAIL_GID": mail_gid,
                    "QUOTA_TEMPFAIL": "yes" if self.quota_tempfail else "no",
                },
            )
        )
        dovecot = program("dovecot")
        check = subprocess.run(
            [dovecot, "-c", str(self.config), "-n"], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise AssertionError(f"dovecot rejects {self.config}:\n{check.stdout}{check.stderr}")
        self._spawn([dovecot, "-F", "-c", str(self.config)], [])

    def maildir(self, address: str) -> list[Path]:
        """The messages in ``address``'s Maildir ``new/``, oldest name first."""
        new = self.dir / "mail" / address.lower() / "new"
        return sorted(new.iterdir()) if new.is_dir() else []


# -- Postfix ---------------------------------------------------------------------------------


class Postfix(Daemon):
    """``postfix -c DIR start-fg`` (``postfix/main.cf.in`` and ``master.cf.in``). Root only.

    smtpd listens on ``port``; mail goes to ``relayhost = [127.0.0.1]:relay_port``
    with ``default_transport = smtp``, or wherever ``default_transport`` says.
    """

    name = "postfix"

    def __init__(self, lab: Lab, *, relay_port: int = 9, default_transport: str = "smtp") -> None:
        super().__init__(lab)
        if not IS_ROOT:
            pytest.fail(
                "Postfix's master daemon only runs as root: run the interop tests as root "
                "(tools/bootstrap.sh test does, on CI)",
                pytrace=False,
            )
        self.dir = lab.path("postfix")
        self.etc = self.dir / "etc"
        self.relay_port = relay_port
        self.default_transport = default_transport

    def _start_once(self) -> None:
        postfix = program("postfix")
        for sub in ("etc", "queue", "data"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        values = {
            "DIR": self.dir,
            "SMTPD_PORT": self.port,
            "RELAY_PORT": self.relay_port,
            "DEFAULT_TRANSPORT": self.default_transport,
        }
        for name in ("main.cf", "master.cf"):
            (self.etc / name).write_text(render(HERE / "postfix" / f"{name}.in", values))
        # Postfix's ownership rules: configuration and queue directory root's and not
        # group/world-writable, data_directory the mail owner's.
        for path in (self.etc, self.etc / "main.cf", self.etc / "master.cf", self.dir / "queue"):
            os.chown(path, 0, 0)
        (self.dir / "queue").chmod(0o755)
        shutil.chown(self.dir / "data", "postfix")
        (self.dir / "data").chmod(0o700)
        check = subprocess.run(
            [postfix, "-c", str(self.etc), "check"], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise AssertionError(f"postfix check failed:\n{check.stdout}{check.stderr}")
        self._spawn(
            [postfix, "-c", str(self.etc), "start-fg"],
            [["run", [postfix, "-c", str(self.etc), "stop"]]],
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run(
                [program("postfix"), "-c", str(self.etc), "stop"],
                capture_output=True,
                check=False,
                timeout=30,
            )
            try:  # start-fg's shell wrapper ends once the master has
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        super().stop()

    def queue_listing(self) -> str:
        """``postqueue -p`` output: ``Mail queue is empty`` when nothing is queued."""
        proc = subprocess.run(
            [program("postqueue"), "-c", str(self.etc), "-p"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        return proc.stdout + proc.stderr

    def sent_lines(self) -> list[str]:
        """The delivery log lines that say ``status=sent``."""
        return [line for line in self.log_text().splitlines() if "status=sent" in line]


# -- smtp-sink -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dump:
    """One transaction as smtp-sink wrote it: the ``X-*`` envelope lines, then the message."""

    path: Path
    mail_args: str
    rcpt_args: tuple[str, ...]
    message: bytes

    def header(self, name: str) -> list[str]:
        """Values of a header field of the message (unfolded, whitespace-trimmed)."""
        head = self.message.split(b"\n\n", 1)[0].decode("utf-8", "replace")
        unfolded = re.sub(r"\n[ \t]+", " ", head)
        prefix = name.lower() + ":"
        return [
            line[len(prefix) :].strip()
            for line in unfolded.splitlines()
            if line.lower().startswith(prefix)
        ]


class SmtpSink(Daemon):
    """Postfix's ``smtp-sink``, writing every transaction to ``dump/`` (see :class:`Dump`)."""

    name = "smtp-sink"

    def __init__(self, lab: Lab, *, backlog: int = 256) -> None:
        super().__init__(lab)
        self.dump_dir = lab.path("sink")
        self.backlog = backlog

    def _start_once(self) -> None:
        self.dump_dir.mkdir(exist_ok=True)
        argv = [program("smtp-sink"), "-h", "sink.example.test"]
        if IS_ROOT:
            shutil.chown(self.dump_dir, "postfix")
            argv += ["-u", "postfix"]
        argv += ["-d", f"{self.dump_dir}/%H%M%S.", f"{HOST}:{self.port}", str(self.backlog)]
        self._spawn(argv, [])

    def dumps(self) -> list[Dump]:
        found = []
        for path in sorted(self.dump_dir.iterdir()):
            data = path.read_bytes()
            envelope, _, message = data.partition(b"\nReceived: ")
            lines = envelope.decode("utf-8", "replace").splitlines()
            mail = [line[13:] for line in lines if line.startswith("X-Mail-Args: ")]
            rcpts = [line[13:] for line in lines if line.startswith("X-Rcpt-Args: ")]
            found.append(Dump(path, mail[0] if mail else "", tuple(rcpts), b"Received: " + message))
        return found

    def count(self) -> int:
        return sum(1 for _ in self.dump_dir.iterdir())


# -- a raw SMTP/LMTP client that sends exactly what it is told --------------------------------


@dataclass
class Reply:
    code: int
    lines: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return " | ".join(self.lines)


class Client:
    """Blocking raw-socket client: tests choose every parameter (MTRK=, ENVID=, ...)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
        self.buffer = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> Reply:
        reply = Reply(0)
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise AssertionError(f"connection closed; partial reply {reply}")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\r\n", 1)
            line = raw.decode("utf-8", "replace")
            reply.lines.append(line)
            if len(line) < 4 or line[3] != "-":
                reply.code = int(line[:3])
                return reply

    def command(self, line: str) -> Reply:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def expect(self, line: str, code: int) -> Reply:
        reply = self.command(line)
        assert reply.code == code, f"{line!r} -> {reply}"
        return reply


def stuff(content: bytes) -> bytes:
    """Dot-stuffed DATA payload ending in CRLF.CRLF."""
    lines = content.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = (b"." + line if line.startswith(b".") else line for line in lines)
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


QUEUED_AS = re.compile(r"queued as (\S+)")


def send_mail(
    port: int,
    sender: str,
    recipients: Sequence[tuple[str, str]],
    content: bytes,
    *,
    mail_params: str = "",
    helo: str = "client.example.test",
) -> str:
    """One SMTP transaction with the given MAIL and per-RCPT parameters; the reply to the dot."""
    with Client(port) as client:
        assert client.reply().code == 220
        client.expect(f"EHLO {helo}", 250)
        client.expect(f"MAIL FROM:<{sender}>{' ' + mail_params if mail_params else ''}", 250)
        for address, params in recipients:
            client.expect(f"RCPT TO:<{address}>{' ' + params if params else ''}", 250)
        client.expect("DATA", 354)
        client.send(stuff(content))
        done = client.reply()
        assert done.code == 250, f"after the dot: {done}"
        client.command("QUIT")
        return str(done)


def queue_id(reply: str) -> str:
    match = QUEUED_AS.search(reply)
    assert match is not None, f"no queue id in {reply!r}"
    return match.group(1)


def run(
    argv: Sequence[str], *, timeout: float = 120, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a client program; its output is in the assertion message when it fails."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{output}"
    return proc


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> Any:
    """Blocking: poll until ``predicate()`` is truthy (returning it), or fail saying ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# -- the mtrkmta node ------------------------------------------------------------------------


@asynccontextmanager
async def running_mtrkmta(
    lab: Lab,
    snippet: str,
    *,
    options: tuple[tuple[str, object], ...] = (),
    **values: object,
) -> AsyncIterator[MTAService]:
    """An in-process node configured by ``mtrkmta/<snippet>`` (and ``options``), logging to
    the lab's ``mtrkmta.log``; always stopped afterwards."""
    log_path = lab.path("mtrkmta.log")
    lab.logs["mtrkmta"] = log_path
    with open(log_path, "a", encoding="utf-8") as log_file:
        observer = textFileLogObserver(log_file)
        globalLogPublisher.addObserver(observer)
        try:
            config = node_config(
                lab.path("mtrkmta"),
                hostname="mx.example.test",
                options=mtrkmta_options(snippet, **values) + options,
            )
            node = await start_node(config)
            try:
                yield node
            finally:
                await stop_node(node)
        finally:
            globalLogPublisher.removeObserver(observer)


def in_thread(fn: Callable[..., R], *args: Any, **kwargs: Any) -> Deferred[R]:
    """Run a blocking helper (client, program, wait) off the reactor thread."""
    return threads.deferToThread(fn, *args, **kwargs)


async def eventually(
    check: Callable[[], Awaitable[T | None] | T | None], what: str, timeout: float = 30.0
) -> T:
    """Poll ``check`` on the reactor (sync or async) until it gives something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.05)


async def final_record(node: MTAService, queue_id: str, timeout: float = 30.0) -> StoredMessage:
    """The tracking record of ``queue_id`` once no recipient is queued or in flight any more.

    A recipient left ``deferred`` counts as settled (it waits for its retry).
    """
    assert node.tracking is not None
    tracking = node.tracking

    async def settled() -> StoredMessage | None:
        record = await tracking.message(queue_id)
        if record is None:
            return None
        busy = {RecipientState.QUEUED, RecipientState.INFLIGHT}
        return None if any(r.state in busy for r in record.recipients) else record

    return await eventually(settled, f"{queue_id} to leave the queue", timeout)


def outcome(record: StoredMessage, address: str) -> Any:
    """The stored recipient ``address`` of ``record``."""
    (recipient,) = [r for r in record.recipients if r.address == address]
    return recipient


async def start_dovecot(lab: Lab, **settings: bool) -> Dovecot:
    """A Dovecot LMTP server in ``lab`` (settings as Dovecot takes them), started."""
    dovecot = Dovecot(lab, **settings)
    await in_thread(dovecot.start)
    return dovecot
