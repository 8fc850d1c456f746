"""SMTP load generator for the benchmark: closed loop, fixed rate, idle and slow sessions."""

from __future__ import annotations

import argparse
import asyncio
import base64
import errno
import hashlib
import json
import math
import os
import resource
import secrets
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

HELO_NAME = "client.example.test"
SENDER = "bench@other.test"


@dataclass
class Stats:
    """What one load run observed; latencies are in seconds."""

    sent: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    accept_latency: list[float] = field(default_factory=list)
    total_latency: list[float] = field(default_factory=list)


class SMTPFailure(Exception):
    """The server did not give the reply the generator expected."""


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (``pct`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def make_body(length: int) -> bytes:
    """``length`` octets of printable body text in lines of at most 78 characters plus CRLF."""
    line = b"abcdefghijklmnopqrstuvwxyz0123456789" * 3
    out = bytearray()
    while len(out) < length:
        chunk = line[: min(76, length - len(out))]
        out += chunk + b"\r\n"
    return bytes(out)


def make_message(index: int, rcpt: str, body: bytes) -> bytes:
    """Header plus body, ending in CRLF, with no line starting with a dot."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: bench message {index}\r\n"
        f"Message-Id: <bench.{index}.{secrets.token_hex(6)}@{HELO_NAME}>\r\n\r\n"
    )
    return head.encode("ascii") + body


def mail_command(index: int, mtrk: bool) -> bytes:
    """MAIL FROM, with a unique ENVID and an MTRK certifier (B = SHA1(A)) when ``mtrk``."""
    if not mtrk:
        return f"MAIL FROM:<{SENDER}>\r\n".encode("ascii")
    certifier = base64.b64encode(hashlib.sha1(secrets.token_bytes(20)).digest()).decode("ascii")
    envid = f"bench{index}.{secrets.token_hex(4)}@{HELO_NAME}"
    return f"MAIL FROM:<{SENDER}> ENVID={envid} MTRK={certifier}:86400\r\n".encode("ascii")


async def read_reply(reader: asyncio.StreamReader) -> int:
    """Read one (possibly multi-line) reply and return its code."""
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPFailure("connection closed by server")
        if line[3:4] != b"-":
            try:
                return int(line[:3])
            except ValueError as exc:
                raise SMTPFailure(f"bad reply {line[:40]!r}") from exc


async def expect(reader: asyncio.StreamReader, code: int, what: str) -> None:
    got = await read_reply(reader)
    if got != code:
        raise SMTPFailure(f"{what}: {got}")


async def send_one(
    host: str, port: int, index: int, rcpt: str, body: bytes, mtrk: bool, stats: Stats
) -> None:
    """One session, one message: EHLO (both variants, MTRK needs ESMTP), no pipelining, QUIT."""
    start = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        await expect(reader, 220, "greeting")
        writer.write(f"EHLO {HELO_NAME}\r\n".encode("ascii"))
        await expect(reader, 250, "EHLO")
        writer.write(mail_command(index, mtrk))
        await expect(reader, 250, "MAIL")
        writer.write(f"RCPT TO:<{rcpt}>\r\n".encode("ascii"))
        await expect(reader, 250, "RCPT")
        writer.write(b"DATA\r\n")
        await expect(reader, 354, "DATA")
        writer.write(make_message(index, rcpt, body) + b".\r\n")
        dot = time.perf_counter()
        await expect(reader, 250, "end of DATA")
        done = time.perf_counter()
        stats.sent += 1
        stats.accept_latency.append(done - dot)
        stats.total_latency.append(done - start)
        try:  # the message is accepted: a failing QUIT does not count
            writer.write(b"QUIT\r\n")
            await read_reply(reader)
        except (OSError, SMTPFailure):
            pass
    except (OSError, SMTPFailure) as exc:
        stats.failed += 1
        stats.errors[str(exc)[:80] or type(exc).__name__] += 1
    finally:
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


async def closed_loop(args: argparse.Namespace, stats: Stats) -> None:
    """``sessions`` workers share ``messages``; each sends one message per connection."""
    body = make_body(args.length)
    counter = iter(range(args.messages))

    async def worker() -> None:
        for index in counter:
            await send_one(args.host, args.port, index, args.rcpt, body, args.mtrk, stats)

    await asyncio.gather(*(worker() for _ in range(args.sessions)))


async def open_loop(args: argparse.Namespace, stats: Stats) -> None:
    """Start one session every 1/rate seconds, whatever the server's pace (fixed offered load)."""
    body = make_body(args.length)
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for index in range(args.messages):
        delay = start + index / args.rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(
            asyncio.create_task(
                send_one(args.host, args.port, index, args.rcpt, body, args.mtrk, stats)
            )
        )
    await asyncio.gather(*tasks)


async def idle(args: argparse.Namespace) -> None:
    """Open ``connections`` sessions, read each greeting, report, and hold them until stdin ends."""
    gate = asyncio.Semaphore(100)
    writers: list[asyncio.StreamWriter] = []
    failures: Counter[str] = Counter()

    async def one() -> None:
        async with gate:
            try:
                reader, writer = await asyncio.open_connection(args.host, args.port)
                await expect(reader, 220, "greeting")
                writers.append(writer)
            except (OSError, SMTPFailure) as exc:
                failures[str(exc)[:80]] += 1

    await asyncio.gather(*(one() for _ in range(args.connections)))
    print(json.dumps({"open": len(writers), "failed": dict(failures)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for writer in writers:
        writer.close()


# ---------------------------------------------------------------- slow sessions (scenario f)

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux >= 4.2


@dataclass
class SlowRun:
    """Shared state and counters of the slow sessions of one run (times: loop.time())."""

    loop: asyncio.AbstractEventLoop
    interval: float  # seconds between two steps of one session
    go: float | None = None  # when the held sessions start their dialogue
    open_now: int = 0  # greeted and not yet closed
    peak_open: int = 0
    greeted: int = 0
    completed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    waits: list[float] = field(default_factory=list)  # connect started -> greeting
    durations: list[float] = field(default_factory=list)  # connect started -> 250 after DATA
    given_up: list[float] = field(default_factory=list)  # connect started -> failed, ungreeted
    waiting_for_go: list[SlowSession] = field(default_factory=list)
    sessions: list[SlowSession] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    finished: int = 0
    total: int = 0

    def finish(self) -> None:
        self.finished += 1
        if self.finished == self.total:
            self.done.set()


class SlowSession(asyncio.Protocol):
    """One SMTP session that sends one message a step at a time, ``interval`` apart.

    Steps: EHLO, MAIL, RCPT, DATA, every line of the message, the final dot, QUIT. A
    command waits for the reply to the previous one as well as for its time; message lines
    get no reply. Timers (``call_at``), not coroutines: 20,000 of these are cheap.
    """

    def __init__(self, run: SlowRun, index: int, rcpt: str, body: bytes) -> None:
        self.run = run
        self.index = index
        self.state = "connecting"
        self.started = run.loop.time()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.step = 0
        self.expect: tuple[int, str] | None = (220, "greeting")
        message = make_message(index, rcpt, body)
        self.steps: list[tuple[bytes, tuple[int, str] | None]] = [
            (f"EHLO {HELO_NAME}\r\n".encode("ascii"), (250, "EHLO")),
            (mail_command(index, False), (250, "MAIL")),
            (f"RCPT TO:<{rcpt}>\r\n".encode("ascii"), (250, "RCPT")),
            (b"DATA\r\n", (354, "DATA")),
            *((line + b"\n", None) for line in message.split(b"\n")[:-1]),
            (b".\r\n", (250, "end of DATA")),
            (b"QUIT\r\n", (221, "QUIT")),
        ]
        self.next_at = 0.0
        self.closed = False
        self.counted_open = False  # greeted: counted in run.open_now until closed

    # -- connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.state = "greeting"

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state not in ("done", "failed", "accepted"):
            self.fail(f"{self.state}: connection closed by server")
        self.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line[3:4] == b"-":
                continue
            self.reply(line)
            if self.closed:
                return

    # -- dialogue

    def reply(self, line: bytes) -> None:
        if self.expect is None:
            self.fail(f"{self.state}: unexpected reply {line[:40]!r}")
            return
        code, what = self.expect
        try:
            got = int(line[:3])
        except ValueError:
            got = -1
        self.expect = None
        if what == "QUIT":
            self.state = "done"
            self.close()
            return
        if got != code:
            self.fail(f"{what}: {line[:60].decode('ascii', 'replace').strip()}")
            return
        now = self.run.loop.time()
        if what == "greeting":
            run = self.run
            run.greeted += 1
            run.open_now += 1
            self.counted_open = True
            run.peak_open = max(run.peak_open, run.open_now)
            run.waits.append(now - self.started)
            self.state = "held"
            if run.go is None:
                run.waiting_for_go.append(self)
            else:
                self.begin(max(run.go, now))
            return
        if what == "end of DATA":
            self.run.completed += 1
            self.run.durations.append(now - self.started)
            self.state = "accepted"
        self.schedule()

    def begin(self, start: float) -> None:
        """Start the dialogue at a random point within one interval after ``start``."""
        self.state = "dialogue"
        self.next_at = start + secrets.randbelow(1000) / 1000 * self.run.interval
        self.schedule(first=True)

    def schedule(self, first: bool = False) -> None:
        if not first:
            self.next_at += self.run.interval
        self.run.loop.call_at(self.next_at, self.send_step)

    def send_step(self) -> None:
        if self.closed or self.transport is None:
            return
        data, expect = self.steps[self.step]
        self.step += 1
        self.transport.write(data)
        if expect is None:
            self.schedule()
        else:
            self.expect = expect

    def fail(self, why: str) -> None:
        if self.state in ("done", "failed"):
            return
        if self.state in ("connecting", "greeting"):
            self.run.given_up.append(self.run.loop.time() - self.started)
        self.state = "failed"
        self.run.errors[why[:90]] += 1
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.counted_open:
            self.run.open_now -= 1
        if self.transport is not None:
            self.transport.close()
        self.run.finish()


async def open_slow(run: SlowRun, session: SlowSession, source: str, host: str, port: int) -> None:
    """Connect from ``source`` (a loopback address; the port is chosen at connect time)."""
    loop = run.loop
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        await loop.create_connection(lambda: session, sock=sock)
    except OSError as exc:
        sock.close()
        name = errno.errorcode.get(exc.errno or 0, "")
        session.fail(f"connect: {name} {os.strerror(exc.errno)}" if name else f"connect: {exc}")


async def slow(args: argparse.Namespace) -> dict[str, object]:
    """Open ``sessions`` sessions from ``sources`` at ``connect_rate`` a second; once all are
    open (or the ramp is over), each sends one message a step at a time over ``seconds``."""
    loop = asyncio.get_running_loop()
    body = make_body(args.length)
    steps = len(SlowSession(SlowRun(loop, 1.0), 0, args.rcpt, body).steps)
    run = SlowRun(loop, interval=args.seconds / steps, total=args.sessions)
    first = 2 + args.first_source
    count = math.ceil(args.sessions / args.per_address)
    sources = [f"127.0.0.{first + i}" for i in range(count)]
    start = loop.time()
    cpu0 = time.process_time()
    tasks = []

    for index in range(args.sessions):
        session = SlowSession(run, index, args.rcpt, body)
        run.sessions.append(session)
        due = start + index / args.connect_rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        source = sources[index // args.per_address]
        tasks.append(asyncio.create_task(open_slow(run, session, source, args.host, args.port)))
    ramp = loop.time() - start
    # Hold: wait until every session is greeted or has failed (at most --hold-wait s more).
    hold_deadline = loop.time() + args.hold_wait
    while loop.time() < hold_deadline and any(
        session.state in ("connecting", "greeting") for session in run.sessions
    ):
        await asyncio.sleep(0.25)
    held = run.open_now
    print(json.dumps({"event": "holding", "held": held, "ramp": ramp}), flush=True)
    if args.wait_go:  # several generators: the harness says go to all of them at once
        await loop.run_in_executor(None, sys.stdin.readline)
    run.go = loop.time() + 1.0
    for session in run.waiting_for_go:
        session.begin(run.go)
    run.waiting_for_go.clear()
    deadline = run.go + args.seconds + args.grace
    try:
        await asyncio.wait_for(run.done.wait(), max(0.0, deadline - loop.time()))
    except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
        pass
    unfinished: Counter[str] = Counter()
    for session in run.sessions:
        if not session.closed:
            unfinished[session.state] += 1
            session.state = "failed"
            session.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = loop.time() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    waits = run.waits
    return {
        "sessions": args.sessions,
        "sources": sources,
        "completed": run.completed,
        "errors": dict(run.errors),
        "unfinished": dict(unfinished),
        "greeted": run.greeted,
        "held": held,
        "peak_open": run.peak_open,
        "ramp": ramp,
        "slow_seconds": args.seconds,
        "elapsed": elapsed,
        "wait_p50": percentile(waits, 50),
        "wait_p99": percentile(waits, 99),
        "wait_max": max(waits) if waits else None,
        "duration_p50": percentile(run.durations, 50),
        "duration_max": max(run.durations) if run.durations else None,
        "cpu_seconds": time.process_time() - cpu0,
        "waits": waits if args.wait_go else None,
        "durations": run.durations if args.wait_go else None,
        "given_up": run.given_up if args.wait_go else None,
        "given_up_p50": percentile(run.given_up, 50),
        "given_up_max": max(run.given_up) if run.given_up else None,
        "maxrss_kib": usage.ru_maxrss,
    }


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("closed", "rate", "idle", "slow"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--length", type=int, default=900, help="body octets")
    parser.add_argument("--rate", type=float, default=40.0, help="messages/s (mode rate)")
    parser.add_argument("--connections", type=int, default=5000, help="(mode idle)")
    parser.add_argument("--per-address", type=int, default=5000, help="(slow) sessions a source")
    parser.add_argument("--seconds", type=float, default=60.0, help="(slow) one message's time")
    parser.add_argument("--connect-rate", type=float, default=2000.0, help="(slow) connects/s")
    parser.add_argument("--hold-wait", type=float, default=60.0, help="(slow) wait for greetings")
    parser.add_argument("--grace", type=float, default=120.0, help="(slow) after --seconds")
    parser.add_argument("--first-source", type=int, default=0, help="(slow) 127.0.0.(2+N) first")
    parser.add_argument(
        "--wait-go", action="store_true", help="(slow) hold until a line on stdin; raw times"
    )
    parser.add_argument("--rcpt", default="rcpt@example.test")
    parser.add_argument("--mtrk", action="store_true", help="ENVID and MTRK on every MAIL")
    args = parser.parse_args(argv)
    if not args.host.startswith("127."):
        parser.error("only loopback addresses (127.0.0.0/8) may be targeted")
    raise_nofile()
    if args.mode == "idle":
        asyncio.run(idle(args))
        return 0
    if args.mode == "slow":
        if not 1 <= args.per_address <= 25_000:
            parser.error("--per-address must be 1..25000 (the ephemeral port range)")
        if args.first_source + math.ceil(args.sessions / args.per_address) > 250:
            parser.error("more sessions than 127.0.0.2..127.0.0.251 can open")
        result = asyncio.run(slow(args))
        print(json.dumps(result), flush=True)
        return 0
    stats = Stats()
    start = time.perf_counter()
    asyncio.run(closed_loop(args, stats) if args.mode == "closed" else open_loop(args, stats))
    elapsed = time.perf_counter() - start
    result = {
        "sent": stats.sent,
        "failed": stats.failed,
        "errors": dict(stats.errors),
        "elapsed": elapsed,
        "accept_p50": percentile(stats.accept_latency, 50),
        "accept_p99": percentile(stats.accept_latency, 99),
        "total_p50": percentile(stats.total_latency, 50),
        "total_p99": percentile(stats.total_latency, 99),
    }
    if args.mode == "rate":
        result["accept_latency"] = stats.accept_latency
        result["total_latency"] = stats.total_latency
    print(json.dumps(result))
    return 0 if stats.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
