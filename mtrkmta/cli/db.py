"""`mtrkmta db`: upgrade the tracking database's schema, or rebuild a damaged one from the spool."""

from __future__ import annotations

import os
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

from sqlalchemy.engine import make_url
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mtrkmta.cli.conventions import options_first, parse
from mtrkmta.cli.options import ServeOptions
from mtrkmta.config import EXIT_CONFIG_ERROR, Config, ConfigError
from mtrkmta.queue.control import SOCKET_NAME
from mtrkmta.spool.filespool import FileSpool, sync_directory
from mtrkmta.spool.interfaces import SpoolCorruption
from mtrkmta.workers import WORKERS_DIR, WorkerRole

# The companions SQLite keeps next to a database file (WAL, its index, a rollback journal).
COMPANIONS = ("-wal", "-shm", "-journal")
BATCH = 256  # spool files read (and recorded) at a time: bounds the memory recover needs


class DbOptions(ServeOptions):
    """``db upgrade`` and ``db recover``: the server's options, and --force for recover."""

    program = "mtrkmta db"
    synopsis = "[options] upgrade | recover [--force]"
    longdesc = (
        "Act on the tracking database named by the server's options (--config, --database, "
        "--data-dir). Exit status: 0 done, 1 failed, 2 usage or configuration error."
    )
    commands = (
        ("upgrade", "create the tracking database or migrate it to the current schema"),
        ("recover", "move a damaged SQLite database aside and rebuild it from the spool"),
    )
    optFlags = (("force", None, "db recover: rebuild even when SQLite finds no damage."),)

    def parseArgs(self, *args: str) -> None:
        if len(args) != 1 or args[0] not in ("upgrade", "recover"):
            got = f", got {' '.join(args)!r}" if args else ""
            raise usage.UsageError(f"expected upgrade or recover{got}")
        if self["force"] and args[0] != "recover":
            raise usage.UsageError("--force is for db recover")
        self["command"] = args[0]


class RecoverError(Exception):
    """Recovery cannot go on; str() is the line for the operator."""


def main(args: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``mtrkmta db ARGS``; 0 on success, 1 when the work failed, 2 for a usage error."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    options = DbOptions()
    status = parse(options, args, err)
    if status is not None:
        return status
    try:
        config = options.load_config()
    except ConfigError as error:
        print(f"mtrkmta: {error}", file=err)
        return EXIT_CONFIG_ERROR
    given = options_first(options, args)  # the options, then the command word
    command = shlex.join(["mtrkmta", "db", "recover", *given[:-1]])
    if options["command"] == "upgrade":
        return upgrade(config, command, out, err)
    try:
        report = recover(config, force=bool(options["force"]))
    except RecoverError as error:
        print(f"mtrkmta: {error}", file=err)
        return 1
    except Exception as error:  # a file or the database refuses: one line, not a traceback
        print(f"mtrkmta: db recover failed: {first_line(error)}", file=err)
        return 1
    report.write(out)
    return 0


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s text (SQLAlchemy appends the statement on more lines)."""
    lines = str(error).splitlines()
    return lines[0] if lines else type(error).__name__


def upgrade(config: Config, recover_command: str, out: TextIO, err: TextIO) -> int:
    """``db upgrade``: create or migrate the tracking database."""
    from mtrkmta.tracking.damage import as_damage, check_database
    from mtrkmta.tracking.migrate import current_revision
    from mtrkmta.tracking.migrate import upgrade as migrate

    url = make_url(config.database)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        check_database(config.database)
        migrate(config.database)
    except Exception as error:  # the database is unreachable, refuses or is damaged: say so
        damage = as_damage(error, config.database)
        if damage is not None:
            print(f"mtrkmta: {damage.advice(recover_command)}", file=err)
        else:
            print(f"mtrkmta: cannot upgrade {url!r}: {error}", file=err)
        return 1
    print(f"tracking database at revision {current_revision(config.database)}", file=out)
    return 0


# -- db recover --------------------------------------------------------------------------


@dataclass
class RecoverReport:
    """What ``db recover`` did."""

    database: Path
    moved: list[tuple[Path, Path]] = field(default_factory=list)  # (from, to)
    revision: str | None = None
    recorded: int = 0
    quarantined: dict[Path, list[str]] = field(default_factory=dict)  # quarantine dir -> ids

    def write(self, out: TextIO) -> None:
        if self.moved:
            for source, target in self.moved:
                print(f"moved the damaged {source} aside to {target}", file=out)
        else:
            print(f"there was no tracking database at {self.database}", file=out)
        print(
            f"created a new tracking database at {self.database} (revision {self.revision})",
            file=out,
        )
        print(
            f"re-recorded {self.recorded} message(s) still in the spool; "
            "every recipient of each is queued again",
            file=out,
        )
        count = sum(len(ids) for ids in self.quarantined.values())
        print(f"quarantined {count} unreadable spool file(s)", file=out)
        for where, ids in self.quarantined.items():
            print(f"  moved to {where}: {' '.join(ids)}", file=out)
        print(
            "lost: the tracking history of finished messages (MTQP and `mtrkmta queue` "
            "know nothing of mail already delivered or bounced), and hold marks",
            file=out,
        )
        print(
            "duplicates: Maildir delivery of a re-recorded message is idempotent (a copy "
            "already in the mailbox is not written again), but an SMTP or LMTP next hop "
            "that already took it gets a second copy (RFC 1047)",
            file=out,
        )


def recover(config: Config, *, force: bool = False) -> RecoverReport:
    """Move a damaged SQLite tracking database aside and rebuild it from the spool. Blocking.

    The new database is built under a temporary name next to the old one (schema
    at head, then one record per readable spool file, of the master's spool and of
    every worker's) and only then takes the old one's place, so an interrupted
    recover leaves the damaged file where it was. Raises RecoverError.
    """
    from mtrkmta.tracking.damage import DatabaseDamage, check_database, sqlite_path

    url = make_url(config.database)
    if url.get_backend_name() != "sqlite":
        raise RecoverError(
            f"db recover rebuilds an SQLite tracking database only; "
            f"{url.render_as_string(hide_password=True)} is {url.get_backend_name()}: "
            "restore PostgreSQL from its backups"
        )
    path_text = sqlite_path(config.database)
    if path_text is None:
        raise RecoverError(f"db recover needs a database file, not {config.database}")
    path = Path(path_text).absolute()
    running = running_server(config.data_dir)
    if running is not None:
        raise RecoverError(
            f"mtrkmta is running (its control socket {running} answers); "
            "stop it, then run db recover again"
        )
    if path.exists() and not force:
        try:
            check_database(config.database)
        except DatabaseDamage:
            pass
        else:
            raise RecoverError(
                f"tracking database {path} is not damaged (PRAGMA quick_check: ok); "
                "db recover would throw its history away: nothing done (--force rebuilds it)"
            )
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    fresh = path.with_name(f"{path.name}.recovering-{stamp}")
    for leftover in (fresh, *(Path(f"{fresh}{suffix}") for suffix in COMPANIONS)):
        leftover.unlink(missing_ok=True)
    report = RecoverReport(path)
    try:
        report.revision = _build(config, str(url.set(database=str(fresh))), report)
        for suffix in COMPANIONS:  # closing the last connection checkpoints the WAL
            if Path(f"{fresh}{suffix}").exists():
                raise RecoverError(f"the new database {fresh} was not closed cleanly ({suffix})")
        damaged = path.with_name(f"{path.name}.damaged-{stamp}")
        for suffix in COMPANIONS:  # a stale WAL must never meet the new file
            _move(Path(f"{path}{suffix}"), Path(f"{damaged}{suffix}"), report)
        _move(path, damaged, report)
        os.replace(fresh, path)
        sync_directory(path.parent)
    except BaseException:
        fresh.unlink(missing_ok=True)
        raise
    return report


def running_server(data_dir: Path) -> Path | None:
    """The control socket of a node that answers on ``data_dir`` (master or worker), if any."""
    sockets = [data_dir / SOCKET_NAME, *sorted((data_dir / WORKERS_DIR).glob(f"*/{SOCKET_NAME}"))]
    for path in sockets:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5.0)
            try:
                client.connect(str(path))
            except OSError:
                continue
        return path
    return None


def _build(config: Config, url: str, report: RecoverReport) -> str | None:
    """Create the database at ``url`` and record every readable spool file in it."""
    from twisted.internet.task import react

    from mtrkmta.tracking.migrate import current_revision
    from mtrkmta.tracking.migrate import upgrade as migrate

    migrate(url)
    outcome: list[BaseException] = []

    async def run(reactor: Any) -> None:
        try:
            await _record_spools(reactor, config, url, report)
        except BaseException as error:  # react() would print it; recover() raises it
            outcome.append(error)

    try:
        react(lambda reactor: ensureDeferred(run(reactor)))
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RecoverError(f"db recover failed (status {exit_.code})") from None
    if outcome:
        error = outcome[0]
        if isinstance(error, RecoverError):
            raise error
        raise RecoverError(f"db recover failed: {first_line(error)}") from error
    return current_revision(url)


def _spools(config: Config) -> list[tuple[Path, str]]:
    """(spool directory, node id) of the master and of every worker directory."""
    result = [(config.data_dir / "spool", config.node_id)]
    try:
        names = sorted((config.data_dir / WORKERS_DIR).iterdir())
    except FileNotFoundError:
        names = []
    for directory in names:
        if directory.name.isdigit():
            worker = WorkerRole(int(directory.name), {}).node_config(config)
            result.append((worker.data_dir / "spool", worker.node_id))
    return result


async def _record_spools(reactor: Any, config: Config, url: str, report: RecoverReport) -> None:
    from mtrkmta.tracking.store import SQLTrackingStore

    pool = ThreadPool(minthreads=1, maxthreads=4, name="mtrkmta-recover")
    pool.start()
    store = SQLTrackingStore(
        reactor,
        pool,
        url,
        default_retention=config.tracking.default_retention,
        max_retention=config.tracking.max_retention,
    )
    try:
        for root, node_id in _spools(config):
            if not (root / "queue").is_dir():
                continue
            spool = FileSpool(reactor, pool, root, fsync=config.durability.fsync)
            try:
                await _record_spool(spool, store, config.hostname, node_id, report)
            finally:
                await spool.close()
    finally:
        await store.close()
        pool.stop()


async def _record_spool(
    spool: FileSpool, store: Any, hostname: str, node_id: str, report: RecoverReport
) -> None:
    unreadable: list[str] = []
    queue_ids = await spool.queue_ids()
    for start in range(0, len(queue_ids), BATCH):
        batch = queue_ids[start : start + BATCH]
        loaded = await DeferredList([spool.load(q) for q in batch], consumeErrors=True)
        writes = []
        for queue_id, (ok, result) in zip(batch, loaded, strict=True):
            if not ok:
                # DeferredList's annotation omits it: a failed load's result is its Failure.
                failure = cast(Failure, result)
                if not failure.check(SpoolCorruption):
                    failure.raiseException()
                unreadable.append(queue_id)
                continue
            envelope, content = result
            writes.append(
                store.record_arrival(
                    envelope, reporting_mta=hostname, node_id=node_id, size=len(content)
                )
            )
        for ok, result in await DeferredList(writes, consumeErrors=True):
            if not ok:
                result.raiseException()
        report.recorded += len(writes)
    if unreadable:
        where = await spool.quarantine(unreadable)
        report.quarantined.setdefault(where, []).extend(unreadable)


def _move(source: Path, target: Path, report: RecoverReport) -> None:
    try:
        os.rename(source, target)
    except FileNotFoundError:
        return
    report.moved.append((source, target))
