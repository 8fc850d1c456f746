"""A damaged SQLite tracking database: telling it from other errors, and finding it early."""

from __future__ import annotations

import os
import sqlite3

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from mtrkmta.tracking.store import create_tracking_engine

# SQLite's primary result codes for a damaged file (https://www.sqlite.org/rescode.html):
# SQLITE_CORRUPT ("database disk image is malformed") and SQLITE_NOTADB ("file is not a
# database"). Extended codes carry the primary one in their low byte.
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26
_DAMAGE_CODES = frozenset({SQLITE_CORRUPT, SQLITE_NOTADB})
_DAMAGE_MESSAGES = ("file is not a database", "database disk image is malformed")


class DatabaseDamage(Exception):
    """The SQLite tracking database at ``path`` is damaged; ``reason`` says how."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"tracking database {self.path} is damaged ({self.reason})"

    def advice(self, command: str) -> str:
        """The one line for the operator: what is damaged and the ``command`` that recovers."""
        return f"{self}; stop mtrkmta and run: {command}"


def sqlite_path(url: str) -> str | None:
    """The file of an SQLite database URL; None for another database or an in-memory one."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return str(parsed.database)


def damage_reason(error: BaseException) -> str | None:
    """SQLite's own words if ``error``, or an error it wraps, says the file is damaged."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, sqlite3.DatabaseError):
            code = getattr(current, "sqlite_errorcode", None)
            text = str(current).splitlines()[0] if str(current) else ""
            if (code is not None and code & 0xFF in _DAMAGE_CODES) or text in _DAMAGE_MESSAGES:
                return text or "damaged"
        if isinstance(current, DBAPIError):
            pending.append(current.orig)
        pending.extend((current.__cause__, current.__context__))
    return None


def as_damage(error: BaseException, url: str) -> DatabaseDamage | None:
    """``error`` as a DatabaseDamage of the SQLite database at ``url``, or None if it is not."""
    if isinstance(error, DatabaseDamage):
        return error
    path = sqlite_path(url)
    reason = damage_reason(error) if path is not None else None
    return None if path is None or reason is None else DatabaseDamage(path, reason)


def check_database(url: str) -> None:
    """Raise DatabaseDamage if SQLite's ``PRAGMA quick_check`` finds the file damaged. Blocking.

    Does nothing for another database or a file that does not exist yet. The check
    reads every page of the file once (it skips the comparison of indexes with their
    tables that ``integrity_check`` adds).
    """
    path = sqlite_path(url)
    if path is None or not os.path.exists(path):
        return
    engine = create_tracking_engine(url)
    try:
        with engine.connect() as conn:
            problems = [str(row) for row in conn.exec_driver_sql("PRAGMA quick_check").scalars()]
    except DBAPIError as error:
        damage = as_damage(error, url)
        if damage is None:
            raise
        raise damage from None
    finally:
        engine.dispose()
    if problems != ["ok"]:
        first = " ".join(" ".join(problems[:2]).split())
        raise DatabaseDamage(path, f"PRAGMA quick_check: {first}")
