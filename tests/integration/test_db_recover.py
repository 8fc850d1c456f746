"""A damaged SQLite tracking database: the one-line start-up error, and `mtrkmta db recover`.

Real files, real SQLite and real processes: a node accepts mail that stays queued,
stops, and its ``tracking.sqlite`` is damaged three ways (cut to a few bytes, the
header zeroed, the ``messages`` table's page zeroed). ``python -m mtrkmta.cli.main
serve`` (the service ``twistd -n mtrkmta`` runs) must then exit non-zero with one
line that names the file and the command to run, and ``mtrkmta db recover`` must
rebuild the database from the spool so that the mail is delivered after all.
"""

from __future__ import annotations

import shlex
import sqlite3
import subprocess
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

import pytest
import pytest_twisted
from mtrkmtaprocess import run_mtrkmta
from smtpwire import Wire, in_thread, queue_emptied, queue_id_of

from mtrkmta.config import Config
from mtrkmta.spool.filespool import HEADER_SIZE, bucket_of
from mtrkmta.testing import node_config, start_node, stop_node
from mtrkmta.tracking.interfaces import RecipientState

HOSTNAME = "mx.example.test"
SENDER = "sender@client.example"
RCPT = "alice@localhost"  # a local Maildir: delivery needs no other server
COUNT = 6


# -- helpers -------------------------------------------------------------------------


def config_for(data_dir: Path) -> Config:
    """The in-process node's configuration: SQLite in ``data_dir``, as `serve` defaults to."""
    return node_config(
        data_dir,
        hostname=HOSTNAME,
        listeners=("smtp",),
        options=(
            ("durability.fsync", False),
            ("server.database", f"sqlite:///{data_dir / 'tracking.sqlite'}"),
        ),
    )


def send_all(port: int, count: int) -> list[str]:
    """Blocking: ``count`` messages to RCPT over one connection; their queue ids."""
    queue_ids = []
    with Wire(port) as wire:
        assert wire.ehlo().code == 250
        for index in range(count):
            assert wire.command(f"MAIL FROM:<{SENDER}>").code == 250
            assert wire.command(f"RCPT TO:<{RCPT}>").code == 250
            content = f"From: {SENDER}\r\nSubject: message {index}\r\n\r\nbody {index}\r\n"
            queue_ids.append(queue_id_of(wire.data(content.encode())))
        assert wire.command("QUIT").code == 221
    return queue_ids


async def accept_queued(data_dir: Path, count: int = COUNT) -> list[str]:
    """A node that does not deliver accepts ``count`` messages and stops: they stay queued."""
    node = await start_node(config_for(data_dir), deliver=False)
    try:
        queue_ids: list[str] = await in_thread(send_all, node.port("smtp"), count)
    finally:
        await stop_node(node)
    return sorted(queue_ids)


def spooled(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "spool" / "queue").glob("*/*"))


def mtrkmta_cli(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``mtrkmta ARGS`` as a process (this checkout's code); stdout and stderr merged."""
    return run_mtrkmta(args, cwd, merge_stderr=True)


def serve(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """``mtrkmta serve`` on ``data_dir``; returns once the process has exited."""
    return mtrkmta_cli(
        [
            "serve",
            "--data-dir",
            str(data_dir),
            "--smtp",
            "tcp:0:interface=127.0.0.1",
            "--lmtp",
            "none",
            "--mtqp",
            "none",
            "--http",
            "none",
            "--hostname",
            HOSTNAME,
        ],
        cwd=data_dir.parent,
    )


def recover(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return mtrkmta_cli(["db", "recover", *args], cwd)


# -- three kinds of damage -------------------------------------------------------------


def cut_short(database: Path) -> None:
    """What a full disk or a torn copy leaves: the first few bytes only."""
    with open(database, "r+b") as f:
        f.truncate(16)


def zero_header(database: Path) -> None:
    """The 100-byte header ("SQLite format 3", page size, ...) overwritten with zeros."""
    with open(database, "r+b") as f:
        f.write(bytes(100))


def zero_messages_page(database: Path) -> None:
    """The root page of the ``messages`` table (a leaf: few rows) overwritten with zeros.

    The header and the schema are intact, so the file opens and the schema upgrade
    passes; SQLite reports ``database disk image is malformed`` when it reads the page.
    """
    with closing(sqlite3.connect(database)) as conn:
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
        ).fetchone()
    with open(database, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(bytes(page_size))


DAMAGES: list[tuple[Callable[[Path], None], str]] = [
    (cut_short, "file is not a database"),
    (zero_header, "file is not a database"),
    (zero_messages_page, "database disk image is malformed"),
]


def expected_line(data_dir: Path, reason: str) -> str:
    database = data_dir / "tracking.sqlite"
    return (
        f"tracking database {database} is damaged ({reason}); stop mtrkmta and run: "
        f"mtrkmta db recover --data-dir {data_dir} --hostname {HOSTNAME}"
    )


def the_error_line(run: subprocess.CompletedProcess[str], data_dir: Path) -> str:
    """The one line of ``run``'s output that names the database (asserting there is one)."""
    lines = run.stdout.splitlines()
    naming = [line for line in lines if str(data_dir / "tracking.sqlite") in line]
    assert len(naming) == 1, run.stdout
    errors = [line for line in lines if "#critical]" in line or "#error]" in line]
    assert errors == naming, run.stdout
    assert "Traceback" not in run.stdout, run.stdout
    return naming[0]


def command_of(line: str) -> list[str]:
    """The `mtrkmta db recover ...` the error line says to run, as arguments after `mtrkmta`."""
    words = shlex.split(line.partition("; stop mtrkmta and run: ")[2])
    assert words[:3] == ["mtrkmta", "db", "recover"], line
    return words[1:]


# -- tests ---------------------------------------------------------------------------


@pytest.mark.parametrize(("damage", "reason"), DAMAGES, ids=[d.__name__ for d, _ in DAMAGES])
@pytest_twisted.ensureDeferred
async def test_serve_on_a_damaged_database_exits_with_one_line(tmp_path, damage, reason):
    data_dir = tmp_path / "data"
    queue_ids = await accept_queued(data_dir)
    damage(data_dir / "tracking.sqlite")

    run = serve(data_dir)

    assert run.returncode == 1, run.stdout
    assert the_error_line(run, data_dir).endswith(f"] {expected_line(data_dir, reason)}")
    # Nothing was taken for unacknowledged mail: the spool is as it was.
    assert spooled(data_dir) == queue_ids
    assert not (data_dir / "spool" / "quarantine").exists()


@pytest_twisted.ensureDeferred
async def test_recover_rebuilds_from_the_spool_and_the_mail_is_delivered(tmp_path):
    data_dir = tmp_path / "data"
    database = data_dir / "tracking.sqlite"
    queue_ids = await accept_queued(data_dir)
    zero_messages_page(database)
    damaged_bytes = database.read_bytes()
    line = the_error_line(serve(data_dir), data_dir)

    run = recover(command_of(line)[2:], cwd=tmp_path)

    assert run.returncode == 0, run.stdout
    (damaged,) = data_dir.glob("tracking.sqlite.damaged-*")
    assert damaged.read_bytes() == damaged_bytes
    lines = run.stdout.splitlines()
    assert lines[0] == f"moved the damaged {database} aside to {damaged}"
    assert lines[1].startswith(f"created a new tracking database at {database} (revision ")
    assert lines[2] == (
        f"re-recorded {COUNT} message(s) still in the spool; "
        "every recipient of each is queued again"
    )
    assert lines[3] == "quarantined 0 unreadable spool file(s)"
    assert lines[4].startswith("lost: the tracking history of finished messages")
    assert "Maildir delivery of a re-recorded message is idempotent" in lines[5]
    assert lines[5].endswith("gets a second copy (RFC 1047)")
    assert "Traceback" not in run.stdout
    assert spooled(data_dir) == queue_ids

    # The queue listing (what `mtrkmta queue list` shows) has every message again.
    node = await start_node(config_for(data_dir), deliver=False)
    try:
        assert node.tracking is not None
        listing = await node.tracking.queue_listing(HOSTNAME)
    finally:
        await stop_node(node)
    assert sorted(m.queue_id for m in listing) == queue_ids
    for message in listing:
        assert message.sender == SENDER
        assert [(r.address, r.state) for r in message.recipients] == [(RCPT, RecipientState.QUEUED)]

    # A node started on the rebuilt database delivers all of them.
    node = await start_node(config_for(data_dir))
    try:
        await queue_emptied(node, timeout=30)
    finally:
        await stop_node(node)
    delivered = list((data_dir / "mail" / "alice" / "new").iterdir())
    assert sorted(f.read_bytes().split(b"\nSubject: ")[1][:9] for f in delivered) == [
        f"message {i}".encode() for i in range(COUNT)
    ]


@pytest_twisted.ensureDeferred
async def test_recover_quarantines_and_counts_an_unreadable_spool_file(tmp_path):
    data_dir = tmp_path / "data"
    queue_ids = await accept_queued(data_dir)
    bad = queue_ids[2]
    spool_file = data_dir / "spool" / "queue" / bucket_of(bad) / bad
    with open(spool_file, "r+b") as f:  # one bit of the content: the CRC no longer matches
        f.seek(HEADER_SIZE + 3)
        byte = f.read(1)[0]
        f.seek(HEADER_SIZE + 3)
        f.write(bytes([byte ^ 0x01]))
    zero_header(data_dir / "tracking.sqlite")

    run = recover(["--data-dir", str(data_dir), "--hostname", HOSTNAME], cwd=tmp_path)

    assert run.returncode == 0, run.stdout
    quarantine = data_dir / "spool" / "quarantine"
    assert f"re-recorded {COUNT - 1} message(s) still in the spool" in run.stdout
    assert "quarantined 1 unreadable spool file(s)\n" in run.stdout
    assert f"  moved to {quarantine}: {bad}\n" in run.stdout
    assert sorted(p.name for p in quarantine.iterdir()) == [bad]
    assert spooled(data_dir) == [q for q in queue_ids if q != bad]
    with closing(sqlite3.connect(data_dir / "tracking.sqlite")) as conn:
        recorded = sorted(q for (q,) in conn.execute("SELECT queue_id FROM messages"))
    assert recorded == [q for q in queue_ids if q != bad]


@pytest_twisted.ensureDeferred
async def test_recover_refuses_while_the_server_runs(tmp_path):
    data_dir = tmp_path / "data"
    await accept_queued(data_dir, count=1)
    database = data_dir / "tracking.sqlite"
    before = database.read_bytes()
    node = await start_node(config_for(data_dir), deliver=False)
    try:
        args = ["--data-dir", str(data_dir), "--hostname", HOSTNAME, "--force"]
        run = await in_thread(recover, args, tmp_path)
    finally:
        await stop_node(node)
    assert run.returncode == 1, run.stdout
    assert run.stdout == (
        f"mtrkmta: mtrkmta is running (its control socket {data_dir / 'control.sock'} "
        "answers); stop it, then run db recover again\n"
    )
    assert not list(data_dir.glob("tracking.sqlite.*"))
    assert database.read_bytes() == before


def test_recover_refuses_a_postgresql_database(tmp_path):
    url = "postgresql+psycopg://mtrkmta:secret@db.example.invalid/mtrkmta"
    run = recover(["--data-dir", str(tmp_path / "data"), "--database", url], cwd=tmp_path)
    assert run.returncode == 1, run.stdout
    assert run.stdout == (
        "mtrkmta: db recover rebuilds an SQLite tracking database only; "
        "postgresql+psycopg://mtrkmta:***@db.example.invalid/mtrkmta is postgresql: "
        "restore PostgreSQL from its backups\n"
    )
    assert not (tmp_path / "data").exists()
