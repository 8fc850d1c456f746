"""Group commit: many concurrent requests served by one blocking batch call in a thread pool."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Batch items submitted while a commit is running into the next commit.

    ``commit`` runs in ``threadpool`` with a list of items and returns one result
    per item, in order; a result that is an ``Exception`` instance fails only that
    item's Deferred. If ``commit`` itself raises, every item of the batch fails.

    At most one commit runs at a time: while it runs, new items accumulate, and
    they all go into the next call. Under load this turns N fsyncs (or N database
    transactions) into one, without ever waiting on a timer when idle.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        commit: Callable[[list[T]], Sequence[R | Exception]],
        max_batch: int = 512,
    ) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        self._commit = commit
        self._max_batch = max_batch
        self._pending: list[tuple[T, Deferred[R]]] = []
        self._busy = False
        self._idle_waiters: list[Deferred[None]] = []

    def submit(self, item: T) -> Deferred[R]:
        """Queue ``item`` for the next commit; fires with its result once committed."""
        d: Deferred[R] = Deferred()
        self._pending.append((item, d))
        if not self._busy:
            self._flush()
        return d

    def idle(self) -> Deferred[None]:
        """Fire once nothing is pending or running (used at shutdown)."""
        if not self._busy and not self._pending:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def _flush(self) -> None:
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        self._busy = True
        d = deferToThreadPool(
            self._reactor, self._threadpool, self._commit, [item for item, _ in batch]
        )
        d.addBoth(self._committed, batch)

    def _committed(
        self, result: Sequence[R | Exception] | Failure, batch: list[tuple[T, Deferred[R]]]
    ) -> None:
        self._busy = False
        if self._pending:
            self._flush()
        if isinstance(result, Failure):
            for _, d in batch:
                d.errback(result)
        elif len(result) != len(batch):
            error = Failure(
                RuntimeError(f"commit returned {len(result)} results for {len(batch)} items")
            )
            for _, d in batch:
                d.errback(error)
        else:
            for (_, d), outcome in zip(batch, result, strict=True):
                if isinstance(outcome, Exception):
                    d.errback(Failure(outcome))
                else:
                    d.callback(outcome)
        if not self._busy and not self._pending:
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                w.callback(None)
