"""Resident memory of mtrkmta under two floods on loopback: run with ``bench/memory``."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lab import LOOPBACK, LabError, Mtrkmta, free_port, rss_kib, versions  # noqa: E402

MiB = 1 << 20
TARGET_MIB = 64.0  # growth allowed with 10 attackers sending --data-mb each at once
HELO = "attacker.example.test"
SENDER = "a@x.test"
RECIPIENT = "m@x.test"
LOCAL_DOMAINS = '["localhost", "x.test"]'  # the default (localhost) plus x.test
SAMPLE_EVERY = 0.1  # seconds between two VmRSS readings
SETUP_TIMEOUT = 10.0  # seconds for connect, greeting and the commands before the flood
CHUNK = 64 * 1024  # octets per send()
ATTACKS = ("data", "help")
TITLES = {
    "data": "DATA amplification: EHLO, MAIL, RCPT, DATA, then `ab<CRLF>` lines, no final dot",
    "help": "no backpressure: `HELP<CRLF>` commands, replies never read",
}
PATTERNS = {"data": b"ab\r\n", "help": b"HELP\r\n"}


# ---------------------------------------------------------------- memory sampling


class Sampler:
    """VmRSS of one process every ``SAMPLE_EVERY`` s in a thread, with a safety cap."""

    def __init__(self, pid: int, cap_kib: int, over_cap: threading.Event) -> None:
        self.pid = pid
        self.cap_kib = cap_kib
        self.over_cap = over_cap
        self.samples: list[tuple[float, int]] = []  # (monotonic time, VmRSS KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kib = rss_kib(self.pid)["VmRSS"]
            except (OSError, KeyError):
                return  # the process is gone
            self.samples.append((time.monotonic(), kib))
            if kib > self.cap_kib:
                self.over_cap.set()
            self._stop.wait(SAMPLE_EVERY)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def between(self, start: float, end: float = float("inf")) -> list[int]:
        return [kib for when, kib in list(self.samples) if start <= when <= end]

    def last_growth(self) -> float:
        """Monotonic time of the last sample that set a new maximum."""
        best, when_best = -1, 0.0
        for when, kib in list(self.samples):
            if kib > best:
                best, when_best = kib, when
        return when_best


# ---------------------------------------------------------------- one attacker connection


class SetupFailed(Exception):
    """The server did not let the attacker reach the flood (refused, closed, timed out)."""


@dataclass
class Attacker:
    """One connection: the commands before the flood, the flood, and how it ended."""

    attack: str
    port: int
    planned: int  # octets of flood to send
    sent: int = 0
    setup: str = ""  # why the flood never started, when it did not
    send_error: str = ""  # errno name when send() failed: the server closed or reset
    stopped_by: str = ""  # "time limit" or "RSS cap" when the harness stopped the flood
    last_reply: str = ""  # the last complete reply line read (DATA: read throughout)
    eof: bool = False  # the server closed its side
    read_error: str = ""
    sock: socket.socket | None = field(default=None, repr=False)
    _pending: bytes = field(default=b"", repr=False)

    # -- before the flood (replies read, one at a time) --------------------------------

    def connect(self) -> None:
        try:
            self.sock = socket.create_connection((LOOPBACK, self.port), timeout=SETUP_TIMEOUT)
            self._expect("greeting", 220)
            self._command(f"EHLO {HELO}", 250)
            if self.attack == "data":
                self._command(f"MAIL FROM:<{SENDER}>", 250)
                self._command(f"RCPT TO:<{RECIPIENT}>", 250)
                self._command("DATA", 354)
            self.sock.settimeout(0.5)  # from now on the threads check their flags twice a second
        except (OSError, SetupFailed) as error:
            self.setup = str(error) or type(error).__name__

    def _command(self, line: str, code: int) -> None:
        assert self.sock is not None
        self.sock.sendall(line.encode("ascii") + b"\r\n")
        self._expect(line.split()[0], code)

    def _expect(self, what: str, code: int) -> None:
        assert self.sock is not None
        while True:
            end = self._pending.find(b"\r\n")
            while end < 0:
                data = self.sock.recv(4096)
                if not data:
                    raise SetupFailed(f"{what}: connection closed")
                self._pending += data
                end = self._pending.find(b"\r\n")
            line, self._pending = self._pending[:end], self._pending[end + 2 :]
            text = line.decode("ascii", "replace")
            if line[3:4] == b"-":
                continue
            if not line.startswith(str(code).encode()):
                raise SetupFailed(f"{what}: {text}")
            return

    # -- the flood ------------------------------------------------------------------------

    def flood(self, go: threading.Barrier, seconds: float, over_cap: threading.Event) -> None:
        """Wait for every attacker, then send ``planned`` octets as fast as the server reads."""
        try:
            go.wait()
        except threading.BrokenBarrierError:
            return
        deadline = time.monotonic() + seconds
        if self.sock is None or self.setup:
            return
        pattern = PATTERNS[self.attack]
        block = memoryview(pattern * (CHUNK // len(pattern)))
        while self.sent < self.planned:
            if over_cap.is_set():
                self.stopped_by = "RSS cap"
                return
            if time.monotonic() >= deadline:
                self.stopped_by = "time limit"
                return
            try:
                self.sent += self.sock.send(block[: min(len(block), self.planned - self.sent)])
            except TimeoutError:
                continue  # the server is not reading right now
            except OSError as error:
                self.send_error = errno_name(error)
                return

    def read_replies(self, until: threading.Event) -> None:
        """Read whatever the server says until it closes or ``until`` is set (DATA only)."""
        if self.sock is None or self.setup:
            return
        while not until.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as error:
                self.read_error = errno_name(error)
                return
            if not data:
                self.eof = True
                return
            self._remember(data)

    def drain(self, silence: float, limit: float) -> None:
        """After the flood: read the replies held back, up to EOF, ``silence`` s without
        data, or ``limit`` s in all (a server with a backlog may answer for minutes)."""
        if self.sock is None or self.setup or self.eof or self.read_error:
            return
        self.sock.settimeout(silence)
        end = time.monotonic() + limit
        try:
            while time.monotonic() < end:
                data = self.sock.recv(1 << 20)
                if not data:
                    self.eof = True
                    return
                self._remember(data)
        except TimeoutError:
            return
        except OSError as error:
            self.read_error = errno_name(error)

    def _remember(self, data: bytes) -> None:
        tail = (self._pending + data)[-4096:]
        lines = tail.split(b"\r\n")
        self._pending = lines.pop()
        if lines and lines[-1]:
            self.last_reply = lines[-1].decode("ascii", "replace")[:80]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def ending(self) -> str:
        """How the connection ended, in a few words."""
        if self.setup:
            return f"refused before the flood: {self.setup}"
        reply = f" after '{self.last_reply}'" if self.last_reply else ""
        if self.send_error:
            return f"closed by the server during the flood ({self.send_error}){reply}"
        sending = f"stopped by the harness ({self.stopped_by})" if self.stopped_by else "all sent"
        if self.eof:
            return f"{sending}, then closed by the server{reply}"
        if self.read_error:
            return f"{sending}, then reset by the server ({self.read_error}){reply}"
        return f"{sending}, server kept it open"


def errno_name(error: OSError) -> str:
    if isinstance(error, BrokenPipeError):
        return "EPIPE"
    if isinstance(error, ConnectionResetError):
        return "ECONNRESET"
    return type(error).__name__


# ---------------------------------------------------------------- one run


@dataclass
class Result:
    """One attack with N attackers against a fresh node."""

    attack: str
    attackers: int
    planned_mib_each: float
    baseline_mib: float = 0.0
    peak_mib: float = 0.0
    growth_mib: float = 0.0
    hwm_mib: float = 0.0  # VmHWM at the end: the true peak, also between two samples
    sent_bytes: int = 0
    sent_bytes_each: list[int] = field(default_factory=list)
    send_seconds: float = 0.0  # from the start until every flood was sent (or stopped)
    seconds_to_peak: float = 0.0
    endings: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the run did not measure what it should


def run_one(args: argparse.Namespace, work: Path, attack: str, attackers: int) -> Result:
    """Start a node, measure its baseline, flood it, watch VmRSS, stop it."""
    mib_each = args.data_mb if attack == "data" else args.help_mb
    result = Result(attack, attackers, mib_each)
    run_dir = work / f"{attack}-{attackers}"
    port = free_port()
    node = Mtrkmta(
        args.python, run_dir, port, {}, extra={"domains": {"local": LOCAL_DOMAINS}}
    )  # fmt: skip
    over_cap = threading.Event()
    try:
        node.start()
    except LabError as error:
        result.problems.append(str(error))
        return result
    sampler = Sampler(node.pid, int(args.rss_cap_mb * 1024), over_cap)
    crowd = [Attacker(attack, port, int(mib_each * MiB)) for _ in range(attackers)]
    try:
        time.sleep(1.0)  # let start-up settle
        sampler.start()
        time.sleep(1.0)
        result.baseline_mib = statistics.median(sampler.between(0)) / 1024
        for attacker in crowd:
            attacker.connect()
        go = threading.Barrier(attackers + 1)
        stop_reading = threading.Event()
        floods = [
            threading.Thread(target=a.flood, args=(go, args.seconds, over_cap), daemon=True)
            for a in crowd
        ]
        readers = [
            threading.Thread(target=a.read_replies, args=(stop_reading,), daemon=True)
            for a in crowd
            if attack == "data"  # the HELP flood never reads while it sends
        ]
        threads = [*floods, *readers]
        for thread in threads:
            thread.start()
        go.wait(SETUP_TIMEOUT)  # every attacker starts at once
        started = time.monotonic()
        deadline = started + args.seconds
        for thread in floods:
            thread.join(max(0.0, deadline - time.monotonic()) + 5)
        result.send_seconds = time.monotonic() - started
        # The server may still be working through what the kernel buffered: watch until
        # VmRSS has not grown for 2 s (at most 20 s more).
        settle_end = time.monotonic() + 20
        while time.monotonic() < settle_end and not over_cap.is_set():
            if time.monotonic() - sampler.last_growth() >= 2.0:
                break
            time.sleep(SAMPLE_EVERY)
        # How did the server end each connection? Read what it still has to say.
        stop_reading.set()
        for thread in readers:
            thread.join(2)
        drains = [threading.Thread(target=a.drain, args=(2.0, 10.0), daemon=True) for a in crowd]
        for thread in drains:
            thread.start()
        for thread in drains:
            thread.join(15)
        sampler.stop()  # then VmHWM covers every sample
        result.hwm_mib = rss_kib(node.pid)["VmHWM"] / 1024
        peak = max(sampler.between(started), default=0)
        result.peak_mib = peak / 1024
        result.growth_mib = result.peak_mib - result.baseline_mib
        result.seconds_to_peak = max(0.0, sampler.last_growth() - started)
    except (OSError, KeyError, threading.BrokenBarrierError) as error:
        result.problems.append(f"{type(error).__name__}: {error}")
    finally:
        sampler.stop()
        for attacker in crowd:
            attacker.close()
        node.stop()
    if node.killed:
        result.notes.append(f"the node did not stop within {node.stop_grace:g} s of SIGTERM")
    result.sent_bytes_each = [attacker.sent for attacker in crowd]
    result.sent_bytes = sum(result.sent_bytes_each)
    result.endings = dict(Counter(attacker.ending() for attacker in crowd))
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


# ---------------------------------------------------------------- report


def environment(python: str) -> dict[str, str]:
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), **versions(python)}


def verdict(result: Result) -> str:
    if result.problems:
        return "no run"
    return "yes" if result.growth_mib < TARGET_MIB else "**no**"


def write_report(
    out: Path, args: argparse.Namespace, env: dict[str, str], results: list[Result]
) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "attackers": args.attacker_counts,
        "data_mb": args.data_mb,
        "help_mb": args.help_mb,
        "seconds": args.seconds,
        "rss_cap_mb": args.rss_cap_mb,
    }
    data = {
        "environment": env,
        "settings": settings,
        "target_growth_mib": TARGET_MIB,
        "runs": [asdict(result) for result in results],
    }
    json_path = out / "memory.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# mtrkmta: memory under attack",
        "",
        f"Measured {env['date']} with `bench/memory` on {env['cpus']} CPUs, Linux "
        f"{env['kernel']}, Python {env['python']}, Twisted {env['twisted']}, mtrkmta "
        f"{env['mtrkmta_commit']}. One fresh node per run (`mtrkmta serve`, default "
        "configuration, one process, local domains localhost and x.test, a new data directory, "
        "fsync on) on 127.0.0.1; its VmRSS from /proc/PID/status every 100 ms. "
        "MB = MiB (2^20 octets).",
        "",
        f"* data: {TITLES['data']}; {args.data_mb:g} MB per attacker.",
        f"* help: {TITLES['help']}; {args.help_mb:g} MB per attacker.",
        "",
        "Every attacker connects and gets through its commands first; then all floods start "
        f"at once. A run stops sending after {args.seconds:g} s (or when VmRSS passes "
        f"{args.rss_cap_mb:g} MB). Target: growth below {TARGET_MIB:g} MB with 10 attackers "
        "at once.",
        "",
        "| attack | attackers | baseline MB | peak MB | growth MB | VmHWM MB | sent MB | send s "
        f"| s to peak | how the server ended the connections | growth < {TARGET_MIB:g} MB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in results:
        endings = "; ".join([*(f"{count} x {text}" for text, count in r.endings.items()), *r.notes])
        if r.problems:
            endings = "PROBLEM: " + "; ".join(r.problems)
        lines.append(
            f"| {r.attack} | {r.attackers} | {r.baseline_mib:,.1f} | {r.peak_mib:,.1f} "
            f"| {r.growth_mib:,.1f} | {r.hwm_mib:,.1f} | {r.sent_bytes / MiB:,.1f} "
            f"| {r.send_seconds:,.1f} | {r.seconds_to_peak:,.1f} | {endings} | {verdict(r)} |"
        )
    lines.append("")
    md_path = out / "memory.md"
    md_path.write_text("\n".join(lines))
    return md_path, json_path


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/memory",
        description="Resident memory of an mtrkmta node under DATA and command floods "
        "(loopback only; a fresh node per run).",
    )
    parser.add_argument(
        "--attackers", default="1,10", help="concurrent connections per run (default: %(default)s)"
    )
    parser.add_argument(
        "--data-mb", type=float, default=34, help="MB of DATA lines per attacker (default: 34)"
    )
    parser.add_argument(
        "--help-mb", type=float, default=13, help="MB of HELP commands per attacker (default: 13)"
    )
    parser.add_argument(
        "--attacks", default=",".join(ATTACKS), help="which floods (default: %(default)s)"
    )
    parser.add_argument(
        "--seconds", type=float, default=120, help="sending time limit per run (default: 120)"
    )
    parser.add_argument(
        "--rss-cap-mb",
        type=float,
        default=6144,
        help="stop a run's flood when the node's VmRSS passes this (default: 6144)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    parser.add_argument("--python", default=sys.executable, help="Python with mtrkmta installed")
    parser.add_argument("--keep", action="store_true", help="keep the nodes' directories and logs")
    args = parser.parse_args(argv)
    try:
        args.attacker_counts = [int(n) for n in args.attackers.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--attackers expects numbers such as 1,10, got {args.attackers!r}")
    if not args.attacker_counts or min(args.attacker_counts) < 1:
        parser.error("--attackers needs at least one count, each at least 1")
    args.attack_list = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if not args.attack_list or set(args.attack_list) - set(ATTACKS):
        parser.error(f"--attacks takes a comma-separated subset of {','.join(ATTACKS)}")
    if args.data_mb <= 0 or args.help_mb <= 0 or args.seconds <= 0:
        parser.error("--data-mb, --help-mb and --seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment(args.python)
    work = Path(tempfile.mkdtemp(prefix="mtrkmta-memory-"))
    results: list[Result] = []
    begun = time.monotonic()

    def log(text: str) -> None:
        elapsed = time.monotonic() - begun
        print(f"[{int(elapsed // 60):3d}:{int(elapsed % 60):02d}] {text}", flush=True)

    log(f"mtrkmta {env['mtrkmta_commit']}, Python {env['python']}; work directory {work}")
    try:
        for attack in args.attack_list:
            for count in args.attacker_counts:
                size = args.data_mb if attack == "data" else args.help_mb
                log(f"{attack}: {count} attacker(s) x {size:g} MB")
                result = run_one(args, work, attack, count)
                results.append(result)
                endings = "; ".join(f"{n} x {text}" for text, n in result.endings.items())
                log(
                    f"{attack} x{count}: baseline {result.baseline_mib:.1f} MB, peak "
                    f"{result.peak_mib:.1f} MB, growth {result.growth_mib:.1f} MB, sent "
                    f"{result.sent_bytes / MiB:.1f} MB in {result.send_seconds:.1f} s, peak after "
                    f"{result.seconds_to_peak:.1f} s; {endings}"
                    + (f"; PROBLEM {result.problems}" if result.problems else "")
                )
    except KeyboardInterrupt:
        log("interrupted: writing what was measured so far")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for path in write_report(args.out, args, env, results):
        log(f"wrote {path}")
    for result in results:
        if not result.problems and result.growth_mib >= TARGET_MIB:
            log(
                f"target missed: {result.attack} x{result.attackers} grew by "
                f"{result.growth_mib:,.1f} MB (target: below {TARGET_MIB:g} MB)"
            )
    return 1 if any(result.problems for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
