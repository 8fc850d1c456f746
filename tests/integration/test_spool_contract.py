"""The ISpool contract, run against FileSpool (a real directory and thread pool) and
MemorySpool (the one the clock-driven queue tests use): both must answer alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from mtrkmta.envelope import Envelope, Recipient
from mtrkmta.spool.filespool import FileSpool
from mtrkmta.spool.interfaces import (
    DuplicateQueueId,
    ISpool,
    MessageNotFound,
    SpoolCorruption,
    SpoolError,
)
from mtrkmta.spool.memory import MemorySpool

CONTENT = b"Subject: contract\r\n\r\nbody\r\n"


@dataclass
class Subject:
    spool: ISpool
    damage: Callable[[str], None]  # make a stored message unreadable
    repair: Callable[[str, bytes], None]  # put the whole message back (file: these bytes)
    raw: Callable[[str], bytes]  # the stored form of a message, for repair
    block: Callable[[], None]  # make storing any new message impossible


def envelope(queue_id: str) -> Envelope:
    return Envelope(queue_id=queue_id, sender="s@x.example", recipients=(Recipient("r@y.test"),))


@pytest_twisted.async_yield_fixture(params=["file", "memory"])
async def subject(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Subject]:
    if request.param == "memory":
        memory = MemorySpool()
        yield Subject(
            memory,
            damage=memory.damage,
            repair=lambda queue_id, _: memory.repair(queue_id),
            raw=lambda _: b"",
            block=lambda: setattr(memory, "unwritable", "incoming: not a directory"),
        )
        await memory.close()
        return
    pool = ThreadPool(minthreads=1, maxthreads=2, name="spool-contract")
    pool.start()
    spool = FileSpool(reactor, pool, tmp_path / "spool", fsync=False)
    await spool.recover()

    def where(queue_id: str) -> Path:
        path = spool.queue_path(queue_id)
        return path if path.exists() else tmp_path / "spool" / "quarantine" / queue_id

    def damage(queue_id: str) -> None:
        path = where(queue_id)
        path.write_bytes(bytes(path.stat().st_size))

    def block() -> None:  # as root too, where a mode would not stop a write
        incoming = tmp_path / "spool" / "incoming"
        incoming.rmdir()
        incoming.write_bytes(b"")

    try:
        yield Subject(
            spool,
            damage=damage,
            repair=lambda queue_id, data: where(queue_id).write_bytes(data),
            raw=lambda queue_id: where(queue_id).read_bytes(),
            block=block,
        )
        await spool.close()
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_provides_ispool(subject):
    assert verifyObject(ISpool, subject.spool)


@pytest_twisted.ensureDeferred
async def test_store_then_load_gives_the_message_back(subject):
    spool = subject.spool
    await spool.store(envelope("c0002"), CONTENT)
    await spool.store(envelope("c0001"), CONTENT + b"more\r\n")
    assert await spool.load("c0002") == (envelope("c0002"), CONTENT)
    assert await spool.queue_ids() == ["c0001", "c0002"]
    with pytest.raises(DuplicateQueueId):
        await spool.store(envelope("c0001"), CONTENT)
    with pytest.raises(MessageNotFound):
        await spool.load("c0404")
    with pytest.raises(ValueError):
        await spool.load("../etc/passwd")


@pytest_twisted.ensureDeferred
async def test_incoming_streams_then_commits_like_store(subject):
    spool = subject.spool
    incoming = spool.incoming("c0003")
    for part in (b"Subject: a\r\n", b"\r\n", b"body\r\n"):
        assert incoming.write(part) is None  # small: no need to wait
    assert incoming.size == len(b"Subject: a\r\n\r\nbody\r\n")
    assert await incoming.commit(envelope("c0003")) == b"Subject: a\r\n\r\nbody\r\n"
    assert await spool.load("c0003") == (envelope("c0003"), b"Subject: a\r\n\r\nbody\r\n")
    gone = spool.incoming("c0004")
    gone.write(b"partial")
    gone.discard()
    assert await spool.queue_ids() == ["c0003"]


@pytest_twisted.ensureDeferred
async def test_remove_ignores_what_is_gone(subject):
    spool = subject.spool
    await spool.store(envelope("c0005"), CONTENT)
    await spool.remove(["c0005", "c0404"])
    assert await spool.queue_ids() == []


@pytest_twisted.ensureDeferred
async def test_a_damaged_message_is_never_returned_and_goes_to_quarantine(subject):
    spool = subject.spool
    await spool.store(envelope("c0006"), CONTENT)
    whole = subject.raw("c0006")
    subject.damage("c0006")
    with pytest.raises(SpoolCorruption):
        await spool.load("c0006")
    await spool.quarantine(["c0006", "c0404"])
    assert await spool.queue_ids() == []
    assert [q.queue_id for q in await spool.quarantined()] == ["c0006"]
    with pytest.raises(SpoolCorruption):  # still damaged: it stays in quarantine
        await spool.unquarantine("c0006")
    assert [q.queue_id for q in await spool.quarantined()] == ["c0006"]
    subject.repair("c0006", whole)
    assert await spool.unquarantine("c0006") == (envelope("c0006"), CONTENT)
    assert await spool.queue_ids() == ["c0006"]
    assert await spool.quarantined() == []
    with pytest.raises(MessageNotFound):
        await spool.unquarantine("c0006")


@pytest_twisted.ensureDeferred
async def test_a_quarantined_message_can_be_dropped(subject):
    spool = subject.spool
    await spool.store(envelope("c0007"), CONTENT)
    await spool.quarantine(["c0007"])
    assert await spool.drop_quarantined("c0007") is True
    assert await spool.drop_quarantined("c0007") is False
    assert await spool.quarantined() == []


@pytest_twisted.ensureDeferred
async def test_recover_and_free_space(subject):
    spool = subject.spool
    assert await spool.recover() == 0
    assert await spool.free_space() > 0


@pytest_twisted.ensureDeferred
async def test_a_closed_spool_refuses_work(subject):
    spool = subject.spool
    await spool.close()
    with pytest.raises(SpoolError):
        await spool.store(envelope("c0008"), CONTENT)
    with pytest.raises(SpoolError):
        await spool.remove(["c0008"])


@pytest_twisted.ensureDeferred
async def test_probe_leaves_nothing_and_fails_when_nothing_could_be_stored(subject):
    spool = subject.spool
    assert await spool.probe() is None
    assert await spool.queue_ids() == []
    assert await spool.recover() == 0  # the probe file is gone again
    subject.block()
    with pytest.raises((SpoolError, OSError)):
        await spool.probe()
    await spool.close()
    with pytest.raises(SpoolError):
        await spool.probe()
