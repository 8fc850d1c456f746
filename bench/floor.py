"""The floor under mtrkmta's CPU per message: a bare Twisted relay on the same load.

usage (as root, with bench/.venv's Python):
  bench/.venv/bin/python bench/floor.py [-m 5000] [--rounds 3] [--with-mtrkmta]

The bare relay is what Twisted itself costs for scenario (a)'s work and nothing else:
it answers ``smtp-source -s 20`` (EHLO, MAIL, RCPT, DATA, the content, QUIT; one
connection per message) with fixed replies, splits lines with ``bytes.split`` and finds
the end of the content with one ``find``, and relays each message over 20 kept
connections to smtp-sink, pipelining MAIL, RCPT and DATA. No durability (nothing on
disk), no tracking, no parsing, no log, one thread. It prints the CPU per message of
its process (user and system) while the load runs; with ``--with-mtrkmta`` it measures
``mtrkmta serve`` (``server.workers = 1``, defaults otherwise) on the same load in
alternating rounds. doc/performance.rst, "Where the time goes", has the figures.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SENDER = "sender@client.test"
RECIPIENT = "rcpt@example.test"

# ---------------------------------------------------------------- the bare relay


def relay(port: int, sink_port: int) -> None:
    """Run the bare relay on ``port``, relaying to smtp-sink on ``sink_port`` (blocks)."""
    from twisted.internet import protocol, reactor

    ehlo = (
        b"250-floor.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250 DSN\r\n"
    )
    envelope = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode()
    idle: deque[Outbound] = deque()
    waiting: deque[bytes] = deque()

    def send(message: bytes) -> None:
        if idle:
            idle.popleft().start(message)
        else:
            waiting.append(message)

    class Outbound(protocol.Protocol):
        """One kept connection to smtp-sink: one message at a time, pipelined."""

        def __init__(self) -> None:
            self.buffer = b""
            self.state = "greeting"
            self.expected = 0
            self.message = b""

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            *lines, self.buffer = self.buffer.split(b"\r\n")
            for line in lines:
                if line[3:4] != b"-":
                    self.reply()

        def reply(self) -> None:
            if self.state == "greeting":
                self.state = "ehlo"
                self.transport.write(b"EHLO floor.test\r\n")
            elif self.state == "envelope":
                self.expected -= 1
                if not self.expected:
                    self.state = "content"
                    self.transport.write(self.message + b".\r\n")
            else:  # the EHLO's reply or the message's: ready for the next message
                self.state = "idle"
                if waiting:
                    self.start(waiting.popleft())
                else:
                    idle.append(self)

        def start(self, message: bytes) -> None:
            self.message, self.state, self.expected = message, "envelope", 3
            self.transport.write(envelope)

    class Inbound(protocol.Protocol):
        """One client session: fixed replies, the content relayed once its dot came."""

        def connectionMade(self) -> None:
            self.buffer = b""
            self.in_data = False
            self.transport.write(b"220 floor.test ESMTP\r\n")

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            while True:
                if self.in_data:
                    end = self.buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        return
                    send(self.buffer[: end + 2])
                    self.buffer, self.in_data = self.buffer[end + 5 :], False
                    self.transport.write(b"250 2.0.0 Ok: queued\r\n")
                    continue
                line, crlf, rest = self.buffer.partition(b"\r\n")
                if not crlf:
                    return
                self.buffer = rest
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    self.transport.write(ehlo)
                elif verb == b"DATA":
                    self.in_data = True
                    self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                elif verb == b"QUIT":
                    self.transport.write(b"221 2.0.0 Bye\r\n")
                    self.transport.loseConnection()
                    return
                else:
                    self.transport.write(b"250 2.1.0 Ok\r\n")

    creator = protocol.ClientCreator(reactor, Outbound)
    for _ in range(20):
        creator.connectTCP("127.0.0.1", sink_port)
    reactor.listenTCP(
        port, protocol.Factory.forProtocol(Inbound), backlog=1024, interface="127.0.0.1"
    )
    reactor.run()


# ---------------------------------------------------------------- the measurement


def measure(start: Callable[[int, int, Path], subprocess.Popen[bytes]], messages: int) -> float:
    """CPU ms per message of the process ``start(port, sink_port, workdir)`` starts,
    from the load's start until smtp-sink has counted every message."""
    import lab
    from run import poll

    work = Path(tempfile.mkdtemp(prefix="mtrkmta-floor-"))
    work.chmod(0o755)
    sink = lab.Sink(work, lab.free_port())
    sink.start()
    port = lab.free_port()
    proc = start(port, sink.port, work)
    try:
        lab.wait_ready(port, proc, "relay", work / "relay.log")
        time.sleep(1)
        user0, system0 = lab.process_cpu_seconds(proc.pid)
        subprocess.run(
            ["smtp-source", "-s", "20", "-m", str(messages), "-l", "900", "-f", SENDER,
             "-t", RECIPIENT, "-M", "client.test", f"{lab.LOOPBACK}:{port}"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        if not poll(lambda: sink.count() >= messages, timeout=120, interval=0.05):
            raise lab.LabError(f"smtp-sink counted {sink.count()} of {messages} messages")
        user1, system1 = lab.process_cpu_seconds(proc.pid)
    finally:
        lab.stop_process(proc)
        sink.stop()
    return (user1 - user0 + system1 - system0) * 1000 / messages


def start_relay(port: int, sink_port: int, work: Path) -> subprocess.Popen[bytes]:
    with open(work / "relay.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "relay", str(port), str(sink_port)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def start_mtrkmta(port: int, sink_port: int, work: Path) -> subprocess.Popen[bytes]:
    import lab

    route = f"smtp:tcp:host={lab.LOOPBACK}:port={sink_port};tls=none"
    mta = lab.Mtrkmta(
        sys.executable, work, port, {"example.test": route}, extra={"server": {"workers": "1"}}
    )
    mta.write_config()
    with open(work / "relay.log", "wb") as log:
        return subprocess.Popen(mta.command(), stdout=log, stderr=subprocess.STDOUT, cwd=work)


def main() -> None:
    if sys.argv[1:2] == ["relay"]:
        relay(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--with-mtrkmta", action="store_true", help="measure mtrkmta too")
    options = parser.parse_args()
    systems = {"bare Twisted relay": start_relay}
    if options.with_mtrkmta:
        systems["mtrkmta, one process"] = start_mtrkmta
    results: dict[str, list[float]] = {name: [] for name in systems}
    for round_no in range(options.rounds):
        order = list(systems.items())
        for name, start in order if round_no % 2 == 0 else reversed(order):
            results[name].append(measure(start, options.messages))
            print(f"round {round_no + 1}: {name}: {results[name][-1]:.3f} ms per message")
    for name, values in results.items():
        print(f"{name}: median {statistics.median(values):.3f} ms CPU per message")


if __name__ == "__main__":
    main()
