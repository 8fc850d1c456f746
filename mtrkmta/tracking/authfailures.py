"""SQLAuthFailures: recent AUTH failures per client address in the tracking database.

Every process on one database (the worker processes of a node, the nodes of a
cluster on PostgreSQL) counts the same failures. The store has its own engine on
the tracking database's URL; every query runs in the thread pool it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection, delete, func, insert, select
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mtrkmta.authlimits import IAuthFailures, window_start
from mtrkmta.tracking.schema import build_schema
from mtrkmta.tracking.store import create_tracking_engine, mark_write, whole_seconds

R = TypeVar("R")


@implementer(IAuthFailures)
class SQLAuthFailures:
    """IAuthFailures on the ``auth_failures`` table (migration 0004) at ``url``.

    Recording a failure also deletes every failure outside the window, so the
    table holds only the last ``window`` seconds of failures.
    """

    def __init__(
        self, url: str, reactor: IReactorFromThreads, threadpool: ThreadPool, *, window: float
    ) -> None:
        self.window = window
        self._reactor = reactor
        self._threadpool = threadpool
        self._engine = create_tracking_engine(url)
        self._table = build_schema().auth_failures

    def record(self, address: str, now: float) -> Deferred[int]:
        return self._run(self._record, address, now)

    def count(self, address: str, now: float) -> Deferred[int]:
        return self._run(self._count, address, now)

    def purge(self, now: float) -> Deferred[int]:
        return self._run(self._purge, now)

    def close(self) -> Deferred[None]:
        return self._run(self._engine.dispose)

    def _run(self, fn: Callable[..., R], *args: object) -> Deferred[R]:
        return deferToThreadPool(self._reactor, self._threadpool, fn, *args)

    # -- in the thread pool ----------------------------------------------------------

    def _record(self, address: str, now: float) -> int:
        table = self._table
        with self._engine.connect() as conn:
            mark_write(conn)
            with conn.begin():
                conn.execute(delete(table).where(table.c.failed_at <= self._start(now)))
                conn.execute(insert(table).values(address=address, failed_at=whole_seconds(now)))
                return self._count_in(conn, address, now)

    def _count(self, address: str, now: float) -> int:
        with self._engine.connect() as conn, conn.begin():
            return self._count_in(conn, address, now)

    def _count_in(self, conn: Connection, address: str, now: float) -> int:
        table = self._table
        query = (
            select(func.count())
            .select_from(table)
            .where(table.c.address == address, table.c.failed_at > self._start(now))
        )
        return int(conn.scalar(query) or 0)

    def _purge(self, now: float) -> int:
        table = self._table
        with self._engine.connect() as conn:
            mark_write(conn)
            with conn.begin():
                result = conn.execute(delete(table).where(table.c.failed_at <= self._start(now)))
                return int(result.rowcount)

    def _start(self, now: float) -> int:
        return window_start(now, self.window)
