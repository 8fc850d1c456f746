"""SMTP load generator for the benchmark: closed loop, fixed-rate open loop, idle sessions."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import resource
import secrets
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


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("closed", "rate", "idle"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--length", type=int, default=900, help="body octets")
    parser.add_argument("--rate", type=float, default=40.0, help="messages/s (mode rate)")
    parser.add_argument("--connections", type=int, default=5000, help="(mode idle)")
    parser.add_argument("--rcpt", default="rcpt@example.test")
    parser.add_argument("--mtrk", action="store_true", help="ENVID and MTRK on every MAIL")
    args = parser.parse_args(argv)
    if not args.host.startswith("127."):
        parser.error("only loopback addresses (127.0.0.0/8) may be targeted")
    raise_nofile()
    if args.mode == "idle":
        asyncio.run(idle(args))
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
