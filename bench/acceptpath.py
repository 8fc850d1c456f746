"""Where a message's accept latency goes: the steps between its final dot and its 250.

usage (as root, with bench/.venv's Python):
  bench/.venv/bin/python bench/acceptpath.py [--rate 40] [--messages 400] [--out trace.json]

Runs one mtrkmta process (``server.workers = 1``, fsync on, relaying to smtp-sink) with
time points recorded at the named steps of the accept path (the server's end of DATA,
the spool's batch and its fault points, the tracking store's batch, the 250) and the
garbage collector's collections, drives bench/loadgen.py's fixed-rate load at it, and
prints, for the messages that had a batch to themselves, each step's p50 and p99 next
to what the client measured. The time points cost a few µs each, so the steps add up to
a little more than the untraced path. The same file is the traced server's entry point
(``acceptpath.py serve ...``, started by the driver).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

Event = tuple[float, str, str]  # (perf_counter, label, key)

# The accept path of a message whose spool and tracking batches held it alone, in order:
# (label of the time point that ends the step, what the step is).
STEPS: Sequence[tuple[str, str]] = (
    ("spool.batch>", "end of DATA to spool batch start (reactor; hand-off)"),
    ("f:spool.written", "write the file"),
    ("f:spool.synced", "fsync the file"),
    ("f:spool.renamed", "rename into queue/"),
    ("f:spool.dir_synced", "fsync the directory"),
    ("trk.batch>", "to tracking batch start (hand-off; rows built)"),
    ("f:tracking.write", "SQL statements"),
    ("trk.batch<", "COMMIT (WAL fsync)"),
    ("ok<", "back to the reactor, log line, 250 written"),
)


# ---------------------------------------------------------------- the traced server


def serve(argv: list[str]) -> None:
    """``mtrkmta serve`` with time points; the events go to $ACCEPTPATH_OUT when it stops."""
    from twisted.application import app

    from mtrkmta import faults
    from mtrkmta.cli.main import main
    from mtrkmta.smtp.server import SMTPServer
    from mtrkmta.spool.filespool import FileSpool
    from mtrkmta.tracking.store import SQLTrackingStore

    events: list[Event] = []
    clock = time.perf_counter

    def timed(cls: type, name: str, label: str, key: Callable[[tuple[Any, ...]], str]) -> None:
        original = getattr(cls, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            events.append((clock(), label + ">", key(args)))
            try:
                return original(*args, **kwargs)
            finally:
                events.append((clock(), label + "<", key(args)))

        setattr(cls, name, wrapper)

    timed(SMTPServer, "_end_of_data", "eod", lambda a: a[1].queue_id)
    timed(SMTPServer, "_accepted", "ok", lambda a: a[2])
    timed(FileSpool, "_store_batch", "spool.batch", lambda a: str(len(a[1])))
    timed(SQLTrackingStore, "_commit", "trk.batch", lambda a: str(len(a[1])))
    faults.NoFaults.reached = lambda self, point: events.append((clock(), "f:" + point, ""))  # type: ignore[method-assign]
    started: list[float] = []

    def collected(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(clock())
        elif started:
            events.append((clock(), f"gc{info['generation']}", str(clock() - started.pop())))

    gc.callbacks.append(collected)
    stopping = app._exitWithSignal

    def dump_then_exit(sig: int) -> None:
        Path(os.environ["ACCEPTPATH_OUT"]).write_text(json.dumps(events))
        stopping(sig)

    app._exitWithSignal = dump_then_exit
    sys.argv = ["mtrkmta", "serve", *argv]
    main()


# ---------------------------------------------------------------- analysis (pure)


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def _find(events: Sequence[Event], start: int, label: str, queue_id: str) -> int:
    """The index of the next event ``label`` from ``start`` (the 250: of ``queue_id``), or -1."""
    for i in range(start, len(events)):
        if events[i][1] == label and (label != "ok<" or events[i][2] == queue_id):
            return i
    return -1


def step_times(events: Sequence[Event]) -> tuple[dict[str, list[float]], list[float]]:
    """Each step's durations (s) and the totals, over the messages alone in both batches."""
    steps: dict[str, list[float]] = {what: [] for _, what in STEPS}
    totals: list[float] = []
    for start, (t0, label, queue_id) in enumerate(events):
        if label != "eod>":
            continue
        times, at = [t0], start
        for end_label, _ in STEPS:
            at = _find(events, at, end_label, queue_id)
            if at < 0:
                break
            if end_label in ("spool.batch>", "trk.batch>") and events[at][2] != "1":
                at = -1  # shared a batch with others: not a lone message
                break
            times.append(events[at][0])
        if at < 0:
            continue
        for (_, what), before, after in zip(STEPS, times[:-1], times[1:], strict=True):
            steps[what].append(after - before)
        totals.append(times[-1] - times[0])
    return steps, totals


def collections(events: Sequence[Event]) -> dict[str, list[float]]:
    """The garbage collector's pauses (s) by generation, from the first message's end of
    DATA to the last 250 (start-up's collections left out)."""
    marks = [t for t, label, _ in events if label in ("eod>", "ok<")]
    found: dict[str, list[float]] = {}
    for t, label, key in events:
        if label.startswith("gc") and marks and marks[0] <= t <= marks[-1]:
            found.setdefault(label, []).append(float(key))
    return found


def report(events: Sequence[Event], client: dict[str, Any]) -> str:
    steps, totals = step_times(events)
    lines = [f"{len(totals)} lone messages of {client['sent']} sent", ""]
    lines.append(f"{'step':52s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for what, durations in steps.items():
        if durations:
            p50, p99 = percentile(durations, 0.5), percentile(durations, 0.99)
            lines.append(f"{what:52s} {p50 * 1e3:8.2f} {p99 * 1e3:8.2f}")
    if totals:
        p50, p99 = percentile(totals, 0.5), percentile(totals, 0.99)
        lines.append(f"{'server: end of DATA to 250':52s} {p50 * 1e3:8.2f} {p99 * 1e3:8.2f}")
    lines.append(
        f"{'client: final dot to 250 (all messages)':52s} "
        f"{client['accept_p50'] * 1e3:8.2f} {client['accept_p99'] * 1e3:8.2f}"
    )
    lines += [
        "",
        "garbage collections from the first end of DATA to the last 250"
        " (generation: count, total ms, longest ms)",
    ]
    for generation, pauses in sorted(collections(events).items()):
        lines.append(
            f"  {generation}: {len(pauses)}, {sum(pauses) * 1e3:.1f}, {max(pauses) * 1e3:.2f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the driver


def drive(options: argparse.Namespace) -> None:
    import lab

    work = Path(tempfile.mkdtemp(prefix="mtrkmta-acceptpath-"))
    work.chmod(0o755)
    sink = lab.Sink(work, lab.free_port())
    sink.start()
    route = f"smtp:tcp:host={lab.LOOPBACK}:port={sink.port};tls=none"
    extra = {"server": {"workers": "1"}}
    mta = lab.Mtrkmta(options.python, work, lab.free_port(), {"example.test": route}, extra=extra)
    out = work / "events.json"
    os.environ["ACCEPTPATH_OUT"] = str(out)
    mta.command = lambda: [  # type: ignore[method-assign]
        options.python, str(Path(__file__).resolve()), "serve", "--config", str(mta.config),
        "--route", f"example.test={route}",
    ]  # fmt: skip
    try:
        mta.start()
        time.sleep(1)
        load = subprocess.run(
            [options.python, str(HERE / "loadgen.py"), "rate", "--port", str(mta.port),
             "--length", "900", "--rcpt", "rcpt@example.test", "--rate", str(options.rate),
             "--messages", str(options.messages)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        time.sleep(1)
    finally:
        mta.stop()
        sink.stop()
    client = json.loads(load.stdout)
    events = [tuple(e) for e in json.loads(out.read_text())]
    if options.out is not None:
        options.out.write_text(json.dumps({"events": events, "client": client}))
    print(report(events, client))  # type: ignore[arg-type]


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=40.0, help="offered messages/s")
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--python", default=sys.executable, help="Python with mtrkmta")
    parser.add_argument("--out", type=Path, default=None, help="write the events here (JSON)")
    parser.add_argument("--report", type=Path, default=None, help="only report a saved --out")
    options = parser.parse_args()
    if options.report is not None:
        saved = json.loads(options.report.read_text())
        print(report([tuple(e) for e in saved["events"]], saved["client"]))  # type: ignore[misc]
        return
    drive(options)


if __name__ == "__main__":
    main()
