"""Benchmark report: Markdown table, JSON data, matplotlib chart, and the py-spy profile summary."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from run import Run

PROFILE_MODES = {
    "gil": "samples of the thread holding the GIL: where the Python CPU time goes",
    "wall": "samples of every thread not idle, GIL or not: CPU plus fsync and SQLite waits",
}

THROUGHPUT_ROWS = (
    # key, scenario, use ingest rate, label
    ("a", "a", False, "(a) SMTP in -> queue -> SMTP relay to smtp-sink, end to end"),
    ("a-ingest", "a", True, "(a) its accept rate while relaying"),
    ("b", "b", True, "(b) ingest only (next hop never answers)"),
    ("c", "c", False, "(c) SMTP in -> LMTP into Dovecot, end to end"),
    ("e", "e", False, "(e) as (a) with `smtp-source -d` (connection reuse), end to end"),
)


def run_to_dict(run: Run) -> dict[str, object]:
    data = dataclasses.asdict(run)
    data["rate"] = run.rate
    data["ingest_rate"] = run.ingest_rate
    return data


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def rates(runs: list[Run], scenario: str, system: str, ingest: bool) -> list[float]:
    return [
        run.ingest_rate if ingest else run.rate
        for run in runs
        if run.scenario == scenario and run.system == system
    ]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def throughput_table(runs: list[Run]) -> tuple[list[str], list[tuple[str, float, float]]]:
    lines = [
        "| scenario | Postfix msg/s | mtrkmta msg/s | mtrkmta/Postfix | Postfix runs | "
        "mtrkmta runs |",
        "|---|---:|---:|---:|---|---|",
    ]
    chart: list[tuple[str, float, float]] = []
    for key, scenario, ingest, label in THROUGHPUT_ROWS:
        postfix = rates(runs, scenario, "postfix", ingest)
        mtrkmta = rates(runs, scenario, "mtrkmta", ingest)
        if not postfix and not mtrkmta:
            continue
        p, m = median(postfix), median(mtrkmta)
        lines.append(
            f"| {label} | **{fmt(p)}** | **{fmt(m)}** | **{fmt(ratio(m, p), 3)}** | "
            f"{', '.join(fmt(x) for x in postfix)} | {', '.join(fmt(x) for x in mtrkmta)} |"
        )
        if p is not None and m is not None and key != "a-ingest":
            chart.append((key, p, m))
    return lines, chart


CPU_ROWS = (
    ("a", "(a) relay to smtp-sink"),
    ("b", "(b) ingest only"),
    ("c", "(c) LMTP into Dovecot"),
    ("e", "(e) `smtp-source -d`"),
    ("lat", "accept latency run (40 msg/s)"),
)


def cpu_ms(runs: list[Run], scenario: str, system: str) -> list[tuple[float, float]]:
    """(user, system) ms of CPU per message of the system under test, one pair per run."""
    return [
        (float(run.extra["user_ms"]), float(run.extra["system_ms"]))  # type: ignore[arg-type]
        for run in runs
        if run.scenario == scenario
        and run.system == system
        and run.extra.get("user_ms") is not None
        and run.extra.get("system_ms") is not None
    ]


def cpu_table(runs: list[Run]) -> list[str]:
    """CPU per message of Postfix (master and every daemon, reaped ones included) and mtrkmta."""
    rows = []
    for scenario, label in CPU_ROWS:
        cells: dict[str, tuple[float | None, float | None, float | None]] = {}
        for system in ("postfix", "mtrkmta"):
            pairs = cpu_ms(runs, scenario, system)
            cells[system] = (
                median([u + s for u, s in pairs]),
                median([u for u, _ in pairs]),
                median([s for _, s in pairs]),
            )
        if cells["postfix"][0] is None and cells["mtrkmta"][0] is None:
            continue
        p, m = cells["postfix"], cells["mtrkmta"]
        rows.append(
            f"| {label} | **{fmt(p[0], 2)}** ({fmt(p[1], 2)} + {fmt(p[2], 2)}) "
            f"| **{fmt(m[0], 2)}** ({fmt(m[1], 2)} + {fmt(m[2], 2)}) "
            f"| {fmt(ratio(m[0], p[0]), 2)} |"
        )
    if not rows:
        return []
    return [
        "CPU time of the system under test over the run, divided by the messages: Postfix's "
        "master and every process below it (the daemons that exited and were reaped during "
        "the run through the master's cumulative children times, the live ones from "
        "`/proc/PID/stat`), mtrkmta's process and its workers; read when the next hop has "
        "every message plus 1 s. Medians over rounds; user + system in parentheses. The "
        "load generator and the next hop are not counted.",
        "",
        "| scenario | Postfix ms/msg (user + system) | mtrkmta ms/msg (user + system) "
        "| mtrkmta/Postfix |",
        "|---|---:|---:|---:|",
        *rows,
    ]


def tracking_table(runs: list[Run]) -> list[str]:
    plain = rates(runs, "d", "mtrkmta", False)
    tracked = rates(runs, "d", "mtrkmta+MTRK", False)
    if not plain and not tracked:
        return []
    p, t = median(plain), median(tracked)
    pi = median(rates(runs, "d", "mtrkmta", True))
    ti = median(rates(runs, "d", "mtrkmta+MTRK", True))
    return [
        "| (d) mtrkmta, own load generator (EHLO, 1 message per session) | without MTRK | "
        "with ENVID+MTRK | with/without |",
        "|---|---:|---:|---:|",
        f"| end to end msg/s (median) | **{fmt(p)}** | **{fmt(t)}** | **{fmt(ratio(t, p), 3)}** |",
        f"| accept rate msg/s (median) | {fmt(pi)} | {fmt(ti)} | {fmt(ratio(ti, pi), 3)} |",
        f"| all runs, end to end | {', '.join(fmt(x) for x in plain)} | "
        f"{', '.join(fmt(x) for x in tracked)} | |",
    ]


def latency_table(runs: list[Run], rate: float) -> list[str]:
    rows = []
    for key, label in (
        ("accept_p50", "accept latency p50 (end of DATA -> 250), ms"),
        ("accept_p99", "accept latency p99, ms"),
        ("total_p50", "whole session p50 (connect -> 250), ms"),
        ("total_p99", "whole session p99, ms"),
    ):
        values: dict[str, float | None] = {}
        for system in ("postfix", "mtrkmta"):
            found = [
                1000 * float(run.extra[key])  # type: ignore[arg-type]
                for run in runs
                if run.scenario == "lat" and run.system == system and run.extra.get(key)
            ]
            values[system] = median(found)
        if values["postfix"] is None and values["mtrkmta"] is None:
            continue
        rows.append(
            f"| {label} | {fmt(values['postfix'], 2)} | {fmt(values['mtrkmta'], 2)} | "
            f"{fmt(ratio(values['mtrkmta'], values['postfix']), 2)} |"
        )
    if not rows:
        return []
    return [
        f"Offered load {rate:g} msg/s (one new session every {1000 / rate:.0f} ms, "
        "own load generator, relay to smtp-sink); median over rounds of each round's percentile.",
        "",
        "| latency | Postfix | mtrkmta | mtrkmta/Postfix |",
        "|---|---:|---:|---:|",
        *rows,
    ]


def memory_table(memory: dict[str, object]) -> list[str]:
    def mib(key: str) -> str:
        value = memory.get(key)
        return "-" if value is None else f"{float(value) / 1024:.1f} MiB"  # type: ignore[arg-type]

    per = memory.get("per_connection_kib")
    return [
        "| mtrkmta resident memory (VmRSS) | value |",
        "|---|---:|",
        f"| idle, no connection | {mib('rss_idle_kib')} |",
        f"| with {memory.get('opened')} of {memory.get('connections')} idle SMTP connections "
        f"open (each got its 220) | {mib('rss_with_connections_kib')} |",
        f"| per connection | {'-' if per is None else f'{float(per):.1f} KiB'} |",  # type: ignore[arg-type]
        f"| peak (VmHWM) | {mib('hwm_kib')} |",
    ]


def concurrency_table(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """Scenario (f): one column per system."""
    systems = [r["system"] for r in results]
    names = {"postfix": "Postfix", "mtrkmta": "mtrkmta"}

    def row(label: str, cell: Any) -> str:
        return f"| {label} | " + " | ".join(str(cell(r)) for r in results) + " |"

    def slow(r: dict[str, Any], key: str) -> Any:
        return r.get("slow", {}).get(key)

    def seconds(value: Any) -> str:
        return "-" if value is None else f"{float(value):.2f} s"

    def mib(r: dict[str, Any], key: str) -> str:
        value = r.get("memory", {}).get(key)
        return "-" if not value else f"{value / 1024:,.0f} MiB"

    def errors(r: dict[str, Any]) -> str:
        found = {**(slow(r, "errors") or {})}
        found.update({f"unfinished at the end ({k})": v for k, v in
                      (slow(r, "unfinished") or {}).items()})  # fmt: skip
        if not found:
            return "none"
        return "; ".join(f"{v:,} x {k}" for k, v in sorted(found.items(), key=lambda kv: -kv[1]))

    def cpu_share(r: dict[str, Any]) -> str:
        cpu, elapsed = slow(r, "cpu_seconds"), slow(r, "elapsed")
        if cpu is None or not elapsed:
            return "-"
        return (
            f"{cpu:.1f} s in {elapsed:.0f} s ({100 * cpu / elapsed:.0f}% of one CPU; "
            f"{slow(r, 'generators') or 1} process(es))"
        )

    first = results[0]
    sources = first.get("slow", {}).get("sources") or []
    lines = [
        f"{first['sessions']:,} SMTP sessions opened by `bench/loadgen.py slow` (asyncio; one "
        "process, or more where one may not open that many files) from "
        f"{len(sources)} source address(es) ({', '.join(sources[:3])}"
        f"{', ...' if len(sources) > 3 else ''}; at most {args.per_address:,} each), "
        f"{args.slow_seconds:g} s for one message each (EHLO, MAIL, RCPT, DATA, the message "
        "a line at a time, the dot, QUIT, evenly spaced). Once every session had its greeting "
        f"(or after 60 s), `smtp-source -s {args.sessions} -m {args.ordinary_messages}` ran "
        "against the same server while they were open and idle (stopped after "
        f"{min(args.slow_seconds, 60):g} s), then again while they sent their messages "
        "(stopped when they ended); before the slow sessions it ran once alone (unloaded). "
        f"The slow sessions by themselves offer {first['sessions'] / args.slow_seconds:,.0f} msg/s "
        "while they send. "
        "Memory: VmRSS (and Pss) summed over every process of the system under test, sampled "
        "every second during the slow sessions, peak. Relay to smtp-sink.",
        "",
        "| (f) concurrency | " + " | ".join(names.get(s, s) for s in systems) + " |",
        "|---|" + "---:|" * len(systems),
        row("configuration", lambda r: r.get("settings", "-")),
        row(
            "server's open-file limit (RLIMIT_NOFILE)",
            lambda r: f"{r.get('open_files_limit') or '-'}",
        ),
        row(
            "slow sessions that got 250 after DATA",
            lambda r: f"**{slow(r, 'completed') or 0:,}** of {r['sessions']:,}",
        ),
        row(
            "sessions held open at once (greeted) when the dialogues began",
            lambda r: f"{slow(r, 'held') or 0:,}",
        ),
        row(
            "wait for the greeting p50 / p99 / max (sessions greeted)",
            lambda r: (
                f"{seconds(slow(r, 'wait_p50'))} / {seconds(slow(r, 'wait_p99'))} / "
                f"{seconds(slow(r, 'wait_max'))}"
            ),
        ),
        row("sessions that failed, and why", errors),
        row(
            "time until a session never greeted failed, p50 / max",
            lambda r: f"{seconds(slow(r, 'given_up_p50'))} / {seconds(slow(r, 'given_up_max'))}",
        ),
        row("peak resident memory, VmRSS summed", lambda r: f"**{mib(r, 'rss_kib')}**"),
        row("peak Pss summed (shared pages divided)", lambda r: mib(r, "pss_kib")),
        row("most processes", lambda r: r.get("memory", {}).get("processes", "-")),
        row(
            "most open file descriptors in one process",
            lambda r: f"{r.get('memory', {}).get('fds', 0):,}",
        ),
        row("smtp-source unloaded, msg/s", lambda r: f"{r.get('unloaded_rate', 0):,.1f}"),
        row(
            "smtp-source while the sessions are open and idle (greeted), msg/s",
            lambda r: (
                f"{r.get('idle', {}).get('rate', 0):,.1f} "
                f"({r.get('idle', {}).get('messages', 0):,} messages"
                f"{'' if r.get('idle', {}).get('finished') else ', stopped unfinished'})"
            ),
        ),
        row(
            "idle / unloaded",
            lambda r: fmt(ratio(r.get("idle", {}).get("rate"), r.get("unloaded_rate")), 2),
        ),
        row(
            "smtp-source while the sessions send their messages, msg/s",
            lambda r: (
                f"{r.get('loaded_rate', 0):,.1f} ({r.get('loaded_messages', 0):,} "
                f"messages{'' if r.get('loaded_finished') else ', stopped unfinished'})"
            ),
        ),
        row(
            "sending / unloaded",
            lambda r: f"**{fmt(ratio(r.get('loaded_rate'), r.get('unloaded_rate')), 2)}**",
        ),
        row(
            "CPU of the system under test from the first slow connect to the last close",
            lambda r: f"{r.get('cpu_seconds', 0):.1f} s",
        ),
        row("CPU of the load generator", cpu_share),
    ]
    for r in results:
        if r["problems"]:
            lines.append(f"\n- {names.get(r['system'], r['system'])}: **FAILED**: "
                         + "; ".join(r["problems"]))  # fmt: skip
        if r.get("loaded_finished") and not r.get("loaded_within_window"):
            name = names.get(r["system"], r["system"])
            lines.append(
                f"\n- {name}: smtp-source ran past the slow sessions' window: part of its run "
                "was not under that load"
            )
    return lines


STORE_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def mtqp_table(mtqp: list[dict[str, Any]]) -> list[str]:
    """The mtqp scenario: how it was loaded and asked, then one row per store."""
    loaded = next((r["load"] for r in mtqp if "load" in r), None)
    asked = next((r["track"] for r in mtqp if "track" in r), None)

    def ms(track: dict[str, Any], key: str) -> str:
        low, high = track.get(f"{key}_p50"), track.get(f"{key}_p99")
        if low is None or high is None:
            return "-"
        return f"{1000 * low:.2f} / {1000 * high:.2f} ms"

    lines = []
    if loaded is not None:
        lines += [
            f"{loaded['expected_messages']:,} tracked messages (ENVID and MTRK certifier, ~10% "
            "of them the 16-octet form; 1-2 recipients each, "
            + ", ".join(f"{state} {n:,}" for state, n in loaded["states"].items())
            + ") written into a fresh store by `bench/trackload.py`: the store's schema "
            "through its own migrations, then SQLAlchemy Core executemany in batches of "
            "10,000 rows, a commit every 100,000 messages. Loader-only settings: SQLite "
            "`synchronous=OFF` and a 256 MiB page cache on the loader's own connection (the "
            "server's connections keep `synchronous=FULL`); PostgreSQL "
            "`synchronous_commit=off` for the loader's session, the cluster itself at its "
            "defaults (fsync on) but `max_wal_size=4GB`. After the load: SQLite "
            "`wal_checkpoint(TRUNCATE)`, no ANALYZE (mtrkmta never runs one); PostgreSQL "
            "`VACUUM ANALYZE` of both tables (what autovacuum would do next) and a `CHECKPOINT`. "
            "The loaded "
            "messages belong to another node id, so this node does not try to deliver the "
            "queued ones.",
            "",
        ]
    if asked is not None:
        lines += [
            f"Then `mtrkmta serve` on that store, with the MTQP rate limits off for this run "
            f"(`[mtqp] track_rate = 0`, `failure_rate = 0`; the defaults, 60 TRACKs and 10 "
            f"failures a minute per client address, would refuse most of it), answers "
            f"{asked['queries']:,} TRACKs sent one at a time, each over a new connection "
            f"(connect, greeting, TRACK, QUIT) as `mtrkmta track` does, after "
            f"{asked['warmup']} warm-up TRACKs not counted: "
            f"{asked['kinds'].get('found', 0):,} for random loaded messages, "
            f"{asked['kinds'].get('unknown', 0):,} for an ENVID never loaded and "
            f"{asked['kinds'].get('wrong-secret', 0):,} for a loaded ENVID with a wrong "
            "secret (both of those must get `-ERR/noinfo`). Latency is TRACK sent -> whole "
            "response read; every answer is checked (the report's Original-Envelope-Id and "
            "every recipient's Action).",
            "",
        ]
    lines += [
        "| store | messages (recipients) loaded | load time | database size "
        "| TRACK p50 / p99, found | p50 / p99, not found | connect -> answer p50 / p99, all "
        "| server start-up | check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in mtqp:
        load = result.get("load") or {}
        track = result.get("track") or {}
        name = STORE_NAMES.get(result["backend"], result["backend"])
        if load.get("server_version"):
            name += f" {load['server_version']}"
        if load:
            count = f"{load['messages']:,} ({load['recipients']:,})"
            took = f"{load['load_seconds']:.0f} s ({load['load_rate']:,.0f} msg/s)"
            size = f"{load['db_bytes'] / 2**20:,.0f} MiB"
        else:
            count = took = size = "-"
        session = "-"
        if track.get("all_session_p50") is not None:
            session = (
                f"{1000 * track['all_session_p50']:.2f} / {1000 * track['all_session_p99']:.2f} ms"
            )
        startup = result.get("startup_seconds")
        if result["problems"]:
            verdict = "**FAILED**: " + "; ".join(result["problems"])
        else:
            verdict = f"all {track.get('checked', 0):,} answers right"
        lines.append(
            f"| {name} | {count} | {took} | {size} | **{ms(track, 'found')}** "
            f"| {ms(track, 'notfound')} | {session} "
            f"| {'-' if startup is None else f'{startup:.1f} s'} | {verdict} |"
        )
    return lines


# ---------------------------------------------------------------- profile


def summarize_profile(raw: Path, top: int = 20) -> list[str]:
    """Top functions by own and inclusive samples from py-spy's raw (collapsed) output.

    Also the own-time top of the reactor thread and of the thread pool separately, and the
    mtrkmta functions by inclusive time (Twisted's and the runner's frames left out).
    """
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    by_group: dict[str, Counter[str]] = {"reactor": Counter(), "pool": Counter()}
    ours: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        thread = thread.split(": ", 1)[-1].rstrip(")")
        frames = [f for f in frames if not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        total += count
        threads[thread] += count
        own[frames[-1]] += count
        by_group["reactor" if thread == "MainThread" else "pool"][frames[-1]] += count
        for frame in set(frames):
            if "(mtrkmta/" in frame and not frame.startswith(("main ", "serve ", "<module> ")):
                ours[frame] += count
    if not total:
        return ["(no samples)"]

    def share(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    out = [f"{total} samples", "", "by thread:"]
    out += [f"  {share(n)}  {name}" for name, n in threads.most_common(8)]
    out += ["", f"top {top} by own time (the function itself was running):"]
    out += [f"  {share(n)}  {name}" for name, n in own.most_common(top)]
    for group, label in (("reactor", "reactor thread (MainThread)"), ("pool", "thread pool")):
        if by_group[group]:
            out += ["", f"top 10 by own time in the {label}:"]
            out += [f"  {share(n)}  {name}" for name, n in by_group[group].most_common(10)]
    out += ["", f"top {top} mtrkmta functions by inclusive time (the function or its callees):"]
    out += [f"  {share(n)}  {name}" for name, n in ours.most_common(top)]
    return out


# ---------------------------------------------------------------- chart


def write_chart(path: Path, chart: list[tuple[str, float, float]], runs: list[Run]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [key for key, _, _ in chart]
    postfix = [p for _, p, _ in chart]
    mtrkmta = [m for _, _, m in chart]
    d_plain = median(rates(runs, "d", "mtrkmta", False))
    d_mtrk = median(rates(runs, "d", "mtrkmta+MTRK", False))
    fig, ax = plt.subplots(figsize=(10, 5.5))
    xs = list(range(len(labels)))
    width = 0.38
    bars_p = ax.bar([x - width / 2 for x in xs], postfix, width, label="Postfix", color="#4c72b0")
    bars_m = ax.bar([x + width / 2 for x in xs], mtrkmta, width, label="mtrkmta", color="#dd8452")
    for bar_p, bar_m, p, m in zip(bars_p, bars_m, postfix, mtrkmta, strict=True):
        ax.annotate(f"{p:.0f}", (bar_p.get_x() + width / 2, p), ha="center", va="bottom")
        ax.annotate(f"{m:.0f}\n({m / p:.2f}x)", (bar_m.get_x() + width / 2, m), ha="center",
                    va="bottom")  # fmt: skip
    if d_plain is not None and d_mtrk is not None:
        x = len(xs)
        b1 = ax.bar(x - width / 2, d_plain, width, color="#dd8452", hatch="//", label="mtrkmta (d)")
        b2 = ax.bar(x + width / 2, d_mtrk, width, color="#c44e52", label="mtrkmta (d) + MTRK")
        ax.annotate(f"{d_plain:.0f}", (b1[0].get_x() + width / 2, d_plain), ha="center",
                    va="bottom")  # fmt: skip
        ax.annotate(f"{d_mtrk:.0f}\n({d_mtrk / d_plain:.2f}x)", (b2[0].get_x() + width / 2, d_mtrk),
                    ha="center", va="bottom")  # fmt: skip
        labels.append("d: no MTRK / MTRK")
        xs.append(x)
    names = {
        "a": "a: relay to sink\n(end to end)",
        "b": "b: ingest only",
        "c": "c: LMTP to Dovecot\n(end to end)",
        "e": "e: smtp-source -d\n(end to end)",
    }
    ax.set_xticks(xs, [names.get(label, label) for label in labels])
    ax.set_ylabel("messages per second (median)")
    ax.set_title("mtrkmta vs Postfix on loopback (fsync on)")
    ax.legend()
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_chart_data(runs: list[Run]) -> list[tuple[str, tuple[float, float], tuple[float, float]]]:
    """Per scenario of CPU_ROWS with both systems: median (user, system) ms for each."""
    data = []
    for scenario, label in CPU_ROWS:
        pairs = {system: cpu_ms(runs, scenario, system) for system in ("postfix", "mtrkmta")}
        if not pairs["postfix"] or not pairs["mtrkmta"]:
            continue
        medians = {
            system: (median([u for u, _ in found]) or 0.0, median([s for _, s in found]) or 0.0)
            for system, found in pairs.items()
        }
        data.append((label, medians["postfix"], medians["mtrkmta"]))
    return data


def write_cpu_chart(
    path: Path, data: list[tuple[str, tuple[float, float], tuple[float, float]]]
) -> None:
    """Stacked bars (user, system) of CPU ms per message, Postfix beside mtrkmta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    width = 0.38
    for offset, index, name, colour in ((-1, 1, "Postfix", "#4c72b0"),
                                        (1, 2, "mtrkmta", "#dd8452")):  # fmt: skip
        xs = [x + offset * width / 2 for x in range(len(data))]
        pairs = [row[1] if index == 1 else row[2] for row in data]
        user = [pair[0] for pair in pairs]
        system = [pair[1] for pair in pairs]
        ax.bar(xs, user, width, color=colour, label=f"{name} user")
        ax.bar(xs, system, width, bottom=user, color=colour, alpha=0.5, hatch="//",
               label=f"{name} system")  # fmt: skip
        for x, u, s in zip(xs, user, system, strict=True):
            ax.annotate(f"{u + s:.2f}", (x, u + s), ha="center", va="bottom")
    ax.set_xticks(list(range(len(data))), [label for label, _, _ in data])
    ax.set_ylabel("CPU ms per message (median)")
    ax.set_title("CPU per message: Postfix (master and every daemon) vs mtrkmta (all processes)")
    ax.legend()
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- report


def write_report(
    results: Path,
    args: argparse.Namespace,
    env: dict[str, str],
    runs: list[Run],
    memory: dict[str, object] | None,
    profiles: list[tuple[str, Run, Path]],
    elapsed: float,
    titles: dict[str, str],
    mtqp: list[dict[str, Any]] | None = None,
    concurrency: list[dict[str, Any]] | None = None,
) -> list[Path]:
    results.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    when = f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed / 60:.1f} minutes"
    if runs or memory is not None or profiles:
        what = (
            f"`bench/run` with {args.messages} messages per run, {args.sessions} sessions, "
            f"{args.length}-octet payload (~1 KB messages), {args.rounds} round(s) alternating "
            "Postfix / mtrkmta; medians, msg/s."
        )
    else:
        what = f"`bench/run --scenarios {','.join(args.scenario_list)}`."
    lines = [
        "# mtrkmta vs Postfix benchmark",
        "",
        f"{when}; {what} Everything on 127.0.0.1.",
        "",
        f"Machine: {env['cpus']} CPUs ({env['cpu_model']}), Linux {env['kernel']}. "
        f"Versions: Python {env['python']}, Twisted {env['twisted']}, SQLAlchemy "
        f"{env['sqlalchemy']}, Postfix {env['postfix']}, Dovecot {env['dovecot']}, mtrkmta "
        f"{env['mtrkmta_commit']}. fsync: {env['fsync']}. mtrkmta `server.workers`: "
        f"{env.get('workers', '1')}, `server.cpu_affinity`: {env.get('cpu_affinity', 'false')}"
        " (memory and MTQP: one process, not pinned).",
        "",
    ]
    table, chart = throughput_table(runs)
    if chart or len(table) > 2:
        lines += ["## Throughput", "", *table, ""]
    cpu = cpu_table(runs)
    if cpu:
        lines += ["## CPU per message", "", *cpu, ""]
    tracking = tracking_table(runs)
    if tracking:
        lines += ["## Tracking overhead (d)", "", *tracking, ""]
    latency = latency_table(runs, args.latency_rate)
    if latency:
        lines += ["## Accept latency", "", *latency, ""]
    if concurrency:
        lines += ["## Concurrency (f)", "", *concurrency_table(concurrency, args), ""]
    if mtqp:
        lines += ["## MTQP TRACK latency", "", *mtqp_table(mtqp), ""]
    if memory is not None:
        lines += ["## Memory", "", *memory_table(memory), ""]
    problems = [run for run in runs if run.problems]
    lines += ["## Correctness", ""]
    if runs and not problems:
        lines.append(
            f"All {len(runs)} runs passed: the next hop received every message exactly once "
            "(smtp-sink count, or Dovecot Maildir files, equal to the number sent, and unchanged "
            "1 s later), every queue was empty at the end (`postqueue -p`, `mtrkmta queue --json "
            "list`), Postfix logged exactly N `status=sent`, mtrkmta's tracking store had N "
            "messages with every recipient final; in (b) both queues held exactly N messages."
        )
    for run in problems:
        lines.append(f"- {run.scenario} {run.system} round {run.round}: {'; '.join(run.problems)}")
    for result in mtqp or ():
        name = STORE_NAMES.get(result["backend"], result["backend"])
        if result["problems"]:
            lines.append(f"- mtqp {name}: {'; '.join(result['problems'])}")
        elif "track" in result:
            lines.append(
                f"- mtqp {name}: the store held every loaded message and recipient, and all "
                f"{result['track']['checked']:,} TRACK answers were right."
            )
    stops = [run for run in runs if run.extra.get("stop_seconds") is not None]
    if stops:
        killed = [run for run in stops if run.extra.get("killed")]
        clean = [float(run.extra["stop_seconds"]) for run in stops if not run.extra.get("killed")]  # type: ignore[arg-type]
        lines += ["", "## Observations", ""]
        if clean:
            lines.append(
                f"- mtrkmta stopped within {max(clean):.1f} s of SIGTERM in {len(clean)} runs "
                f"(median {median(clean):.1f} s)."
            )
        if killed:
            where = sorted({run.scenario for run in killed})
            lines.append(
                f"- mtrkmta did not stop within {killed[0].extra['stop_seconds']:.0f} s of SIGTERM "
                f"in {len(killed)} run(s) (scenario {', '.join(where)}) and was killed: its "
                "shutdown waits for delivery attempts in flight, and those to the silent next hop "
                "of (b) only end at the client's greeting timeout (300 s)."
            )
    lines += ["", "## Scenarios", ""]
    lines += [f"- {key}: {title}" for key, title in titles.items()]
    texts = []
    for mode, profile, raw in profiles:
        if not raw.exists():
            continue
        what = PROFILE_MODES.get(mode, mode)
        head = (
            f"py-spy ({what}) of mtrkmta during scenario (a): {profile.messages} messages, "
            f"{profile.rate:.1f} msg/s end to end (slower than unprofiled)"
        )
        summary = summarize_profile(raw)
        texts += [head, "", *summary, "", ""]
        lines += ["", f"## Profile: {what}", "", head, "", "```", *summary[:48], "```"]
    if texts:
        profile_txt = results / "profile-a.txt"
        profile_txt.write_text("\n".join(texts))
        written.append(profile_txt)
    md = results / "results.md"
    md.write_text("\n".join(lines) + "\n")
    written.append(md)
    data = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "env": env,
        "runs": [run_to_dict(run) for run in runs],
        "memory": memory,
        "profiles": [run_to_dict(run) for _, run, _ in profiles],
        "mtqp": mtqp or [],
        "concurrency": concurrency or [],
    }
    js = results / "results.json"
    js.write_text(json.dumps(data, indent=1) + "\n")
    written.append(js)
    if chart or tracking:
        png = results / "results.png"
        write_chart(png, chart, runs)
        written.append(png)
    cpu_data = cpu_chart_data(runs)
    if cpu_data:
        png = results / "cpu.png"
        write_cpu_chart(png, cpu_data)
        written.append(png)
    return written
