"""mtrkmta vs Postfix benchmark on loopback: run with ``bench/run`` (see bench/README.md)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lab import (  # noqa: E402
    LOOPBACK,
    Blackhole,
    Dovecot,
    LabError,
    Mtrkmta,
    Postfix,
    Postgres,
    Sink,
    cpu_busy,
    cpu_times,
    descendants,
    free_port,
    rss_kib,
    stop_process,
    tree_cpu_seconds,
    tree_rss_kib,
    versions,
)
from loadgen import percentile  # noqa: E402

SENDER = "bench@other.test"
HELO = "client.example.test"
FINAL_STATES = frozenset({"relayed", "delivered", "transferred"})
ROUND_SCENARIOS = ("a", "b", "c", "d", "e", "lat")
ALL_SCENARIOS = (*ROUND_SCENARIOS, "f", "mem", "mtqp", "profile")
DEFAULT_SCENARIOS = ("a", "b", "c", "d", "e", "lat", "f", "mem", "mtqp")
IDLE_PHASE = 60.0  # (f): longest smtp-source run while the slow sessions are idle
TRACK_SEED = 3887  # everything trackload.py loads follows from it
TRACK_BACKENDS = ("sqlite", "postgresql")

TITLES = {
    "a": "(a) SMTP in -> queue -> SMTP relay to smtp-sink, end to end",
    "b": "(b) ingest only (accept rate; next hop never answers)",
    "c": "(c) SMTP in -> queue -> LMTP into Dovecot, end to end",
    "d": "(d) as (a), own load generator: without / with ENVID+MTRK (mtrkmta only)",
    "e": "(e) as (a) with smtp-source -d (connection reuse)",
    "lat": "accept latency at a fixed offered load below saturation",
    "f": "(f) concurrency: slow SMTP sessions held open while smtp-source measures throughput",
    "mem": "resident memory of mtrkmta with idle SMTP connections",
    "mtqp": "MTQP TRACK latency with a pre-filled tracking store, SQLite and PostgreSQL",
    "profile": "py-spy profile of mtrkmta during (a)",
}


@dataclass
class Run:
    """One measurement of one system in one scenario and round."""

    scenario: str
    system: str
    round: int
    messages: int
    seconds: float
    ingest_seconds: float
    cpu_busy: float
    mta_cores: float | None = None
    problems: list[str] = field(default_factory=list)
    extra: dict[str, float | None] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def ingest_rate(self) -> float:
        return self.messages / self.ingest_seconds if self.ingest_seconds > 0 else 0.0


@dataclass
class Context:
    """Settings and shared processes of one harness run."""

    args: argparse.Namespace
    work: Path
    python: str
    started: float = field(default_factory=time.monotonic)
    dovecot: Dovecot | None = None
    counter: int = 0
    profile_target: tuple[Path, bool] | None = None  # raw output, --gil
    tracking: dict[str, int] = field(default_factory=dict)  # [tracking] settings for mtrkmta
    extra: dict[str, dict[str, str]] = field(default_factory=dict)  # --set, for experiments

    def log(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{int(elapsed // 60):3d}:{int(elapsed % 60):02d}] {text}", flush=True)

    def next_dir(self, label: str) -> Path:
        self.counter += 1
        path = self.work / f"{self.counter:03d}-{label}"
        path.mkdir(parents=True)
        path.chmod(0o755)
        return path


# ---------------------------------------------------------------- one measurement


def systems_for(scenario: str) -> tuple[str, ...]:
    return ("mtrkmta", "mtrkmta+MTRK") if scenario == "d" else ("postfix", "mtrkmta")


def load_command(ctx: Context, scenario: str, system: str, port: int, rcpt: str) -> list[str]:
    args = ctx.args
    if scenario in ("a", "b", "c", "e", "profile"):
        command = ["smtp-source", "-s", str(args.sessions), "-m", str(args.messages)]
        command += ["-l", str(args.length), "-f", SENDER, "-t", rcpt, "-M", HELO]
        if scenario == "e":
            command.append("-d")
        return [*command, f"{LOOPBACK}:{port}"]
    loadgen = [ctx.python, str(HERE / "loadgen.py")]
    common = ["--port", str(port), "--length", str(args.length), "--rcpt", rcpt]
    if scenario == "d":
        command = [*loadgen, "closed", *common, "--messages", str(args.messages)]
        command += ["--sessions", str(args.sessions)]
        return [*command, "--mtrk"] if system.endswith("+MTRK") else command
    messages = max(1, round(args.latency_rate * args.latency_seconds))
    return [
        *loadgen,
        "rate",
        *common,
        "--rate",
        str(args.latency_rate),
        "--messages",
        str(messages),
    ]


def wait_for(
    ctx: Context, what: str, count: Callable[[], int], target: int, stall: float = 60
) -> bool:
    """Poll ``count()`` until it reaches ``target``; give up after ``stall`` s without progress."""
    last, last_change, last_report = -1, time.monotonic(), time.monotonic()
    while True:
        now_count = count()
        now = time.monotonic()
        if now_count >= target:
            return True
        if now_count != last:
            last, last_change = now_count, now
        elif now - last_change > stall:
            return False
        if now - last_report >= 15:
            ctx.log(f"      ... {what}: {now_count}/{target}")
            last_report = now
        time.sleep(0.02)


def poll(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


@contextmanager
def profiler(ctx: Context, pid: int, output: Path, gil: bool) -> Iterator[None]:
    """py-spy record (raw; the GIL holder, or every thread not idle) on ``pid`` during the block."""
    spy = shutil.which("py-spy") or str(Path(ctx.python).parent / "py-spy")
    command = [spy, "record", "--pid", str(pid), "--rate", "100", "--format", "raw"]
    command += ["--nolineno", "--threads", "--nonblocking", "--output", str(output)]
    if gil:
        command.append("--gil")
    with open(output.with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    time.sleep(1.0)
    try:
        yield
    finally:
        stop_process(proc, signal.SIGINT, grace=30)


def measure(ctx: Context, scenario: str, system: str, round_no: int) -> Run:
    """Start the next hop and the MTA, drive the load, wait until done, check, stop."""
    args = ctx.args
    run_dir = ctx.next_dir(f"{scenario}-{system.replace('+', '-')}-r{round_no}")
    rcpt = f"rcpt-{ctx.counter}@example.test"
    hop = {"b": "blackhole", "c": "lmtp"}.get(scenario, "sink")
    problems: list[str] = []
    with ExitStack() as stack:
        sink: Sink | None = None
        hop_port = free_port()
        if hop == "sink":
            sink = Sink(run_dir, hop_port)
            sink.start()
            stack.callback(sink.stop)
        elif hop == "blackhole":
            stack.callback(Blackhole(hop_port).close)
        else:
            assert ctx.dovecot is not None
            hop_port = ctx.dovecot.port
        port = free_port()
        postfix: Postfix | None = None
        mta: Mtrkmta | None = None
        if system == "postfix":
            transport = f"lmtp:inet:{LOOPBACK}:{hop_port}" if hop == "lmtp" else "smtp"
            postfix = Postfix(run_dir, port, hop_port, transport)
            stack.callback(postfix.stop)
            postfix.start()
        else:
            kind = "lmtp" if hop == "lmtp" else "smtp"
            route = f"{kind}:tcp:host={LOOPBACK}:port={hop_port};tls=none"
            routes = {"example.test": route}
            mta = Mtrkmta(ctx.python, run_dir, port, routes, None, ctx.tracking, ctx.extra)
            if hop == "blackhole":  # its shutdown waits for the stalled deliveries: don't wait
                mta.stop_grace = 3.0
            stack.callback(mta.stop)
            mta.start()
        time.sleep(args.pause)
        command = load_command(ctx, scenario, system, port, rcpt)

        def progress() -> str:
            if sink is not None:
                return f"smtp-sink has {sink.count()} messages"
            if hop == "lmtp" and ctx.dovecot is not None:
                return f"Dovecot has {ctx.dovecot.delivered(rcpt)} messages"
            return "load running"

        with ExitStack() as spying:
            if scenario == "profile":
                assert mta is not None
                assert ctx.profile_target is not None
                raw, gil = ctx.profile_target
                spying.enter_context(profiler(ctx, mta.pid, raw, gil))
            # the system under test: mtrkmta's process tree, or Postfix's master and its tree
            if mta is not None:
                sut = mta.pid
            else:
                assert postfix is not None
                sut = postfix.master_pid
            cpu0 = cpu_times()
            mta_cpu0 = tree_cpu_seconds(sut)
            t0 = time.perf_counter()
            with open(run_dir / "load.out", "wb") as out:
                load = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
                last_report = time.monotonic()
                while load.poll() is None:
                    time.sleep(0.02)
                    if time.monotonic() - last_report >= 15:
                        last_report = time.monotonic()
                        ctx.log(f"      ... {time.perf_counter() - t0:.0f} s: {progress()}")
            t1 = time.perf_counter()
            output = (run_dir / "load.out").read_text(errors="replace")
            expected = args.messages
            extra: dict[str, float | None] = {}
            if command[0] != "smtp-source":
                stats = json.loads(output.strip().splitlines()[-1])
                expected = int(stats["sent"])
                if stats["failed"]:
                    problems.append(f"load generator: {stats['failed']} failed {stats['errors']}")
                if scenario == "lat":
                    extra = {
                        key: stats[key]
                        for key in ("accept_p50", "accept_p99", "total_p50", "total_p99")
                    }
                    extra["offered_rate"] = args.latency_rate
            elif load.returncode != 0:
                problems.append(f"smtp-source exit {load.returncode}: {output.strip()[-200:]}")
            if hop == "sink":
                assert sink is not None
                done = wait_for(ctx, "sink", sink.count, expected)
            elif hop == "lmtp":
                assert ctx.dovecot is not None
                dovecot = ctx.dovecot
                done = wait_for(ctx, "Dovecot", lambda: dovecot.delivered(rcpt), expected)
            else:
                done = True
            t2 = time.perf_counter()
            cpu1 = cpu_times()
            mta_cpu1 = tree_cpu_seconds(sut)
        if not done:
            problems.append(f"next hop stalled before receiving {expected} messages")
        # Late duplicates would show up now; and the last messages' bookkeeping after the
        # next hop's reply (queue file removal, log, tracking update) is done. CPU per message
        # is read then, before the checks below run `postqueue -p` (Postfix's showq).
        time.sleep(1.0)
        settled = tree_cpu_seconds(sut)
        problems += check(ctx, hop, expected, rcpt, sink, postfix, mta)
    # CPU per message (ms) in user space (Python, or Postfix's C) and in the kernel.
    extra["user_ms"] = 1000 * (settled[0] - mta_cpu0[0]) / expected
    extra["system_ms"] = 1000 * (settled[1] - mta_cpu0[1]) / expected
    if mta is not None:
        extra["stop_seconds"] = mta.stop_seconds
        extra["killed"] = float(mta.killed)
        if not problems:
            problems += check_tracking(mta, hop, expected, tracked=system.endswith("MTRK"))
    run = Run(
        scenario=scenario,
        system=system,
        round=round_no,
        messages=expected,
        seconds=t2 - t0,
        ingest_seconds=t1 - t0,
        cpu_busy=cpu_busy(cpu0, cpu1),
        mta_cores=(sum(mta_cpu1) - sum(mta_cpu0)) / (t2 - t0),
        problems=problems,
        extra=extra,
    )
    if not args.keep and not problems:
        shutil.rmtree(run_dir, ignore_errors=True)
    return run


def check(
    ctx: Context,
    hop: str,
    expected: int,
    rcpt: str,
    sink: Sink | None,
    postfix: Postfix | None,
    mta: Mtrkmta | None,
) -> list[str]:
    """Exactly once at the next hop, and the queue empty (or holding every message, for b)."""
    problems = []
    if sink is not None and sink.count() != expected:
        problems.append(f"smtp-sink counted {sink.count()} messages, expected {expected}")
    if hop == "lmtp":
        assert ctx.dovecot is not None
        got = ctx.dovecot.delivered(rcpt)
        if got != expected:
            problems.append(f"Dovecot Maildir has {got} messages, expected {expected}")
    if postfix is not None:
        if hop == "blackhole":
            if not poll(lambda: postfix.queue_files() == expected, 15):
                problems.append(f"Postfix queue holds {postfix.queue_files()}, expected {expected}")
        else:
            if (
                not poll(lambda: postfix.queue_files() == 0, 30)
                or not postfix.queue_listing_empty()
            ):
                problems.append(f"Postfix queue not empty: {postfix.queue_files()} files")
            poll(lambda: postfix.statuses()["sent"] >= expected, 10)
            statuses = postfix.statuses()
            if statuses != {"sent": expected}:
                problems.append(f"Postfix log statuses {dict(statuses)}, expected sent={expected}")
    if mta is not None:
        want = expected if hop == "blackhole" else 0
        listing: list[dict[str, object]] = []

        def queue_ok() -> bool:
            listing[:] = mta.queue_list()
            return len(listing) == want

        if not poll(queue_ok, 30, interval=0.5):
            problems.append(f"mtrkmta queue holds {len(listing)} messages, expected {want}")
    return problems


def check_tracking(mta: Mtrkmta, hop: str, expected: int, tracked: bool) -> list[str]:
    """After the stop: one tracking record per message, every recipient final (or queued, b)."""
    summary = mta.tracking_summary()
    problems = []
    if summary["messages"] != expected:
        problems.append(f"tracking store has {summary['messages']} messages, expected {expected}")
    states = summary["states"]
    assert isinstance(states, dict)
    if hop != "blackhole" and (set(states) - FINAL_STATES or sum(states.values()) != expected):
        problems.append(f"tracking recipient states {states}")
    if tracked and summary["tracked"] != expected:
        problems.append(f"only {summary['tracked']} of {expected} messages carry ENVID+MTRK")
    return problems


# ---------------------------------------------------------------- memory


def measure_memory(ctx: Context) -> dict[str, object]:
    """RSS of mtrkmta idle, then with N idle SMTP sessions (each got its 220 greeting)."""
    n = ctx.args.idle_connections
    run_dir = ctx.next_dir("mem")
    port = free_port()
    limits = {"max_connections": n + 100, "max_connections_per_ip": n + 100}
    route = f"smtp:tcp:host={LOOPBACK}:port={free_port()};tls=none"
    mta = Mtrkmta(
        ctx.python, run_dir, port, {"example.test": route}, limits, None, one_process(ctx.extra)
    )
    result: dict[str, object] = {"connections": n}
    try:
        mta.start()
        time.sleep(2)
        before = rss_kib(mta.pid)
        command = [ctx.python, str(HERE / "loadgen.py"), "idle", "--port", str(port)]
        holder = subprocess.Popen(
            [*command, "--connections", str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdin is not None
            opened = json.loads(holder.stdout.readline() or "{}")
            time.sleep(2)
            after = rss_kib(mta.pid)
            holder.stdin.close()
            holder.wait(60)
        finally:
            stop_process(holder)
        result.update(
            opened=opened.get("open", 0),
            failed=opened.get("failed", {}),
            rss_idle_kib=before["VmRSS"],
            rss_with_connections_kib=after["VmRSS"],
            hwm_kib=after["VmHWM"],
        )
        opened_count = int(opened.get("open", 0))
        if opened_count:
            result["per_connection_kib"] = (after["VmRSS"] - before["VmRSS"]) / opened_count
        result["ok"] = opened_count == n
    finally:
        mta.stop()
    if not ctx.args.keep and result.get("ok"):
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


# ---------------------------------------------------------------- concurrency (f)


class TreeSampler:
    """Sample the summed RSS and Pss of a process tree every ``interval`` s in a thread."""

    def __init__(self, root: int, interval: float = 1.0) -> None:
        self.root = root
        self.interval = interval
        self.peak = {"rss_kib": 0, "pss_kib": 0, "processes": 0, "fds": 0}
        self.samples = 0
        self.started = time.monotonic()
        self.timeline: list[tuple[float, int]] = []  # (seconds since start, summed RSS KiB)
        self.marks: dict[str, float] = {}  # phase name -> seconds since start
        self.cpu_seconds = 0.0  # the sampler thread's own CPU time
        self.stopping = threading.Event()
        self.running = threading.Event()  # cleared: no sampling (a timed run is measuring)
        self.running.set()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """One sample now (listing 10k+ fds and reading smaps costs the machine CPU)."""
        with self.lock:
            started = time.thread_time()
            count, rss, pss = tree_rss_kib(self.root)
            fds = most_fds(self.root)
            self.samples += 1
            self.timeline.append((round(time.monotonic() - self.started, 1), rss))
            for key, value in (
                ("rss_kib", rss), ("pss_kib", pss), ("processes", count), ("fds", fds)
            ):  # fmt: skip
                self.peak[key] = max(self.peak[key], value)
            self.cpu_seconds += time.thread_time() - started

    def mark(self, phase: str) -> None:
        self.marks[phase] = round(time.monotonic() - self.started, 1)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No sampling during the block: one sample just before and one just after it."""
        self.sample()
        self.running.clear()
        try:
            yield
        finally:
            self.running.set()
            self.sample()

    def _run(self) -> None:
        while not self.stopping.is_set():
            if self.running.is_set():
                self.sample()
            self.stopping.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(10)


def most_fds(root: int) -> int:
    """The most open file descriptors of any one process in ``root``'s tree."""
    most = 0
    for pid in [root, *descendants(root)]:
        try:
            most = max(most, len(os.listdir(f"/proc/{pid}/fd")))
        except OSError:
            continue
    return most


def open_files_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of ``pid`` (``Max open files`` in /proc/PID/limits)."""
    try:
        with open(f"/proc/{pid}/limits") as limits:
            for line in limits:
                if line.startswith("Max open files"):
                    value = line.split()[3]
                    return None if value == "unlimited" else int(value)
    except OSError:
        return None
    return None


def concurrency_limits(args: argparse.Namespace) -> dict[str, int]:
    """mtrkmta's [limits] for (f): room for every slow session in one process (the limits
    count per process and per listener), and for every session of one source address."""
    total = args.slow_sessions + args.sessions + 1000
    return {
        "max_connections": total,
        "max_connections_per_ip": min(total, max(args.per_address, args.sessions) + 1000),
    }


def smtp_source_count(path: Path) -> int:
    """Messages smtp-source -c counted (its last ``N\\r``)."""
    numbers = [p for p in path.read_bytes().replace(b"\n", b"\r").split(b"\r") if p.isdigit()]
    return int(numbers[-1]) if numbers else 0


def ordinary_load(ctx: Context, port: int, rcpt: str, out: Path) -> subprocess.Popen[bytes]:
    """smtp-source with a running counter: the ordinary clients of (f)."""
    args = ctx.args
    command = ["smtp-source", "-c", "-s", str(args.sessions), "-m", str(args.ordinary_messages)]
    command += ["-l", str(args.length), "-f", SENDER, "-t", rcpt, "-M", HELO]
    with open(out, "wb") as output:
        return subprocess.Popen([*command, f"{LOOPBACK}:{port}"], stdout=output,
                                stderr=subprocess.STDOUT)  # fmt: skip


def timed_ordinary(
    ctx: Context, port: int, rcpt: str, out: Path, sink: Sink, keep_going: Callable[[], bool]
) -> dict[str, Any]:
    """Run smtp-source until it ends or ``keep_going()`` turns false (then stop it): the
    messages it counted, the seconds, and whether it finished all of them."""
    started = time.perf_counter()
    proc = ordinary_load(ctx, port, rcpt, out)
    last_report = time.monotonic()
    while proc.poll() is None and keep_going():
        time.sleep(0.05)
        if time.monotonic() - last_report >= 15:
            last_report = time.monotonic()
            ctx.log(f"      ... smtp-sink has {sink.count()} messages")
    finished = proc.poll() == 0
    stop_process(proc)
    seconds = time.perf_counter() - started
    count = ctx.args.ordinary_messages if finished else smtp_source_count(out)
    return {"messages": count, "seconds": round(seconds, 2), "rate": round(count / seconds, 1),
            "finished": finished}  # fmt: skip


def start_slow(ctx: Context, port: int, rcpt: str, run_dir: Path) -> list[subprocess.Popen[str]]:
    """The slow sessions' generators: one process, or more when one process may not open
    that many sockets (RLIMIT_NOFILE's hard limit), each from its own source addresses."""
    args = ctx.args
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per_process = max(args.per_address, (hard - 200) // args.per_address * args.per_address)
    procs = []
    for first in range(0, args.slow_sessions, per_process):
        sessions = min(per_process, args.slow_sessions - first)
        command = [ctx.python, str(HERE / "loadgen.py"), "slow", "--port", str(port)]
        command += ["--sessions", str(sessions), "--per-address", str(args.per_address)]
        command += ["--first-source", str(first // args.per_address), "--wait-go"]
        command += ["--seconds", str(args.slow_seconds), "--length", str(args.length)]
        command += ["--rcpt", rcpt]
        with open(run_dir / f"slow-{first}.err", "wb") as err:
            procs.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=err, text=True))  # fmt: skip
    return procs


def merge_slow(finals: list[dict[str, Any]], held: int) -> dict[str, Any]:
    """One summary of several generators' results (their raw wait times merged)."""
    errors: Counter[str] = Counter()
    unfinished: Counter[str] = Counter()
    waits: list[float] = []
    durations: list[float] = []
    given_up: list[float] = []
    for final in finals:
        errors.update(final.get("errors", {}))
        unfinished.update(final.get("unfinished", {}))
        waits += final.get("waits") or []
        durations += final.get("durations") or []
        given_up += final.get("given_up") or []

    def total(key: str) -> Any:
        return sum(final.get(key, 0) for final in finals)

    return {
        "generators": len(finals),
        "sources": [source for final in finals for source in final.get("sources", [])],
        "completed": total("completed"),
        "greeted": total("greeted"),
        "held": held,
        "errors": dict(errors),
        "unfinished": dict(unfinished),
        "ramp": max((final.get("ramp", 0) for final in finals), default=0),
        "elapsed": max((final.get("elapsed", 0) for final in finals), default=0),
        "wait_p50": percentile(waits, 50),
        "wait_p99": percentile(waits, 99),
        "wait_max": max(waits) if waits else None,
        "duration_p50": percentile(durations, 50),
        "duration_max": max(durations) if durations else None,
        "given_up_p50": percentile(given_up, 50),
        "given_up_max": max(given_up) if given_up else None,
        "cpu_seconds": total("cpu_seconds"),
        "maxrss_kib": total("maxrss_kib"),
    }


def measure_concurrency(ctx: Context, system: str) -> dict[str, Any]:
    """Scenario (f) against one system: unloaded smtp-source, then the slow sessions with
    smtp-source again while they are held open; memory sampled, CPU read, sink checked."""
    args = ctx.args
    run_dir = ctx.next_dir(f"f-{system}")
    rcpt = f"rcpt-{ctx.counter}@example.test"
    n = args.slow_sessions
    result: dict[str, Any] = {"system": system, "sessions": n, "problems": []}
    problems: list[str] = result["problems"]
    with ExitStack() as stack:
        sink = Sink(run_dir, free_port())
        sink.start()
        stack.callback(sink.stop)
        port = free_port()
        if system == "postfix":
            postfix = Postfix(run_dir, port, sink.port, "smtp")
            stack.callback(postfix.stop)
            postfix.start()
            sut = postfix.master_pid
            result["settings"] = "Postfix defaults (default_process_limit = 100)"
        else:
            route = f"smtp:tcp:host={LOOPBACK}:port={sink.port};tls=none"
            limits = concurrency_limits(args)
            listener = f'"tcp:{port}:interface={LOOPBACK}:backlog={args.backlog}"'
            extra = {**ctx.extra, "listeners": {"smtp": listener}}
            mta = Mtrkmta(ctx.python, run_dir, port, {"example.test": route}, limits,
                          ctx.tracking, extra)  # fmt: skip
            stack.callback(mta.stop)
            mta.start()
            sut = mta.pid
            result["settings"] = (
                ", ".join(f"limits.{key} = {value}" for key, value in limits.items())
                + f", listeners.smtp = {listener.replace(str(port), 'PORT')}"
            )
        result["open_files_limit"] = open_files_limit(sut)
        time.sleep(args.pause)
        # 1. unloaded
        started = time.perf_counter()
        plain = ordinary_load(ctx, port, rcpt, run_dir / "ordinary-unloaded.out")
        plain.wait()
        result["unloaded_seconds"] = time.perf_counter() - started
        result["unloaded_rate"] = args.ordinary_messages / result["unloaded_seconds"]
        if plain.returncode != 0:
            problems.append(f"unloaded smtp-source exit {plain.returncode}")
        if not wait_for(ctx, "sink", sink.count, args.ordinary_messages):
            problems.append("the unloaded messages did not all reach smtp-sink")
        ctx.log(f"f ({system}): unloaded smtp-source {result['unloaded_rate']:.1f} msg/s")
        # 2. the slow sessions, and smtp-source again while they are held
        cpu0 = tree_cpu_seconds(sut)
        with TreeSampler(sut) as sampler:
            slows = start_slow(ctx, port, rcpt, run_dir)
            for proc in slows:
                stack.callback(stop_process, proc)  # type: ignore[arg-type]
            holding = [json.loads(proc.stdout.readline() or "{}") for proc in slows]  # type: ignore[union-attr]
            held = sum(int(h.get("held", 0)) for h in holding)
            ctx.log(
                f"f ({system}): {held} of {n} sessions held open by {len(slows)} load "
                f"generator(s) (ramp {max(h.get('ramp', 0) for h in holding):.1f} s); "
                "smtp-source while they are idle"
            )
            # 2a. smtp-source while every session is open and idle (greeted, nothing sent)
            # (at most 60 s: with the 60 s allowed for the greetings, far from the 300 s that
            # both servers allow an idle client, mtrkmta's limits.idle_timeout, smtpd_timeout)
            # The sampler rests meanwhile: the held sessions' memory does not change while
            # they are idle, and its reading of 20,000 fds would take CPU from the server.
            idle_end = time.monotonic() + min(args.slow_seconds, IDLE_PHASE)
            with sampler.paused():
                result["idle"] = timed_ordinary(
                    ctx, port, rcpt, run_dir / "ordinary-idle.out", sink,
                    lambda: time.monotonic() < idle_end,
                )  # fmt: skip
            ctx.log(f"f ({system}): smtp-source with the sessions idle: {result['idle']}")
            # 2b. the sessions send their messages; smtp-source again meanwhile
            sampler.mark("go")
            for proc in slows:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            window_end = time.monotonic() + 1.0 + args.slow_seconds
            loaded = timed_ordinary(
                ctx, port, rcpt, run_dir / "ordinary-loaded.out", sink,
                lambda: any(proc.poll() is None for proc in slows),
            )  # fmt: skip
            result["loaded_finished"] = loaded["finished"]
            result["loaded_messages"] = count = loaded["messages"]
            result["loaded_seconds"] = loaded["seconds"]
            result["loaded_rate"] = loaded["rate"]
            result["loaded_within_window"] = time.monotonic() <= window_end
            ctx.log(f"f ({system}): smtp-source while the sessions send: {loaded}")
            sampler.mark("ordinary_done")
            finals = []
            for proc in slows:
                assert proc.stdout is not None
                lines = proc.stdout.read().strip().splitlines()
                proc.wait()
                finals.append(json.loads(lines[-1]) if lines else {})
            cpu1 = tree_cpu_seconds(sut)
            sampler.mark("slow_done")
        result["slow"] = merge_slow(finals, held)
        result["memory"] = dict(
            sampler.peak,
            samples=sampler.samples,
            sampler_cpu_seconds=round(sampler.cpu_seconds, 2),
            marks=sampler.marks,
            timeline=sampler.timeline,
        )
        result["cpu_seconds"] = sum(cpu1) - sum(cpu0)
        completed = int(result["slow"].get("completed", 0))
        expected = args.ordinary_messages + result["idle"]["messages"] + count + completed
        if not wait_for(ctx, "sink", sink.count, expected):
            problems.append(f"smtp-sink got {sink.count()} messages, expected {expected}")
        time.sleep(1.0)
        if sink.count() != expected:
            problems.append(f"smtp-sink counted {sink.count()} messages, expected {expected}")
        if system != "postfix":
            if completed != n:
                problems.append(f"only {completed} of {n} slow sessions got 250 after DATA")
            if not result["loaded_finished"]:
                problems.append("smtp-source did not finish while the slow sessions sent")
            if not result["idle"]["finished"]:
                problems.append("smtp-source did not finish while the slow sessions were idle")
    if not args.keep and not problems:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def describe_concurrency(result: dict[str, Any]) -> str:
    slow = result.get("slow", {})
    memory = result.get("memory", {})
    status = "ok" if not result["problems"] else "PROBLEM: " + "; ".join(result["problems"])
    wait = slow.get("wait_p99")
    return (
        f"f ({result['system']}): {slow.get('completed', 0)}/{result['sessions']} slow sessions "
        f"got 250, {slow.get('held', 0)} held open at once, greeting wait p99 "
        f"{'-' if wait is None else f'{wait:.1f} s'}, errors {slow.get('errors', {})}, "
        f"unfinished {slow.get('unfinished', {})}; RSS peak "
        f"{memory.get('rss_kib', 0) / 1024:.0f} MiB ({memory.get('processes', 0)} processes); "
        f"smtp-source {result.get('idle', {}).get('rate', 0):.1f} msg/s with them idle, "
        f"{result.get('loaded_rate', 0):.1f} while they send, "
        f"{result.get('unloaded_rate', 0):.1f} unloaded; load generator CPU "
        f"{slow.get('cpu_seconds', 0):.1f} s in {slow.get('elapsed', 0):.0f} s; {status}"
    )


# ---------------------------------------------------------------- MTQP TRACK latency


def run_tool(ctx: Context, command: list[str], output: Path) -> dict[str, Any] | None:
    """Run a bench tool that ends with one JSON line; log its other lines as progress."""
    result: dict[str, Any] | None = None
    with open(output, "w") as out:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                out.write(line)
                if line.startswith("{"):
                    result = json.loads(line)
                elif line.strip():
                    ctx.log(f"      ... {line.strip()[:160]}")
            proc.wait()
        except BaseException:  # interrupted: do not leave the tool running
            stop_process(proc)
            raise
    return result if proc.returncode == 0 else None


def measure_mtqp(ctx: Context, results: list[dict[str, Any]]) -> None:
    """Fill a SQLite, then a PostgreSQL, tracking store and time TRACKs against each."""
    for backend in TRACK_BACKENDS:
        result: dict[str, Any] = {"backend": backend, "problems": []}
        results.append(result)
        try:
            measure_track(ctx, backend, result)
        except LabError as error:
            result["problems"].append(f"lab error: {error}")
        ctx.log(describe_mtqp(result))


def measure_track(ctx: Context, backend: str, result: dict[str, Any]) -> None:
    """Load ``--track-messages`` tracked messages with trackload.py, start mtrkmta on that
    store with an MTQP listener, and send ``--track-queries`` TRACKs one at a time."""
    args = ctx.args
    messages = args.track_messages
    run_dir = ctx.next_dir(f"mtqp-{backend}")
    problems: list[str] = result["problems"]
    tool = [ctx.python, str(HERE / "trackload.py")]
    seed = ["--messages", str(messages), "--seed", str(TRACK_SEED)]
    with ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{run_dir / 'tracking.sqlite'}"
        else:
            postgres = Postgres(run_dir, free_port())
            stack.callback(postgres.stop)
            ctx.log("mtqp: starting a throw-away PostgreSQL cluster")
            postgres.start()
            url = postgres.create_database("tracking")
        ctx.log(f"mtqp ({backend}): loading {messages:,} tracked messages with trackload.py")
        load = run_tool(ctx, [*tool, "load", url, *seed], run_dir / "load.out")
        if load is None:
            problems.append(f"trackload.py load failed; see {run_dir / 'load.out'}")
            return
        result["load"] = load
        if load["messages"] != messages or load["recipients"] != load["expected_recipients"]:
            problems.append(
                f"store holds {load['messages']} messages / {load['recipients']} recipients, "
                f"expected {messages} / {load['expected_recipients']}"
            )
        ctx.log(
            f"mtqp ({backend}): loaded in {load['load_seconds']:.1f} s "
            f"({load['load_rate']:,.0f} msg/s), then {load['finish_seconds']:.1f} s to finish "
            f"(checkpoint; VACUUM ANALYZE on PostgreSQL); {load['db_bytes'] / 2**20:,.0f} MiB"
        )
        # The rate limits (per client address and minute) would refuse most of the run.
        extra: dict[str, dict[str, str]] = {"mtqp": {"track_rate": "0", "failure_rate": "0"}}
        for section, values in one_process(ctx.extra).items():
            extra.setdefault(section, {}).update(values)
        mta = Mtrkmta(
            ctx.python, run_dir, free_port(), {}, None, None, extra,
            mtqp_port=free_port(), database=url,
        )  # fmt: skip
        mta.ready_timeout = 600.0
        stack.callback(mta.stop)
        started = time.perf_counter()
        mta.start()
        result["startup_seconds"] = time.perf_counter() - started
        ctx.log(f"mtqp ({backend}): mtrkmta ready in {result['startup_seconds']:.1f} s")
        time.sleep(args.pause)
        assert mta.mtqp_port is not None
        command = [*tool, "track", "--port", str(mta.mtqp_port), *seed]
        command += ["--queries", str(args.track_queries)]
        track = run_tool(ctx, command, run_dir / "track.out")
        mta.stop()
        result["stop_seconds"] = mta.stop_seconds
        if mta.killed:
            problems.append("mtrkmta did not stop on SIGTERM")
        if track is None:
            problems.append(f"trackload.py track failed; see {run_dir / 'track.out'}")
            return
        result["track"] = track
        if track["failed"]:
            problems.append(f"{track['failed']} wrong answers: {'; '.join(track['problems'])}")
        errors = [
            line
            for line in mta.log.read_text(errors="replace").splitlines()
            if any(sign in line for sign in ("Traceback", "internal error", "store unavailable"))
        ]
        if errors:
            problems.append(f"mtrkmta logged {len(errors)} error(s): {errors[0][:200]}")
    if not args.keep and not problems:
        shutil.rmtree(run_dir, ignore_errors=True)


def describe_mtqp(result: dict[str, Any]) -> str:
    problems: list[str] = result["problems"]
    status = "ok" if not problems else "PROBLEM: " + "; ".join(problems)
    track = result.get("track")
    if not isinstance(track, dict):
        return f"mtqp ({result['backend']}): {status}"

    def ms(key: str) -> str:
        value = track.get(key)
        return "-" if value is None else f"{1000 * float(value):.2f} ms"

    return (
        f"mtqp ({result['backend']}): {track['queries']} TRACKs, found p50 {ms('found_p50')} "
        f"p99 {ms('found_p99')}, not found p50 {ms('notfound_p50')} p99 {ms('notfound_p99')}; "
        f"{status}"
    )


# ---------------------------------------------------------------- environment


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark mtrkmta against Postfix on loopback (A/B alternating rounds).",
    )
    parser.add_argument("-m", "--messages", type=int, default=5000, help="messages per run")
    parser.add_argument("-s", "--sessions", type=int, default=20, help="parallel SMTP sessions")
    parser.add_argument("-l", "--length", type=int, default=900, help="payload octets (~1 KB)")
    parser.add_argument("-r", "--rounds", type=int, default=3, help="A/B rounds")
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated, from {','.join(ALL_SCENARIOS)} (default: %(default)s)",
    )
    parser.add_argument("--profile", action="store_true", help="also run the 'profile' scenario")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1000 messages, 1 round, scenarios a,b,mtqp (20000 tracked messages)",
    )
    parser.add_argument("--latency-rate", type=float, default=40.0, help="offered msg/s (lat)")
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="duration of lat")
    parser.add_argument("--idle-connections", type=int, default=5000, help="for mem")
    parser.add_argument(
        "--slow-sessions", type=int, default=20_000, help="(f) concurrent slow SMTP sessions"
    )
    parser.add_argument(
        "--slow-seconds", type=float, default=60.0, help="(f) time each slow session takes"
    )
    parser.add_argument(
        "--per-address",
        type=int,
        default=5000,
        help="(f) slow sessions per source address 127.0.0.2, 127.0.0.3, ...",
    )
    parser.add_argument(
        "--f-systems",
        default="postfix,mtrkmta",
        choices=("postfix,mtrkmta", "mtrkmta", "postfix"),
        help="(f) the systems measured (experiments: one alone)",
    )
    parser.add_argument(
        "--ordinary-messages", type=int, default=2000, help="(f) smtp-source -m, each time"
    )
    parser.add_argument(
        "--backlog", type=int, default=4096, help="(f) mtrkmta's SMTP listen backlog"
    )
    parser.add_argument(
        "--track-messages",
        type=int,
        default=None,
        metavar="N",
        help="tracked messages pre-loaded for mtqp (default 1000000; --quick: 20000)",
    )
    parser.add_argument("--track-queries", type=int, default=2000, help="TRACKs timed (mtqp)")
    parser.add_argument("--pause", type=float, default=1.0, help="idle seconds before each run")
    parser.add_argument("--python", default=sys.executable, help="Python with mtrkmta installed")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="output directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="mtrkmta's server.workers in the throughput and latency runs (default: CPU count)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=TOML",
        help="experiments only: a setting for mtrkmta's config, e.g. durability.fsync=false",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.rounds, args.scenarios = 1000, 1, "a,b,mtqp"
    if args.track_messages is None:
        args.track_messages = 20_000 if args.quick else 1_000_000
    if args.track_messages < 1 or args.track_queries < 1:
        parser.error("--track-messages and --track-queries must be at least 1")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if args.profile and "profile" not in scenarios:
        scenarios.append("profile")
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    args.scenario_list = scenarios
    args.extra = {}
    for item in args.set:
        name, equals, value = item.partition("=")
        section, dot, key = name.partition(".")
        if not (equals and dot and section and key and value):
            parser.error(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        args.extra.setdefault(section, {})[key] = value
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    server = args.extra.setdefault("server", {})
    server.setdefault("workers", str(args.workers))
    # One CPU per process, as an administrator running one process per CPU would set it
    # (doc/performance.rst); --set server.cpu_affinity=false measures without.
    server.setdefault("cpu_affinity", "true")
    return args


def one_process(extra: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """``extra`` with ``server.workers = 1`` and no pinning: memory and MTQP are measured
    per process."""
    server = {**extra.get("server", {}), "workers": "1", "cpu_affinity": "false"}
    return {**extra, "server": server}


def raise_nofile(need: int) -> int:
    """Raise RLIMIT_NOFILE to ``need`` (the hard limit too, where root may: not in every
    container); at least to the hard limit. The soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
        except (ValueError, OSError):
            pass  # no CAP_SYS_RESOURCE: stay within the hard limit
    target = max(soft, min(hard, need))
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run: must run as root (Postfix's master daemon needs it)", file=sys.stderr)
        return 2
    from report import write_report  # matplotlib is imported only here

    nofile = raise_nofile(max(args.idle_connections, args.slow_sessions) + 2000)  # inherited
    work = Path(tempfile.mkdtemp(prefix="mtrkmta-bench-"))
    work.chmod(0o755)  # Postfix and Dovecot users must reach their directories below
    ctx = Context(args=args, work=work, python=args.python, extra=args.extra)
    args.results.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, interrupted)
    env = versions(args.python)
    env["workers"] = args.extra["server"]["workers"]
    env["cpu_affinity"] = args.extra["server"]["cpu_affinity"]
    if args.set:
        env["fsync"] = (
            "OFF" if args.extra.get("durability", {}).get("fsync") == "false" else env["fsync"]
        ) + f" (experiment: {' '.join('--set ' + item for item in args.set)})"
    scenarios = args.scenario_list
    ctx.log(
        f"mtrkmta vs Postfix: {args.messages} messages x {args.sessions} sessions, "
        f"{args.length}-octet payload, {args.rounds} round(s), scenarios {','.join(scenarios)}"
    )
    ctx.log(
        f"{env['cpus']} CPUs ({env['cpu_model']}); Python {env['python']}, Twisted "
        f"{env['twisted']}, Postfix {env['postfix']}, Dovecot {env['dovecot']}; "
        f"fsync {env['fsync']}; mtrkmta workers {env['workers']}"
        f" (cpu_affinity {env['cpu_affinity']})"
    )
    ctx.log(f"work directory {work}; open-file limit {nofile}")
    runs: list[Run] = []
    memory: dict[str, object] | None = None
    mtqp: list[dict[str, Any]] = []
    concurrency: list[dict[str, Any]] = []
    profiles: list[tuple[str, Run, Path]] = []
    try:
        ctx.tracking = tracking_settings(ctx)
        if "c" in scenarios:
            ctx.dovecot = Dovecot(work, free_port())
            ctx.dovecot.start()
        for round_no in range(1, args.rounds + 1):
            for scenario in (s for s in ROUND_SCENARIOS if s in scenarios):
                for system in systems_for(scenario):
                    run = measure(ctx, scenario, system, round_no)
                    runs.append(run)
                    ctx.log(describe(run, args.rounds))
        if "f" in scenarios:
            ctx.log(
                f"f: {args.slow_sessions} slow sessions over {args.slow_seconds:g} s from "
                f"{-(-args.slow_sessions // args.per_address)} source addresses, smtp-source "
                f"-m {args.ordinary_messages} before and during"
            )
            for system in args.f_systems.split(","):
                result = measure_concurrency(ctx, system)
                concurrency.append(result)
                ctx.log(describe_concurrency(result))
        if "mem" in scenarios:
            ctx.log(f"mem: mtrkmta with {args.idle_connections} idle SMTP connections")
            memory = measure_memory(ctx)
            ctx.log(f"mem: {memory}")
        if "mtqp" in scenarios:
            ctx.log(
                f"mtqp: TRACK latency with {args.track_messages:,} tracked messages in "
                f"{' and '.join(TRACK_BACKENDS)}, {args.track_queries} TRACKs each"
            )
            measure_mtqp(ctx, mtqp)
        if "profile" in scenarios:
            for mode in ("gil", "wall"):
                raw = args.results / f"profile-a-{mode}.raw"
                ctx.profile_target = (raw, mode == "gil")
                ctx.log(f"profile: mtrkmta in scenario (a) under py-spy ({mode})")
                profile = measure(ctx, "profile", "mtrkmta", 0)
                profiles.append((mode, profile, raw))
                ctx.log(describe(profile, 0))
    except KeyboardInterrupt:
        ctx.log("interrupted: writing what was measured so far")
    except LabError as error:
        ctx.log(f"lab error: {error}")
        return 1
    finally:
        if ctx.dovecot is not None:
            ctx.dovecot.stop()
        troubled = any(run.problems for run in runs) or any(r["problems"] for r in mtqp)
        troubled = troubled or any(r["problems"] for r in concurrency)
        if not args.keep and not troubled:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            ctx.log(f"kept {work} for the runs with problems (logs, spools, databases)")
    elapsed = time.monotonic() - ctx.started
    paths = write_report(
        args.results, args, env, runs, memory, profiles, elapsed, TITLES, mtqp, concurrency
    )
    for path in paths:
        ctx.log(f"wrote {path}")
    failed = [run for run in [*runs, *(p[1] for p in profiles)] if run.problems]
    if memory is not None and not memory.get("ok"):
        ctx.log("PROBLEM: not every idle connection could be opened")
    for run in failed:
        ctx.log(f"PROBLEM {run.scenario} {run.system} round {run.round}: {'; '.join(run.problems)}")
    failed_mtqp = [result for result in mtqp if result["problems"]]
    for result in failed_mtqp:
        ctx.log(f"PROBLEM mtqp {result['backend']}: {'; '.join(result['problems'])}")
    failed_f = [result for result in concurrency if result["problems"]]
    for result in failed_f:
        ctx.log(f"PROBLEM f {result['system']}: {'; '.join(result['problems'])}")
    return 1 if failed or failed_mtqp or failed_f else 0


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def tracking_settings(ctx: Context) -> dict[str, int]:
    """Lift the per-client tracked-message cap (a flood guard) where this mtrkmta has one.

    Every message of (d) carries MTRK from one client address; with the cap, most of
    them would be accepted untracked and the overhead ratio would mean nothing.
    """
    probe = Mtrkmta(ctx.python, ctx.next_dir("config-probe"), free_port(), {}, None, {}, ctx.extra)
    probe.tracking = {"max_tracked_per_hour": 0}
    error = probe.check_config()
    if error is None:
        ctx.log("mtrkmta: [tracking] max_tracked_per_hour = 0 (no cap on tracked messages)")
        return probe.tracking
    if "max_tracked_per_hour" in error:
        return {}
    raise LabError(f"mtrkmta check-config: {error}")


def describe(run: Run, rounds: int) -> str:
    status = "ok" if not run.problems else "PROBLEM: " + "; ".join(run.problems)
    label = f"round {run.round}/{rounds}" if run.round else "profile"
    text = f"{label} ({run.scenario}) {run.system:<13} {run.messages} msgs in {run.seconds:6.2f} s"
    text += f" = {run.rate:7.1f} msg/s (ingest {run.ingest_rate:7.1f} msg/s)"
    if run.extra.get("accept_p50") is not None:
        text += (
            f" accept p50 {1000 * run.extra['accept_p50']:.1f} ms"  # type: ignore[operator]
            f" p99 {1000 * run.extra['accept_p99']:.1f} ms"  # type: ignore[operator]
        )
    text += f", cpu {run.cpu_busy:.0f}%"
    if run.mta_cores is not None:
        text += f", {run.system.split('+')[0]} {run.mta_cores:.2f} cores"
        user, system = run.extra["user_ms"], run.extra["system_ms"]
        text += f" ({user:.2f} ms user + {system:.2f} ms system per msg)"
    if run.extra.get("killed"):
        text += f", not stopped {run.extra['stop_seconds']:.0f} s after SIGTERM: killed"
    return f"{text}; {status}"


if __name__ == "__main__":
    sys.exit(main())
