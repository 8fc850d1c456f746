"""A/B of mtrkmta code versions: bench/run.py's own measurement of one scenario, mtrkmta
only, the versions taking turns (A B C, then C B A, ...), each version's mtrkmta imported
from a checkout of it (PYTHONPATH=<checkout>; bench/.venv otherwise the same).

usage (as root, with bench/.venv's Python):
  bench/.venv/bin/python bench/ab.py --variants before=/tmp/old,after=/tmp/new \\
      [--scenario a] [--rounds 5] [-m 3000] [--out ab.json]

Prints each version's runs and medians, and the median of its per-round ratio to the
first version ("paired"), which the drift between rounds affects less than the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", required=True, help="name=checkout,name=checkout,...")
    parser.add_argument("--scenario", default="a", help="a, b, c or e")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-m", "--messages", type=int, default=3000)
    parser.add_argument("--workers", default=None, help="server.workers (default: CPU count)")
    parser.add_argument(
        "--cpu-affinity",
        action="store_true",
        help="server.cpu_affinity = true (bench/run's default; off here, so that versions"
        " older than that setting run too)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write every run here (JSON)")
    options = parser.parse_args()
    variants = [tuple(v.split("=", 1)) for v in options.variants.split(",")]
    argv = ["-m", str(options.messages), "--scenarios", options.scenario, "--rounds", "1"]
    if options.workers:
        argv += ["--workers", options.workers]
    args = bench.parse_args(argv)
    if not options.cpu_affinity:  # a version without the setting would refuse the key
        del args.extra["server"]["cpu_affinity"]
    work = Path(tempfile.mkdtemp(prefix="mtrkmta-ab-"))
    work.chmod(0o755)
    ctx = bench.Context(args=args, work=work, python=args.python, extra=args.extra)
    ctx.tracking = bench.tracking_settings(ctx)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
    for round_no in range(1, options.rounds + 1):
        order = variants if round_no % 2 else list(reversed(variants))
        for name, checkout in order:
            os.environ["PYTHONPATH"] = checkout
            run = bench.measure(ctx, options.scenario, "mtrkmta", round_no)
            cpu_ms = run.extra["user_ms"] + run.extra["system_ms"]
            runs[name].append({"rate": run.rate, "cpu_ms": cpu_ms, "problems": run.problems})
            ctx.log(f"{name}: {bench.describe(run, options.rounds)}")
    first = runs[variants[0][0]]
    summary = {}
    for name, mine in runs.items():
        pairs = list(zip(mine, first, strict=True))
        summary[name] = {
            "rates": [x["rate"] for x in mine],
            "median_rate": statistics.median(x["rate"] for x in mine),
            "cpu_ms": [x["cpu_ms"] for x in mine],
            "median_cpu_ms": statistics.median(x["cpu_ms"] for x in mine),
            "paired_rate": statistics.median(x["rate"] / f["rate"] for x, f in pairs),
            "paired_cpu": statistics.median(x["cpu_ms"] / f["cpu_ms"] for x, f in pairs),
            "problems": [x["problems"] for x in mine if x["problems"]],
        }
    print(json.dumps(summary, indent=1))
    if options.out is not None:
        options.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
