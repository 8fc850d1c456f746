"""The IAuthFailures contract, passed alike by the in-memory store (unit tests) and the SQL one
(the tracking database, on a real SQLite file or PostgreSQL and a real thread pool)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from sqlalchemy import func, select
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from mtrkmta.authlimits import IAuthFailures, MemoryAuthFailures, window_start
from mtrkmta.testing import database_url
from mtrkmta.tracking import migrate
from mtrkmta.tracking.authfailures import SQLAuthFailures
from mtrkmta.tracking.schema import build_schema
from mtrkmta.tracking.store import create_tracking_engine

WINDOW = 900.0
T = 1_700_000_000.0
A = "192.0.2.7"
B = "2001:db8:ffff:ffff:ffff:ffff:255.255.255.255"  # the longest textual IPv6 form


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=1, maxthreads=2, name="auth-failures-test")
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = database_url(tmp_path)
    migrate.upgrade(url)
    return url


def sql_store(db_url: str, threadpool: ThreadPool) -> SQLAuthFailures:
    return SQLAuthFailures(db_url, reactor, threadpool, window=WINDOW)


@pytest.fixture(params=["memory", "sql"])
def store(request: pytest.FixtureRequest) -> Iterator[IAuthFailures]:
    if request.param == "memory":
        made: IAuthFailures = MemoryAuthFailures(WINDOW)
    else:
        made = sql_store(request.getfixturevalue("db_url"), request.getfixturevalue("threadpool"))
    yield made
    pytest_twisted.blockon(made.close())


def test_provides_the_interface(store):
    assert verifyObject(IAuthFailures, store)
    assert store.window == WINDOW


@pytest_twisted.ensureDeferred
async def test_record_answers_the_running_count_per_address(store):
    assert await store.count(A, T) == 0
    assert [await store.record(A, T + i) for i in range(3)] == [1, 2, 3]
    assert await store.record(B, T + 3) == 1
    assert await store.count(A, T + 3) == 3
    assert await store.count(B, T + 3) == 1
    assert await store.count("192.0.2.8", T + 3) == 0


@pytest_twisted.ensureDeferred
async def test_failures_count_for_the_window_in_whole_seconds(store):
    await store.record(A, T + 0.9)  # second T
    await store.record(A, T + 10.2)  # second T + 10
    assert await store.count(A, T + WINDOW - 0.1) == 2  # second T + 899
    assert await store.count(A, T + WINDOW + 0.5) == 1  # second T + 900: T is out
    assert await store.count(A, T + WINDOW + 10) == 0
    assert window_start(T + WINDOW + 0.5, WINDOW) == T


@pytest_twisted.ensureDeferred
async def test_purge_forgets_only_what_is_outside_the_window(store):
    await store.record(A, T)
    await store.record(B, T)
    await store.record(A, T + 100)
    assert await store.purge(T + WINDOW) == 2
    assert await store.purge(T + WINDOW) == 0
    assert await store.count(A, T + WINDOW) == 1
    assert await store.count(B, T + WINDOW) == 0


@pytest_twisted.ensureDeferred
async def test_recording_forgets_old_failures_of_every_address(store):
    await store.record(B, T)
    assert await store.record(A, T + WINDOW) == 1
    assert await store.purge(T + WINDOW) == 0  # B's old failure went with A's record


@pytest_twisted.ensureDeferred
async def test_concurrent_records_are_all_counted(store):
    await gatherResults([store.record(A, T) for _ in range(10)])
    assert await store.count(A, T) == 10


# -- the SQL store only ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_stores_on_one_database_count_together(db_url, threadpool):
    # What worker processes and nodes on one database do, each with its own engine.
    first, second = sql_store(db_url, threadpool), sql_store(db_url, threadpool)
    try:
        await first.record(A, T)
        assert await second.record(A, T + 1) == 2
        assert await first.count(A, T + 1) == 2
    finally:
        await first.close()
        await second.close()


@pytest_twisted.ensureDeferred
async def test_the_table_holds_only_the_window(db_url, threadpool):
    store = sql_store(db_url, threadpool)
    try:
        for i in range(5):
            await store.record(A, T + i * WINDOW)
    finally:
        await store.close()
    engine = create_tracking_engine(db_url)
    try:
        table = build_schema().auth_failures
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(table)) == 1
    finally:
        engine.dispose()
