"""Micro-benchmark: commit-thread CPU of the tracking writes of one relayed message.

Each measurement builds a tracking store (SQLite in a temporary directory, WAL and
synchronous=FULL as served; or ``--url``), then times with ``time.process_time`` the
store's commit function called directly, in this thread, on batches of k messages:
k ``record_arrival`` (one recipient) in one group commit, then their k
``record_outcomes`` (relayed, 2.0.0) in the next, as the acceptor and the queue
submit them for a relayed message (the queue writes nothing more to the store for it).
The figure is CPU microseconds per message (both commits), fsync included.

    python bench/trackwrites.py                      # this checkout
    python bench/trackwrites.py --tree /tmp/base     # A/B: /tmp/base vs this checkout

With ``--tree``, each round runs a child process per tree (A then B, alternating), each
measuring every batch size once; the medians over rounds are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
BATCHES = (1, 10, 50)


class Immediate:
    """A reactor whose callFromThread runs the call at once (nothing runs threads here)."""

    def callFromThread(self, f: Callable[..., object], *args: object, **kw: object) -> None:
        f(*args, **kw)


class HeldPool:
    """A thread pool that only records the commit GroupCommit hands it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], Callable[..., Any], tuple[Any, ...]]] = []

    def callInThreadWithCallback(
        self, on_result: Callable[..., Any], f: Callable[..., Any], *args: Any
    ) -> None:
        self.calls.append((on_result, f, args))


def child(url: str | None, messages: int, batches: tuple[int, ...]) -> dict[str, Any]:
    """Measure in this process; returns {batch: {"arrival": us/msg, "outcome": us/msg}}."""
    from twisted.internet.task import Clock

    from mtrkmta.config import DAY
    from mtrkmta.envelope import ClientInfo, Envelope, MailParams, RcptParams, Recipient
    from mtrkmta.tracking import migrate
    from mtrkmta.tracking.interfaces import RecipientState, RecipientUpdate
    from mtrkmta.tracking.store import SQLTrackingStore

    with tempfile.TemporaryDirectory(prefix="trackwrites-") as tmp:
        db = url or f"sqlite:///{tmp}/tracking.sqlite"
        migrate.upgrade(db)
        clock = Clock()
        clock.advance(1_700_000_000)
        pool = HeldPool()
        store = SQLTrackingStore(
            Immediate(),  # type: ignore[arg-type]
            pool,  # type: ignore[arg-type]
            db,
            clock=clock,
            default_retention=9 * DAY,
            max_retention=30 * DAY,
        )
        client = ClientInfo(address="127.0.0.1", port=40000, helo="localhost", listener="smtp")
        serial = 0
        prefix = os.urandom(4).hex()  # a --url database is shared by every run

        def committed(submit: Callable[[str], object], queue_ids: list[str]) -> float:
            """Submit one write per queue id as one batch; the CPU seconds of its commit."""
            pool.calls.clear()
            store._writes.submit(lambda conn: None)  # the plug: the others wait behind it
            for queue_id in queue_ids:
                submit(queue_id)
            plug_done, _, _ = pool.calls.pop()
            plug_done(True, [None])  # releases the batch to the "pool"
            on_result, commit, args = pool.calls.pop()
            start = time.process_time()
            result = commit(*args)
            spent = time.process_time() - start
            errors = [r for r in result if isinstance(r, Exception)]
            if errors:
                raise errors[0]
            on_result(True, result)
            return spent

        def arrive(queue_id: str) -> object:
            env = Envelope(
                queue_id=queue_id,
                sender="sender@example.com",
                recipients=(Recipient("rcpt@example.net", RcptParams()),),
                params=MailParams(body="8BITMIME"),
                arrival=clock.seconds(),
                client=client,
            )
            return store.record_arrival(env, reporting_mta="mx.example", node_id="n1", size=1100)

        def relay(queue_id: str) -> object:
            update = RecipientUpdate(
                index=0,
                state=RecipientState.RELAYED,
                status="2.0.0",
                action="relayed",
                remote_mta="dns; 127.0.0.1",
                diagnostic="smtp; 250 2.0.0 Ok: queued as 4XyZ1234",
                last_attempt=clock.seconds(),
                relay="127.0.0.1[127.0.0.1]:2525",
            )
            return store.record_outcomes(queue_id, [update])

        out: dict[str, Any] = {}
        for k in (batches[0], *batches):  # the first round warms up (compiled caches)
            arrival = outcome = 0.0
            for _ in range(max(1, messages // k)):
                ids = []
                for _ in range(k):
                    serial += 1
                    ids.append(f"Q{prefix}{serial:08d}")
                arrival += committed(arrive, ids)
                outcome += committed(relay, ids)
            n = max(1, messages // k) * k
            out[str(k)] = {"arrival": arrival / n * 1e6, "outcome": outcome / n * 1e6}
        store._engine.dispose()
        return out


def run_tree(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "-n", str(args.messages)]
    if args.url:
        cmd += ["--url", args.url]
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--messages", type=int, default=1000, help="per batch size")
    parser.add_argument("-r", "--rounds", type=int, default=5)
    parser.add_argument("--url", help="a migrated-or-empty database URL instead of SQLite")
    parser.add_argument("--tree", action="append", default=[], help="another checkout (A)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.url, args.messages, BATCHES)))
        return
    trees = [Path(t).resolve() for t in args.tree] + [HERE]
    runs: dict[Path, list[dict[str, Any]]] = {t: [] for t in trees}
    for round_ in range(args.rounds):
        for tree in trees:
            runs[tree].append(run_tree(tree, args))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    print("CPU us/message in the commit function (median over rounds; min-max)")
    print(f"{'tree':<28} {'batch':>5} {'arrival':>9} {'outcome':>9} {'total':>9}  range")
    for tree in trees:
        for k in BATCHES:
            a = [r[str(k)]["arrival"] for r in runs[tree]]
            o = [r[str(k)]["outcome"] for r in runs[tree]]
            t = [x + y for x, y in zip(a, o, strict=True)]
            print(
                f"{str(tree)[-28:]:<28} {k:>5} {statistics.median(a):>9.1f} "
                f"{statistics.median(o):>9.1f} {statistics.median(t):>9.1f}  "
                f"{min(t):.1f}-{max(t):.1f}"
            )


if __name__ == "__main__":
    main()
