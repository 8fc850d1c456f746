"""Processes the benchmark drives on loopback: Postfix, Dovecot, smtp-sink, PostgreSQL, mtrkmta."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
CONF = HERE / "conf"
LOOPBACK = "127.0.0.1"
SINK_HOSTNAME = "sink.example.test"
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


class LabError(RuntimeError):
    """A process of the lab did not start, or did not stop."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def greet(port: int, timeout: float = 2.0, greeting: bytes = b"220") -> bool:
    """True when a server on ``port`` answers with ``greeting`` (SMTP/LMTP 220, MTQP +OK)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            data = sock.recv(512)
            ok = data.startswith(greeting)
            if ok:
                sock.sendall(b"QUIT\r\n")
                sock.recv(512)
            return ok
    except OSError:
        return False


def wait_ready(
    port: int,
    proc: subprocess.Popen[bytes] | None,
    what: str,
    log: Path,
    timeout: float = 30,
    greeting: bytes = b"220",
) -> None:
    """Wait up to ``timeout`` s for a greeting on ``port``; fail early when ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LabError(f"{what} exited with {proc.returncode}; see {log}")
        if greet(port, greeting=greeting):
            return
        time.sleep(0.1)
    raise LabError(f"{what} did not answer on port {port} within {timeout:g} s; see {log}")


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 15
) -> bool:
    """Signal ``proc`` (started by this harness), wait, SIGKILL it if it lingers: True if it did."""
    if proc.poll() is not None:
        return False
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return True
    return False


def fill(template: Path, target: Path, values: dict[str, str]) -> None:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    target.write_text(text)


def cpu_times() -> list[int]:
    """The aggregate jiffies of /proc/stat: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as stat:
        return [int(field) for field in stat.readline().split()[1:9]]


def cpu_busy(before: list[int], after: list[int]) -> float:
    """Percent of all CPUs busy (not idle, not iowait) between two :func:`cpu_times`."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta) or 1
    return 100.0 * (total - delta[3] - delta[4]) / total


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` (all its threads) and of its
    running children (mtrkmta's worker processes)."""
    user = system = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(entry) == pid or int(fields[1]) == pid:
            user += int(fields[11])
            system += int(fields[12])
    ticks = os.sysconf("SC_CLK_TCK")
    return user / ticks, system / ticks


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 on), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    """Every live (or zombie) process below ``root``, from the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _own_cpu(pid: int, fields: list[str], ticks: int) -> tuple[float, float]:
    """User and system seconds of one live (or zombie) process, its reaped children apart.

    /proc/PID/stat gives them in clock ticks, each rounded down: a process born during a
    run would lose half a tick (5 ms) per field on average, which adds up for Postfix's
    dozens of new daemons. A single-threaded process's exact total is the run time of its
    one thread in /proc/PID/schedstat (ns), split in the ratio of utime to stime.
    """
    utime, stime = int(fields[11]), int(fields[12])
    if int(fields[17]) == 1:  # num_threads
        try:
            with open(f"/proc/{pid}/schedstat") as schedstat:
                total = int(schedstat.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            pass
        else:
            share = utime / (utime + stime) if utime + stime else 0.5
            return total * share, total * (1 - share)
    return utime / ticks, stime / ticks


def tree_cpu_seconds(root: int) -> tuple[float, float]:
    """User and system CPU seconds of ``root`` and of every process below it, ever.

    Live processes count their own time (:func:`_own_cpu`) plus their cutime/cstime (the
    children they have reaped); a child that ended and was reaped is in its parent's
    cutime/cstime, and no longer in /proc. Postfix's master reaps its daemons as they exit
    after max_idle or max_use, so this is how their CPU is counted. A child reaped while
    /proc is being read could be missed or counted twice, so the read is repeated until
    ``root``'s cumulative children times did not move during it.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    for _ in range(20):
        before = _stat_fields(root)
        if before is None:
            raise LabError(f"process {root} is gone: its CPU time cannot be read")
        user = system = 0.0
        for pid in descendants(root):
            fields = _stat_fields(pid)
            if fields is not None:  # fields 14-17: utime stime cutime cstime
                own = _own_cpu(pid, fields, ticks)
                user += own[0] + int(fields[13]) / ticks
                system += own[1] + int(fields[14]) / ticks
        after = _stat_fields(root)
        if after is not None and after[13:15] == before[13:15]:
            own = _own_cpu(root, after, ticks)
            user += own[0] + int(after[13]) / ticks
            system += own[1] + int(after[14]) / ticks
            return user, system
    raise LabError(f"the children of process {root} kept being reaped while their CPU was read")


def tree_rss_kib(root: int) -> tuple[int, int, int]:
    """Processes, summed VmRSS and summed Pss (KiB) of ``root`` and every process below it.

    VmRSS counts pages shared between processes (libraries, Postfix's daemons) once per
    process; Pss divides each shared page among the processes that map it.
    """
    count = rss = pss = 0
    for pid in [root, *descendants(root)]:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                text = rollup.read()
        except OSError:
            continue
        count += 1
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key == "Rss":
                rss += int(rest.split()[0])
            elif key == "Pss":
                pss += int(rest.split()[0])
    return count, rss, pss


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB, from /proc/PID/status."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


class Sink:
    """Postfix's smtp-sink with its counter (``-c``), started fresh for every run."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.port = port
        self.out = workdir / f"sink-{port}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                ["smtp-sink", "-u", "postfix", "-h", SINK_HOSTNAME, "-c", f"{LOOPBACK}:{self.port}",
                 "256"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        wait_ready(self.port, self.proc, "smtp-sink", self.out)

    def count(self) -> int:
        """Messages the sink has received (the last ``mesg=N`` of its counter line)."""
        try:
            with open(self.out, "rb") as out:
                out.seek(0, os.SEEK_END)
                out.seek(max(0, out.tell() - 120))
                tail = out.read()
        except FileNotFoundError:
            return 0
        for piece in reversed(tail.replace(b"\r", b"\n").split(b"\n")):
            _, found, number = piece.rpartition(b"mesg=")
            if found and number.strip().isdigit():
                return int(number.strip())
        return 0

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class Blackhole:
    """A next hop that accepts TCP connections and never says anything: delivery stalls."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LOOPBACK, port))
        self.listener.listen(512)
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        # shutdown() wakes the accept() blocked in the thread; close() alone would not
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)
        for conn in self.held:
            conn.close()


class Postfix:
    """A self-contained Postfix (config, queue and data below ``root``), as in the lab."""

    def __init__(self, root: Path, smtpd_port: int, relay_port: int, transport: str) -> None:
        self.root = root
        self.smtpd_port = smtpd_port
        self.etc = root / "postfix" / "etc"
        self.queue = root / "postfix" / "queue"
        self.log = root / "postfix" / "postfix.log"
        self.values = {
            "LAB": str(root),
            "SMTPD_PORT": str(smtpd_port),
            "RELAY_PORT": str(relay_port),
            "DEFAULT_TRANSPORT": transport,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        data = self.root / "postfix" / "data"
        for path in (self.etc, self.queue, data):
            path.mkdir(parents=True, exist_ok=True)
        fill(CONF / "postfix-main.cf.in", self.etc / "main.cf", self.values)
        fill(CONF / "postfix-master.cf.in", self.etc / "master.cf", self.values)
        for path in (self.etc, self.etc / "main.cf", self.etc / "master.cf", self.queue):
            os.chown(path, 0, 0)
        self.etc.chmod(0o755)
        self.queue.chmod(0o755)
        os.chown(data, pwd.getpwnam("postfix").pw_uid, -1)
        data.chmod(0o700)
        subprocess.run(["postfix", "-c", str(self.etc), "check"], check=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["postfix", "-c", str(self.etc), "start-fg"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        wait_ready(self.smtpd_port, self.proc, "postfix", self.log)

    def queue_files(self) -> int:
        """Files in maildrop, incoming, active, deferred and hold: messages still queued."""
        return sum(
            len(files)
            for name in ("maildrop", "incoming", "active", "deferred", "hold")
            for _, _, files in os.walk(self.queue / name)
        )

    def queue_listing_empty(self) -> bool:
        out = subprocess.run(
            ["postqueue", "-c", str(self.etc), "-p"], capture_output=True, text=True, check=False
        ).stdout
        return "Mail queue is empty" in out

    def statuses(self) -> Counter[str]:
        """``status=...`` counts of delivery agents (smtp, lmtp) in the log."""
        counts: Counter[str] = Counter()
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return counts
        for line in text.splitlines():
            if "status=" in line and ("postfix/smtp[" in line or "postfix/lmtp[" in line):
                counts[line.split("status=", 1)[1].split()[0]] += 1
        return counts

    @property
    def master_pid(self) -> int:
        """The master daemon (``postfix start-fg`` runs it as a child of the script's shell)."""
        pidfile = self.queue / "pid" / "master.pid"
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError) as exc:
            raise LabError(f"no Postfix master pid in {pidfile}: {exc}") from exc

    def stop(self) -> None:
        if self.proc is None:
            return
        subprocess.run(
            ["postfix", "-c", str(self.etc), "stop"], capture_output=True, check=False, timeout=60
        )
        stop_process(self.proc, grace=20)
        pidfile = self.queue / "pid" / "master.pid"
        try:
            master = int(pidfile.read_text().strip())
            os.kill(master, 0)
        except (OSError, ValueError):
            pass
        else:  # the master outlived `postfix stop`: it is ours, end it
            os.kill(master, signal.SIGKILL)
        self.proc = None


class Dovecot:
    """Dovecot LMTP (any local part @example.test exists) with Maildirs below ``root/mail``."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.dir = root / "dovecot"
        self.conf = self.dir / "dovecot.conf"
        self.log = self.dir / "dovecot.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for sub in ("run", "state"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        mail = self.root / "mail"
        mail.mkdir(exist_ok=True)
        os.chown(mail, 65534, 65534)
        (self.dir / "domains").write_text("example.test:{PLAIN}unused::::::\n")
        (self.dir / "special-users").write_text(
            "full@example.test:::::::userdb_quota_rule=*:storage=1B\n"
        )
        values = {
            "LAB": str(self.root),
            "LMTP_PORT": str(self.port),
            "MAIL_UID": "65534",
            "MAIL_GID": "65534",
            "INTERNAL_USER": "dovecot",
            "INTERNAL_GROUP": "dovecot",
            "AUTH_WORKER_USER": "root",
            "RCPT_CHECK_QUOTA": "no",
            "QUOTA_TEMPFAIL": "no",
        }
        fill(CONF / "dovecot.conf.in", self.conf, values)
        subprocess.run(
            ["dovecot", "-c", str(self.conf), "-n"], check=True, stdout=subprocess.DEVNULL
        )
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["dovecot", "-F", "-c", str(self.conf)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        wait_ready(self.port, self.proc, "dovecot", self.log)

    def delivered(self, address: str) -> int:
        """Messages in the Maildir ``new/`` of ``address``."""
        try:
            return len(os.listdir(self.root / "mail" / address.lower() / "new"))
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class Postgres:
    """A throw-away PostgreSQL 15 cluster below ``root``, owned and run by ``postgres``.

    The server refuses to run as root, so initdb and pg_ctl run through ``runuser``.
    Settings are the defaults (fsync on), but for loopback-only access, a socket in
    ``root`` and a larger ``max_wal_size`` so that the bulk load is not one checkpoint
    after another.
    """

    def __init__(self, root: Path, port: int) -> None:
        self.root = root / "postgres"
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = port
        self.user = "mtrkmta"
        self.password = secrets.token_hex(16)
        self.started = False

    def _run(self, *args: str, timeout: float = 120) -> None:
        command = ["runuser", "-u", "postgres", "--", *args]
        env = {**os.environ, "PGPASSWORD": self.password}
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=timeout, env=env
        )
        if done.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise LabError(f"{' '.join(args[:2])} exited {done.returncode}: {done.stderr}{tail}")

    def version(self) -> str:
        done = subprocess.run(
            [str(POSTGRES_BIN / "postgres"), "--version"], capture_output=True, text=True,
            check=False,
        )  # fmt: skip
        words = done.stdout.split()  # postgres (PostgreSQL) 15.18 (Debian ...)
        return words[2] if len(words) > 2 else "?"

    def start(self) -> None:
        self.root.mkdir(parents=True)
        shutil.chown(self.root, "postgres", "postgres")
        self.root.chmod(0o700)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        shutil.chown(pwfile, "postgres", "postgres")
        pwfile.chmod(0o600)
        self._run(
            str(POSTGRES_BIN / "initdb"), "--pgdata", str(self.data), "--username", self.user,
            "--pwfile", str(pwfile), "--auth", "scram-sha-256", "--encoding", "UTF8",
            "--locale", "C",
        )  # fmt: skip
        pwfile.unlink()
        options = " ".join(
            f"-c {setting}"
            for setting in (
                "listen_addresses=127.0.0.1",
                f"port={self.port}",
                f"unix_socket_directories={self.root}",
                "max_wal_size=4GB",
            )
        )
        self._run(
            str(POSTGRES_BIN / "pg_ctl"), "--pgdata", str(self.data), "--log", str(self.log),
            "--options", options, "--wait", "--timeout", "60", "start",
        )  # fmt: skip
        self.started = True

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database``, as the cluster's superuser, over TCP."""
        return f"postgresql+psycopg://{self.user}:{self.password}@{LOOPBACK}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name``; its URL."""
        self._run(
            str(POSTGRES_BIN / "createdb"), "--host", str(self.root), "--port", str(self.port),
            "--username", self.user, name,
        )  # fmt: skip
        return self.url(name)

    def stop(self) -> None:
        if self.started:
            self._run(str(POSTGRES_BIN / "pg_ctl"), "--pgdata", str(self.data), "--mode",
                      "fast", "--wait", "stop")  # fmt: skip
            self.started = False


class Mtrkmta:
    """``mtrkmta serve`` with a fresh data directory, fsync on, SMTP on ``port`` (MTQP on
    ``mtqp_port`` and the tracking store at ``database``, when given)."""

    def __init__(
        self,
        python: str,
        root: Path,
        port: int,
        routes: dict[str, str],
        limits: dict[str, int] | None = None,
        tracking: dict[str, int] | None = None,
        extra: dict[str, dict[str, str]] | None = None,
        mtqp_port: int | None = None,
        database: str | None = None,
    ) -> None:
        self.python = python
        self.root = root
        self.port = port
        self.routes = routes
        self.limits = limits or {}
        self.tracking = tracking or {}
        self.extra = extra or {}  # section -> key -> TOML value, over everything else
        self.mtqp_port = mtqp_port  # None: no MTQP listener
        self.database = database  # SQLAlchemy URL; None: tracking.sqlite in the data directory
        self.ready_timeout = 30.0  # seconds from start to the greetings
        self.data = root / "data"
        self.config = root / "mtrkmta.toml"
        self.log = root / "mtrkmta.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop_grace = 20.0
        self.stop_seconds: float | None = None
        self.killed = False

    def write_config(self) -> None:
        mtqp = f'"tcp:{self.mtqp_port}:interface={LOOPBACK}"' if self.mtqp_port else '"none"'
        server = {"hostname": '"mta.bench.test"', "data_dir": f'"{self.data}"'}
        if self.database is not None:
            server["database"] = json.dumps(self.database)  # a TOML basic string
        sections: dict[str, dict[str, str]] = {
            "server": server,
            "listeners": {
                "smtp": f'"tcp:{self.port}:interface={LOOPBACK}"',
                "lmtp": '"none"',
                "mtqp": mtqp,
            },
            "durability": {"fsync": "true"},
            "limits": {key: str(value) for key, value in self.limits.items()},
            "tracking": {key: str(value) for key, value in self.tracking.items()},
        }
        for section, values in self.extra.items():
            sections.setdefault(section, {}).update(values)
        lines = ["# written by bench/run.py"]
        for section, values in sections.items():
            if values:
                lines.append(f"[{section}]")
                lines += [f"{key} = {value}" for key, value in values.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def check_config(self) -> str | None:
        """Write the config and run ``mtrkmta check-config`` on it: None if valid, else why."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config()
        check = subprocess.run(
            [self.python, "-m", "mtrkmta.cli.main", "check-config", str(self.config)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return None if check.returncode == 0 else check.stderr.strip()

    def command(self) -> list[str]:
        args = [self.python, "-m", "mtrkmta.cli.main", "serve", "--config", str(self.config)]
        for domain, target in self.routes.items():
            args += ["--route", f"{domain}={target}"]
        return args

    def start(self, stdout: IO[bytes] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config()  # a bad one makes `serve` exit 2: wait_ready reports it
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=stdout or log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.root,
            )  # fmt: skip
        wait_ready(self.port, self.proc, "mtrkmta", self.log, self.ready_timeout)
        if self.mtqp_port:
            wait_ready(self.mtqp_port, self.proc, "mtrkmta MTQP", self.log, 30, b"+OK")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def queue_list(self) -> list[dict[str, object]]:
        """``mtrkmta queue --data-dir DIR --json list`` of the running server."""
        out = subprocess.run(
            [self.python, "-m", "mtrkmta.cli.main", "queue", "--data-dir", str(self.data),
             "--json", "list"],
            capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        result = json.loads(out.stdout)
        assert isinstance(result, list)
        return result

    def stop(self) -> None:
        """SIGTERM; after ``stop_grace`` s SIGKILL. Records ``stop_seconds`` and ``killed``."""
        if self.proc is not None:
            start = time.monotonic()
            self.killed = stop_process(self.proc, grace=self.stop_grace)
            self.stop_seconds = time.monotonic() - start
            self.proc = None

    def tracking_summary(self) -> dict[str, object]:
        """Counts from the tracking store (read after the server stopped)."""
        path = self.data / "tracking.sqlite"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            messages = db.execute("SELECT count(*) FROM messages").fetchone()[0]
            tracked = db.execute(
                "SELECT count(*) FROM messages WHERE certifier IS NOT NULL AND envid IS NOT NULL"
            ).fetchone()[0]
            states = dict(db.execute("SELECT state, count(*) FROM recipients GROUP BY state"))
        return {"messages": messages, "tracked": tracked, "states": states}

    def cleanup(self) -> None:
        shutil.rmtree(self.data, ignore_errors=True)


def versions(python: str) -> dict[str, str]:
    def out(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        except OSError:
            return "?"
        return done.stdout.strip() or done.stderr.strip() or "?"

    probe = (
        "import sys, twisted, sqlalchemy; "
        "print(sys.version.split()[0], twisted.__version__, sqlalchemy.__version__)"
    )
    py, tw, sa = [*out([python, "-c", probe]).split(), "?", "?", "?"][:3]
    cpu_model = "?"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    repo = HERE.parent
    commit = out(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    changed = out(["git", "-C", str(repo), "status", "--porcelain", "--", "mtrkmta"])
    if changed not in ("", "?"):
        commit += " + uncommitted changes in mtrkmta/"
    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": cpu_model,
        "kernel": os.uname().release,
        "python": py,
        "twisted": tw,
        "sqlalchemy": sa,
        "postfix": out(["postconf", "-d", "-h", "mail_version"]),
        "dovecot": out(["dovecot", "--version"]),
        "mtrkmta_commit": commit,
        "fsync": "on (mtrkmta [durability] fsync = true; SQLite synchronous=FULL)",
    }
