"""SQLTrackingStore on a real SQLite file and thread pool: records, lookup, group commit, expiry."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from sqlalchemy import Engine, event, select, update
from sqlalchemy.exc import IntegrityError
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from mtrkmta.config import DAY, DEFAULT_RETENTION, MAX_RETENTION
from mtrkmta.envelope import (
    ClientInfo,
    Envelope,
    MailParams,
    Mtrk,
    OriginalRecipient,
    RcptParams,
    Recipient,
)
from mtrkmta.testing import database_url
from mtrkmta.tracking import migrate
from mtrkmta.tracking import store as store_module
from mtrkmta.tracking.interfaces import ITrackingStore, RecipientState, RecipientUpdate
from mtrkmta.tracking.schema import build_schema
from mtrkmta.tracking.store import (
    CHUNK,
    SQLTrackingStore,
    StoreClosedError,
    certifier_matches,
    create_tracking_engine,
)

ARRIVAL = 1_700_000_000.25
SECRET = b"\x01" * 32  # A: never stored, only its SHA-1 is
CERTIFIER = hashlib.sha1(SECRET).digest()  # B


def envelope(
    queue_id: str,
    *,
    envid: str | None = "env-1@example.org",
    secret: bytes | None = SECRET,
    timeout: int | None = None,
    arrival: float = ARRIVAL,
    certifier_length: int = 20,
) -> Envelope:
    mtrk = None
    if secret is not None:
        mtrk = Mtrk(certifier=hashlib.sha1(secret).digest()[:certifier_length], timeout=timeout)
    return Envelope(
        queue_id=queue_id,
        sender="Alice@Example.org",
        recipients=(
            Recipient(
                "Bob@example.net",
                RcptParams(
                    notify=frozenset({"DELAY", "FAILURE"}),
                    orcpt=OriginalRecipient("rfc822", "bob+orig@example.net"),
                ),
            ),
            Recipient("carol@example.net"),
            Recipient("dave@example.net", RcptParams(notify=frozenset({"NEVER"}))),
        ),
        params=MailParams(body="8BITMIME", envid=envid, ret="HDRS", mtrk=mtrk, auth="alice"),
        arrival=arrival,
        client=ClientInfo(
            address="192.0.2.7",
            port=40000,
            helo="client.example.org",
            protocol="ESMTPSA",
            authenticated_as="alice",
            listener="submission",
        ),
    )


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=1, maxthreads=4, name="tracking-test")
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The test's migrated database: PostgreSQL in ``--postgres`` runs unless marked sqlite."""
    if request.node.get_closest_marker("sqlite") is not None:
        url = f"sqlite:///{tmp_path / 'tracking.sqlite'}"
    else:
        url = database_url(tmp_path)
    migrate.upgrade(url)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_tracking_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(ARRIVAL + 5)
    return clock


def new_store(
    engine: Engine, threadpool: ThreadPool, clock: Clock, commit_pool: ThreadPool | None = None
) -> SQLTrackingStore:
    from twisted.internet import reactor

    return SQLTrackingStore(
        reactor,
        threadpool,
        engine,
        default_retention=DEFAULT_RETENTION,
        max_retention=MAX_RETENTION,
        clock=clock,
        commit_pool=commit_pool,
    )


@pytest.fixture
def store(engine: Engine, threadpool: ThreadPool, clock: Clock) -> Iterator[SQLTrackingStore]:
    store = new_store(engine, threadpool, clock)
    yield store
    pytest_twisted.blockon(store.close())


def set_state(engine: Engine, queue_id: str, state: RecipientState) -> None:
    """Move every recipient of a message to ``state`` (the queue's job, not yet written)."""
    r = build_schema().recipients
    with engine.begin() as conn:
        conn.execute(update(r).where(r.c.queue_id == queue_id).values(state=state.value))


def set_recipient(engine: Engine, queue_id: str, index: int, **values: object) -> None:
    """Set columns of one recipient directly (what the queue would have recorded)."""
    r = build_schema().recipients
    with engine.begin() as conn:
        conn.execute(
            update(r).where(r.c.queue_id == queue_id, r.c.rcpt_index == index).values(**values)
        )


def recipient_rows(engine: Engine, queue_id: str) -> int:
    r = build_schema().recipients
    with engine.connect() as conn:
        return len(conn.execute(select(r.c.rcpt_index).where(r.c.queue_id == queue_id)).all())


class CommitCounter:
    """Counts the transactions committed on an engine while in a ``with`` block."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.count = 0

    def _on_commit(self, conn: object) -> None:
        self.count += 1

    def __enter__(self) -> CommitCounter:
        event.listen(self.engine, "commit", self._on_commit)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "commit", self._on_commit)


def lookup(store: SQLTrackingStore, envid: str, candidate: bytes):
    """The earliest transaction ``lookup_transactions`` finds, or None."""
    d = store.lookup_transactions(envid, candidate)
    return d.addCallback(lambda found: found[0] if found else None)


def record(store: SQLTrackingStore, env: Envelope, node_id: str = "node-a"):
    return store.record_arrival(env, reporting_mta="mx.example.com", node_id=node_id, size=1234)


def test_provides_interface(store):
    assert verifyObject(ITrackingStore, store)


@pytest.mark.sqlite
def test_sqlite_connections_are_durable(engine):
    # WAL + synchronous=FULL + foreign keys on every pooled connection.
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


@pytest.mark.sqlite
@pytest_twisted.inlineCallbacks
def test_sqlite_writes_take_the_lock_at_begin(store, engine):
    # Writes use BEGIN IMMEDIATE (no SQLITE_BUSY on upgrade); reads a plain BEGIN.
    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield record(store, envelope("W1"))
        writes, statements[:] = list(statements), []
        yield store.message("W1")
        reads = list(statements)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert writes[0] == "BEGIN IMMEDIATE"
    assert any(s.startswith("INSERT INTO messages") for s in writes)
    assert reads[0] == "BEGIN"
    assert all(s.startswith(("BEGIN", "SELECT")) for s in reads)


@pytest_twisted.inlineCallbacks
def test_writes_run_in_the_commit_pool_and_reads_in_the_other(engine, threadpool, clock):
    # The node runs every group commit in one thread of its own (MTAService.commit_pool).
    commits = ThreadPool(minthreads=1, maxthreads=1, name="tracking-test-commit")
    commits.start()
    threads: list[str] = []

    def seen(*args: object) -> None:
        threads.append(threading.current_thread().name)

    store = new_store(engine, threadpool, clock, commit_pool=commits)
    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield record(store, envelope("C1"))
        writes, threads[:] = list(threads), []
        yield store.message("C1")
        reads = list(threads)
        yield store.close()
    finally:
        event.remove(engine, "before_cursor_execute", seen)
        commits.stop()
    assert writes and all("tracking-test-commit" in name for name in writes)
    assert reads and not any("tracking-test-commit" in name for name in reads)


@pytest_twisted.inlineCallbacks
def test_arrival_fires_with_the_record_as_stored(store):
    # The queue's first attempt uses this record instead of reading it back.
    untracked = envelope("Q0", secret=None, envid=None)
    for env in (envelope("Q1", timeout=3600), envelope("Q2", certifier_length=16), untracked):
        recorded = yield record(store, env)
        assert recorded == (yield store.message(env.queue_id))


@pytest_twisted.inlineCallbacks
def test_arrival_round_trip(store):
    # RFC 3885 §3.1, RFC 3886 §3.2-§3.3: per-message and per-recipient data as received.
    yield record(store, envelope("Q1", timeout=3600))
    msg = yield store.message("Q1")
    assert msg.queue_id == "Q1"
    assert msg.node_id == "node-a"
    assert msg.envid == "env-1@example.org"
    assert msg.certifier == CERTIFIER  # B, not A (RFC 3885 §3.1)
    assert msg.certifier != SECRET
    assert msg.sender == "Alice@Example.org"
    assert msg.arrival == 1_700_000_000
    assert msg.requested_timeout == 3600
    assert msg.expires_at == 1_700_000_000 + 3600
    assert msg.reporting_mta == "mx.example.com"
    assert msg.size == 1234
    assert (msg.ret, msg.body, msg.smtputf8, msg.auth) == ("HDRS", "8BITMIME", False, "alice")
    assert msg.client == ClientInfo(
        address="192.0.2.7",
        port=40000,
        helo="client.example.org",
        protocol="ESMTPSA",
        authenticated_as="alice",
        listener="submission",
    )
    assert msg.tracked and msg.in_queue
    bob, carol, dave = msg.recipients
    assert [r.index for r in msg.recipients] == [0, 1, 2]
    assert bob.address == "Bob@example.net"
    assert bob.final_recipient == "Bob@example.net"
    assert bob.original == OriginalRecipient("rfc822", "bob+orig@example.net")
    assert bob.notify == frozenset({"DELAY", "FAILURE"})
    # doc/conformance.rst 3886-P2: no ORCPT -> the RCPT address as received.
    assert carol.orcpt is None
    assert carol.original == OriginalRecipient("rfc822", "carol@example.net")
    assert carol.notify is None
    assert dave.notify == frozenset({"NEVER"})
    for r in msg.recipients:
        assert r.state is RecipientState.QUEUED
        assert (r.action, r.status, r.remote_mta, r.diagnostic) == (None, None, None, None)
        assert (r.last_attempt, r.will_retry_until, r.next_attempt) == (None, None, None)
        assert r.attempts == 0
        assert r.certifier_forwarded is False


@pytest_twisted.inlineCallbacks
def test_untracked_message_round_trip(store):
    env = envelope("Q2", envid=None, secret=None)
    yield record(store, env)
    msg = yield store.message("Q2")
    assert msg.envid is None and msg.certifier is None and not msg.tracked
    assert msg.requested_timeout is None
    assert msg.expires_at == 1_700_000_000 + DEFAULT_RETENTION


@pytest_twisted.inlineCallbacks
def test_requested_timeout_is_capped(store):
    # RFC 3885 §3.1 (MAY): silent cap on the requested timeout.
    yield record(store, envelope("Q3", timeout=999_999_999))
    msg = yield store.message("Q3")
    assert msg.requested_timeout == 999_999_999
    assert msg.expires_at == 1_700_000_000 + MAX_RETENTION


@pytest_twisted.inlineCallbacks
def test_unset_arrival_counts_as_now(store, clock):
    yield record(store, envelope("Q4", arrival=0.0))
    msg = yield store.message("Q4")
    assert msg.arrival == int(clock.seconds())


@pytest_twisted.inlineCallbacks
def test_unknown_message_is_none(store):
    assert (yield store.message("nope")) is None


@pytest_twisted.inlineCallbacks
def test_duplicate_queue_id_fails_and_keeps_the_first(store):
    yield record(store, envelope("Q5", envid="first@example.org"))
    with pytest.raises(IntegrityError):
        yield record(store, envelope("Q5", envid="second@example.org"))
    msg = yield store.message("Q5")
    assert msg.envid == "first@example.org"
    assert len(msg.recipients) == 3


@pytest_twisted.inlineCallbacks
def test_lookup_needs_the_right_secret(store):
    # RFC 3887 §4: SHA1(A) must equal the stored B.
    yield record(store, envelope("Q6"))
    found = yield lookup(store, "env-1@example.org", CERTIFIER)
    assert found is not None and found.queue_id == "Q6"
    assert len(found.recipients) == 3
    wrong = hashlib.sha1(b"\x02" * 32).digest()
    assert (yield lookup(store, "env-1@example.org", wrong)) is None
    # RFC 3887 §4, doc/conformance.rst 3887-P1: an unknown ENVID looks the same as a wrong secret.
    assert (yield lookup(store, "other@example.org", CERTIFIER)) is None


@pytest_twisted.inlineCallbacks
def test_lookup_matches_envid_exactly(store):
    # project decision, doc/conformance.rst 3887-P2: ENVID matched exactly, case-sensitive.
    yield record(store, envelope("Q7", envid="Env-7@Example.org"))
    assert (yield lookup(store, "env-7@example.org", CERTIFIER)) is None
    assert (yield lookup(store, "Env-7@Example.org ", CERTIFIER)) is None
    found = yield lookup(store, "Env-7@Example.org", CERTIFIER)
    assert found.queue_id == "Q7"


@pytest_twisted.inlineCallbacks
def test_lookup_with_16_octet_stored_certifier(store):
    # project decision, doc/conformance.rst 3887-P3, 3885-P1: a 16-octet B is compared with
    # SHA1(A)'s first 16 octets.
    yield record(store, envelope("Q8", envid="short@example.org", certifier_length=16))
    msg = yield store.message("Q8")
    assert msg.certifier == CERTIFIER[:16]
    found = yield lookup(store, "short@example.org", CERTIFIER)
    assert found.queue_id == "Q8"
    other_tail = CERTIFIER[:16] + bytes(b ^ 0xFF for b in CERTIFIER[16:])
    assert (yield lookup(store, "short@example.org", other_tail)).queue_id == "Q8"
    other_head = bytes([CERTIFIER[0] ^ 1]) + CERTIFIER[1:]
    assert (yield lookup(store, "short@example.org", other_head)) is None
    # A 20-octet stored B needs all 20 octets.
    yield record(store, envelope("Q9", envid="long@example.org"))
    assert (yield lookup(store, "long@example.org", other_tail)) is None
    assert (yield lookup(store, "long@example.org", CERTIFIER)).queue_id == "Q9"


@pytest_twisted.inlineCallbacks
def test_lookup_never_returns_untracked_messages(store):
    # Messages without MTRK are not answered over MTQP, whatever the secret.
    yield record(store, envelope("Q10", envid="plain@example.org", secret=None))
    assert (yield lookup(store, "plain@example.org", CERTIFIER)) is None
    assert (yield lookup(store, "plain@example.org", b"")) is None
    assert (yield lookup(store, "plain@example.org", b"\x00" * 20)) is None


@pytest_twisted.inlineCallbacks
def test_envid_reuse_with_another_certifier_neither_overwrites_nor_reveals(store):
    # doc/conformance.rst 3885-P7: records are keyed by (ENVID, B); a hijacker reusing the
    # ENVID with its own secret only ever finds its own message.
    victim_secret, hijacker_secret = b"\x11" * 32, b"\x22" * 32
    yield record(store, envelope("V1", envid="same@example.org", secret=victim_secret))
    yield record(store, envelope("H1", envid="same@example.org", secret=hijacker_secret))
    victim = yield lookup(store, "same@example.org", hashlib.sha1(victim_secret).digest())
    hijacker = yield lookup(store, "same@example.org", hashlib.sha1(hijacker_secret).digest())
    assert victim.queue_id == "V1"
    assert victim.certifier == hashlib.sha1(victim_secret).digest()
    assert hijacker.queue_id == "H1"
    assert (yield lookup(store, "same@example.org", CERTIFIER)) is None


@pytest_twisted.inlineCallbacks
def test_unknown_envid_and_wrong_secret_do_the_same_work(store, engine, monkeypatch):
    # RFC 3887 §4 and §11: without the right secret, the work done must not
    # tell whether a message exists: the same statements, rows and comparisons.
    yield record(store, envelope("W1", envid="known@example.org"))
    compared: list[tuple[bytes, bytes]] = []

    def counting(stored: bytes, candidate: bytes) -> bool:
        compared.append((stored, candidate))
        return certifier_matches(stored, candidate)  # the real comparison, counted

    monkeypatch.setattr(store_module, "certifier_matches", counting)
    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    wrong = hashlib.sha1(b"\x02" * 32).digest()
    work = []
    event.listen(engine, "before_cursor_execute", seen)
    try:
        for envid in ("known@example.org", "unknown@example.org"):
            statements.clear()
            compared.clear()
            assert (yield lookup(store, envid, wrong)) is None
            work.append((list(statements), [len(s) for s, _ in compared]))
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    (known_statements, known_compared), (unknown_statements, unknown_compared) = work
    assert known_statements == unknown_statements
    assert len([s for s in known_statements if "messages" in s]) == 1
    assert known_compared == unknown_compared == [20]


@pytest_twisted.inlineCallbacks
def test_same_envid_and_certifier_twice_gives_the_earliest(store):
    yield record(store, envelope("D2", envid="dup@example.org", arrival=ARRIVAL + 10))
    yield record(store, envelope("D1", envid="dup@example.org", arrival=ARRIVAL))
    assert (yield lookup(store, "dup@example.org", CERTIFIER)).queue_id == "D1"


@pytest_twisted.inlineCallbacks
def test_group_commit_batches_concurrent_arrivals(store, engine):
    calls = 40
    with CommitCounter(engine) as commits:
        yield gatherResults(
            [record(store, envelope(f"G{i:03d}", envid=f"g{i}@example.org")) for i in range(calls)]
        )
    # The first arrival commits alone; the 39 submitted meanwhile share one transaction.
    assert commits.count < calls
    assert commits.count == 2
    ids = [f"G{i:03d}" for i in range(calls)]
    assert (yield store.known(ids)) == frozenset(ids)
    for queue_id in ids:
        assert recipient_rows(engine, queue_id) == 3


@pytest_twisted.inlineCallbacks
def test_concurrent_outcomes_share_one_statement_and_keep_what_they_leave_out(store, engine):
    ids = [f"U{i:02d}" for i in range(10)]
    yield gatherResults([record(store, envelope(q)) for q in ids])
    yield store.record_outcomes(
        "U00",
        [
            RecipientUpdate(
                0, RecipientState.DEFERRED, "4.4.1", delay_warned=True, final_recipient="b@x.test"
            )
        ],
    )
    updates: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("UPDATE recipients"):
            updates.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        first = store.record_outcomes("U09", [RecipientUpdate(2, RecipientState.DELIVERED)])
        rest = [
            store.record_outcomes(
                q,
                [
                    RecipientUpdate(0, RecipientState.DEFERRED, "4.4.1", count_attempt=False),
                    RecipientUpdate(1, RecipientState.FAILED, "5.1.1", action="failed"),
                ],
            )
            for q in ids
        ]
        yield gatherResults([first, *rest])
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    # One UPDATE for the first write, one executemany for the 20 rows batched behind it.
    assert len(updates) == 2
    for queue_id in ids:
        bob, carol, _ = (yield store.message(queue_id)).recipients
        assert (bob.state, bob.status, carol.state, carol.status, carol.action) == (
            RecipientState.DEFERRED, "4.4.1", RecipientState.FAILED, "5.1.1", "failed"
        )  # fmt: skip
        assert carol.attempts == 1
        if queue_id == "U00":  # None leaves delay_warned and the final address as they were
            assert (bob.attempts, bob.delay_warned, bob.final_recipient) == (1, True, "b@x.test")
        else:
            assert (bob.attempts, bob.delay_warned, bob.final_recipient) == (
                0, False, "Bob@example.net"
            )  # fmt: skip
    assert (yield store.message("U09")).recipients[2].state is RecipientState.DELIVERED


@pytest_twisted.inlineCallbacks
def test_one_bad_arrival_in_a_batch_fails_alone(store, engine):
    yield record(store, envelope("B000"))
    with CommitCounter(engine) as commits:
        good_ids = [f"B{i:03d}" for i in range(1, 10)]
        first = record(store, envelope("B100"))  # commits alone; the rest queue behind it
        rest = [record(store, envelope(q)) for q in good_ids[:5]]
        duplicate = record(store, envelope("B000", envid="intruder@example.org"))
        rest += [record(store, envelope(q)) for q in good_ids[5:]]
        with pytest.raises(IntegrityError):
            yield duplicate
        yield gatherResults([first, *rest])
    assert (yield store.known(["B100", *good_ids])) == frozenset(["B100", *good_ids])
    assert (yield store.message("B000")).envid == "env-1@example.org"
    # One alone, one failed batch, then each of its ten in its own transaction.
    assert commits.count == 1 + 9


@pytest_twisted.inlineCallbacks
def test_known_reports_the_recorded_subset(store):
    yield gatherResults([record(store, envelope(f"K{i}")) for i in range(3)])
    many = [f"missing-{i}" for i in range(2 * CHUNK + 7)] + ["K0", "K2", "K0"]
    assert (yield store.known(many)) == frozenset({"K0", "K2"})
    assert (yield store.known([])) == frozenset()


@pytest_twisted.inlineCallbacks
def test_queued_messages_per_node_by_arrival(store, engine):
    yield record(store, envelope("N3", arrival=ARRIVAL + 30))
    yield record(store, envelope("N1", arrival=ARRIVAL + 10))
    yield record(store, envelope("N2", arrival=ARRIVAL + 20))
    yield record(store, envelope("M1", arrival=ARRIVAL), node_id="node-b")
    assert (yield store.queued_messages("node-a")) == ["N1", "N2", "N3"]
    assert (yield store.queued_messages("node-b")) == ["M1"]
    # A message leaves the queue once no recipient is queued/inflight/deferred.
    set_state(engine, "N2", RecipientState.DELIVERED)
    set_state(engine, "N1", RecipientState.DEFERRED)
    set_state(engine, "N3", RecipientState.INFLIGHT)
    assert (yield store.queued_messages("node-a")) == ["N1", "N3"]
    assert (yield store.queued_messages("node-c")) == []


@pytest_twisted.inlineCallbacks
def test_unfinished_means_a_recipient_in_the_queue_or_a_dsn_owed(store, engine):
    # The set queued_messages and queue_listing return, and expire spares: messages
    # with at least one recipient queued/inflight/deferred or with a DSN still owed.
    yield record(
        store, envelope("U1", envid="env-u1@example.org", arrival=ARRIVAL + 10)
    )  # one recipient queued
    yield record(
        store, envelope("U2", envid="env-u2@example.org", arrival=ARRIVAL + 20)
    )  # all final, one DSN owed
    yield record(store, envelope("U3", envid="env-u3@example.org", arrival=ARRIVAL + 5))  # finished
    yield record(
        store, envelope("U4", envid="env-u4@example.org", arrival=ARRIVAL), node_id="node-b"
    )  # both reasons
    yield record(
        store, envelope("U5", envid="env-u5@example.org", arrival=ARRIVAL), node_id="node-b"
    )  # finished
    for queue_id in ("U1", "U3", "U5"):
        set_state(engine, queue_id, RecipientState.DELIVERED)
    set_recipient(engine, "U1", 1, state=RecipientState.QUEUED.value)
    set_state(engine, "U2", RecipientState.FAILED)
    set_recipient(engine, "U2", 2, dsn_pending=True)
    set_recipient(engine, "U4", 0, state=RecipientState.DEFERRED.value)
    set_recipient(engine, "U4", 1, state=RecipientState.FAILED.value, dsn_pending=True)
    set_recipient(engine, "U4", 2, state=RecipientState.INFLIGHT.value, dsn_pending=True)
    set_recipient(engine, "U5", 0, dsn_passed=True)  # the next hop owes that DSN, not us
    assert (yield store.queued_messages("node-a")) == ["U1", "U2"]
    assert (yield store.queued_messages("node-b")) == ["U4"]  # once, for all its reasons
    listing = yield store.queue_listing("node-a")
    assert [m.queue_id for m in listing] == ["U1", "U2"]
    assert [len(m.recipients) for m in listing] == [3, 3]
    assert [m.queue_id for m in (yield store.queue_listing("node-b"))] == ["U4"]
    assert (yield store.queue_listing("node-c")) == []
    # Expiry purges exactly the finished ones, whichever node they belong to.
    far = ARRIVAL + 10 * MAX_RETENTION
    assert (yield store.expire(far)) == 2
    assert (yield store.known(["U1", "U2", "U3", "U4", "U5"])) == frozenset({"U1", "U2", "U4"})
    # Once its DSN is queued, U2 is finished: out of the queue, and expirable.
    yield store.clear_dsn_pending("U2", [2])
    assert (yield store.queued_messages("node-a")) == ["U1"]
    assert (yield store.expire(far)) == 1
    assert (yield store.known(["U1", "U2", "U4"])) == frozenset({"U1", "U4"})


def query_plan(engine: Engine, statement: str, parameters: object) -> list[str]:
    """SQLite's EXPLAIN QUERY PLAN of a statement, one detail string per step."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
        return [row[3] for row in rows]


@pytest.mark.sqlite
@pytest_twisted.inlineCallbacks
def test_sqlite_unfinished_queries_search_indexes(store, engine):
    # Millions of finished messages are kept for retention: finding this node's few
    # unfinished ones (at every start-up, queue list and flush) or the expired ones
    # must go through indexes, never a scan of messages (without ANALYZE statistics,
    # as mtrkmta never runs it, SQLite plans the same on an empty or a full table).
    yield record(store, envelope("P1"))
    set_recipient(engine, "P1", 0, state=RecipientState.FAILED.value, dsn_pending=True)
    selects: list[tuple[str, object]] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("SELECT messages."):
            selects.append((statement, parameters))

    plans: dict[str, list[str]] = {}
    event.listen(engine, "before_cursor_execute", seen)
    try:
        for name, call in (
            ("queued_messages", lambda: store.queued_messages("node-a")),
            ("queue_listing", lambda: store.queue_listing("node-a")),
            ("expire", lambda: store.expire(ARRIVAL)),
        ):
            selects.clear()
            yield call()
            (statement, parameters), *_ = selects
            plans[name] = query_plan(engine, statement, parameters)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    for name, plan in plans.items():
        assert "SCAN messages" not in plan, (name, plan)
        assert "SCAN recipients" not in plan, (name, plan)
    for name in ("queued_messages", "queue_listing"):
        plan = plans[name]
        assert any(d.startswith("SEARCH messages USING INDEX") for d in plan), plan
        assert any("ix_recipients_state (state=?)" in d for d in plan), plan
        assert any("ix_recipients_dsn_pending" in d for d in plan), plan
    assert any(
        d.startswith("SEARCH messages USING INDEX ix_messages_expires_at") for d in plans["expire"]
    ), plans["expire"]


@pytest_twisted.inlineCallbacks
def test_forget_drops_message_and_recipients(store, engine):
    yield record(store, envelope("F1"))
    yield record(store, envelope("F2"))
    yield store.forget(["F1", "unknown"])
    assert (yield store.message("F1")) is None
    assert recipient_rows(engine, "F1") == 0
    assert (yield store.message("F2")) is not None
    yield store.forget([])
    assert (yield store.known(["F2"])) == frozenset({"F2"})


@pytest_twisted.inlineCallbacks
def test_forget_many(store):
    ids = [f"FM{i:04d}" for i in range(CHUNK + 20)]
    yield gatherResults([record(store, envelope(q)) for q in ids])
    yield store.forget(ids)
    assert (yield store.known(ids)) == frozenset()


@pytest_twisted.inlineCallbacks
def test_expire_never_purges_a_queued_message(store, engine):
    # RFC 3885 §3.1 (MUST): no expiry while the message is still in our queue.
    yield record(store, envelope("E1", timeout=100))
    arrival = 1_700_000_000
    assert (yield store.expire(arrival + 99)) == 0
    assert (yield store.expire(arrival + 10 * MAX_RETENTION)) == 0
    assert (yield lookup(store, "env-1@example.org", CERTIFIER)).queue_id == "E1"
    set_state(engine, "E1", RecipientState.DEFERRED)
    assert (yield store.expire(arrival + 10 * MAX_RETENTION)) == 0
    # Once every recipient is final the expiry applies.
    set_state(engine, "E1", RecipientState.DELIVERED)
    assert (yield store.expire(arrival + 99)) == 0
    assert (yield store.expire(arrival + 100)) == 1
    assert (yield store.message("E1")) is None
    assert recipient_rows(engine, "E1") == 0


@pytest_twisted.inlineCallbacks
def test_expire_only_what_is_due(store, engine):
    yield record(store, envelope("X1", timeout=DAY))
    yield record(store, envelope("X2"))  # default 9 days
    yield record(store, envelope("X3", secret=None, envid=None))  # untracked: default too
    yield record(store, envelope("X4", envid="env-4@example.org", timeout=DAY))  # queued
    for queue_id in ("X1", "X2", "X3"):
        set_state(engine, queue_id, RecipientState.FAILED)
    arrival = 1_700_000_000
    assert (yield store.expire(arrival + 2 * DAY)) == 1
    assert (yield store.known(["X1", "X2", "X3", "X4"])) == frozenset({"X2", "X3", "X4"})
    assert (yield store.expire(arrival + DEFAULT_RETENTION)) == 2
    assert (yield store.known(["X1", "X2", "X3", "X4"])) == frozenset({"X4"})


@pytest_twisted.inlineCallbacks
def test_transactions_of_one_message_are_found_and_kept_together(store, engine):
    # RFC 3885 §3.1: one message may arrive as several transactions (the previous hop
    # split its recipients); an answer covers all of them, and none is purged while
    # another is still queued. The same ENVID with another certifier is another message.
    yield record(store, envelope("T1", timeout=DAY))
    yield record(store, envelope("T2", timeout=DAY, arrival=ARRIVAL + 1))
    yield record(store, envelope("T3", secret=b"another secret", timeout=DAY))
    found = yield store.lookup_transactions("env-1@example.org", CERTIFIER)
    assert [m.queue_id for m in found] == ["T1", "T2"]
    other = yield store.lookup_transactions(
        "env-1@example.org", hashlib.sha1(b"another secret").digest()
    )
    assert [m.queue_id for m in other] == ["T3"]
    assert (yield store.lookup_transactions("env-1@example.org", bytes(20))) == []
    assert (yield store.lookup_transactions("unknown@example.org", CERTIFIER)) == []
    set_state(engine, "T1", RecipientState.DELIVERED)
    set_state(engine, "T3", RecipientState.DELIVERED)  # T2 still queued
    arrival = 1_700_000_000
    assert (yield store.expire(arrival + 2 * DAY)) == 1  # T3 only: T1 waits for T2
    assert (yield store.known(["T1", "T2", "T3"])) == frozenset({"T1", "T2"})
    set_state(engine, "T2", RecipientState.FAILED)
    assert (yield store.expire(arrival + 2 * DAY)) == 2
    assert (yield store.known(["T1", "T2"])) == frozenset()


@pytest_twisted.inlineCallbacks
def test_expire_defaults_to_the_clock(store, engine, clock):
    yield record(store, envelope("C1", timeout=3600))
    set_state(engine, "C1", RecipientState.RELAYED)
    assert (yield store.expire()) == 0
    clock.advance(3600)
    assert (yield store.expire()) == 1


@pytest_twisted.inlineCallbacks
def test_close_finishes_pending_writes_then_refuses_work(store, db_url):
    pending = [record(store, envelope(f"Z{i}")) for i in range(5)]
    reading = store.known(["Z0"])
    closing = store.close()
    again = store.close()
    yield gatherResults(pending)
    assert (yield reading) in (frozenset(), frozenset({"Z0"}))
    yield closing
    yield again
    yield store.close()
    with pytest.raises(StoreClosedError):
        yield record(store, envelope("Z9"))
    with pytest.raises(StoreClosedError):
        yield store.message("Z0")
    check = create_tracking_engine(db_url)
    try:
        m = build_schema().messages
        with check.connect() as conn:
            assert sorted(conn.scalars(select(m.c.queue_id))) == [f"Z{i}" for i in range(5)]
    finally:
        check.dispose()


@pytest_twisted.inlineCallbacks
def test_store_made_from_url_owns_its_engine(db_url, threadpool):
    from twisted.internet import reactor

    store = SQLTrackingStore(
        reactor,
        threadpool,
        db_url,
        default_retention=DEFAULT_RETENTION,
        max_retention=MAX_RETENTION,
    )
    yield record(store, envelope("U1"))
    assert (yield store.known(["U1"])) == frozenset({"U1"})
    yield store.close()


def test_retention_policy_is_checked(engine, threadpool):
    # RFC 3885 §3.1 (MUST): default and cap at least one day.
    from twisted.internet import reactor

    with pytest.raises(ValueError, match="at least one day"):
        SQLTrackingStore(
            reactor, threadpool, engine, default_retention=3600, max_retention=MAX_RETENTION
        )
    with pytest.raises(ValueError, match="at least one day"):
        SQLTrackingStore(
            reactor, threadpool, engine, default_retention=DEFAULT_RETENTION, max_retention=60
        )


@pytest_twisted.ensureDeferred
async def test_lower_retention_applies_to_existing_records(store):
    # RFC 3885 §4.1 (MAY): the cap may be lowered retroactively, never below a day.
    await store.record_arrival(
        envelope("ret1", timeout=20 * DAY), reporting_mta="mx", node_id="n", size=1
    )
    await store.record_arrival(
        envelope("ret2", timeout=DAY), reporting_mta="mx", node_id="n", size=1
    )
    changed = await store.lower_retention(2 * DAY)
    assert changed == 1
    first = await store.message("ret1")
    assert first.expires_at == first.arrival + 2 * DAY
    second = await store.message("ret2")
    assert second.expires_at == second.arrival + DAY  # already shorter: untouched
    with pytest.raises(ValueError):
        await store.lower_retention(DAY - 1)
