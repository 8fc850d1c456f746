"""FileSpool on a real directory and thread pool: durability, batching, recovery, corruption."""

from __future__ import annotations

import os
import stat
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from mtrkmta.envelope import ClientInfo, Envelope, MailParams, Mtrk, Recipient
from mtrkmta.spool.codec import encode_envelope
from mtrkmta.spool.filespool import HEADER_SIZE, MERGE_BELOW, FileSpool, bucket_of
from mtrkmta.spool.interfaces import (
    DuplicateQueueId,
    IIncoming,
    ISpool,
    MessageNotFound,
    SpoolCorruption,
    SpoolError,
)
from mtrkmta.spool.queueid import QueueIdGenerator

CONTENT = b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: hi\r\n\r\nbody\r\n"


class CountingThreadPool(ThreadPool):
    """A ThreadPool that counts the jobs it is given (one per spool batch or read)."""

    def __init__(self) -> None:
        super().__init__(minthreads=1, maxthreads=4, name="spool-test")
        self.jobs = 0

    def callInThreadWithCallback(self, onResult, func, *args, **kw):
        self.jobs += 1
        super().callInThreadWithCallback(onResult, func, *args, **kw)


class FsyncRecorder:
    """Stands in for os.fsync: records what each descriptor was, then really syncs."""

    def __init__(self) -> None:
        self.real = os.fsync
        self.dirs: list[tuple[int, int]] = []  # (st_dev, st_ino) of directories
        self.files = 0

    def __call__(self, fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            self.dirs.append((st.st_dev, st.st_ino))
        else:
            self.files += 1
        self.real(fd)

    def dir_syncs(self, path: Path) -> int:
        st = os.stat(path)
        return self.dirs.count((st.st_dev, st.st_ino))


@pytest.fixture
def pool() -> Iterator[CountingThreadPool]:
    tp = CountingThreadPool()
    tp.start()
    yield tp
    tp.stop()


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> FsyncRecorder:
    recorder = FsyncRecorder()
    monkeypatch.setattr(os, "fsync", recorder)
    return recorder


@pytest.fixture
def reactor() -> object:
    """The global reactor, which pytest-twisted runs."""
    from twisted.internet import reactor as global_reactor

    return global_reactor


@pytest.fixture
def spool(tmp_path: Path, pool: CountingThreadPool, reactor) -> FileSpool:
    return FileSpool(reactor, pool, tmp_path / "spool")


def ids() -> str:
    """A fresh queue id."""
    return QueueIdGenerator()()


def envelope(queue_id: str | None = None) -> Envelope:
    return Envelope(
        queue_id=ids() if queue_id is None else queue_id,
        sender="alice@example.org",
        recipients=(Recipient("bob@example.net"), Recipient("carol@example.net")),
        params=MailParams(size=len(CONTENT), mtrk=Mtrk(b"\x01" * 20, 86400)),
        arrival=1_700_000_000.5,
        client=ClientInfo("192.0.2.7", 40000, "client.example", "ESMTPS"),
    )


def ids_in_bucket(n: int, bucket: str) -> list[str]:
    """``n`` fresh queue ids that all hash to ``bucket``."""
    out: list[str] = []
    while len(out) < n:
        qid = ids()
        if bucket_of(qid) == bucket:
            out.append(qid)
    return out


def test_provides_ispool(spool: FileSpool) -> None:
    assert verifyObject(ISpool, spool)


def test_constructor_touches_nothing(tmp_path: Path, pool: CountingThreadPool, reactor) -> None:
    FileSpool(reactor, pool, tmp_path / "spool")
    assert not (tmp_path / "spool").exists()
    assert pool.jobs == 0


@pytest_twisted.inlineCallbacks
def test_batches_run_in_the_commit_pool_and_the_rest_in_the_other(
    tmp_path: Path, pool: CountingThreadPool, reactor
):
    # The node runs every group commit in one thread of its own (MTAService.commit_pool).
    commits = CountingThreadPool()
    commits.start()
    try:
        spool = FileSpool(reactor, pool, tmp_path / "spool", commit_pool=commits)
        yield spool.recover()
        reads_before = pool.jobs
        env = envelope()
        yield spool.store(env, CONTENT)
        yield spool.remove([env.queue_id])
        assert (commits.jobs, pool.jobs) == (2, reads_before)
        assert (yield spool.queue_ids()) == []
        assert (commits.jobs, pool.jobs) == (2, reads_before + 1)
        yield spool.close()
    finally:
        commits.stop()


@pytest_twisted.inlineCallbacks
def test_recover_creates_private_directories(spool: FileSpool):
    removed = yield spool.recover()
    assert removed == 0
    for d in (spool.root, spool.root / "incoming", spool.root / "queue"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_store_then_load_round_trip(spool: FileSpool, fsyncs: FsyncRecorder):
    yield spool.recover()
    env = envelope()
    yield spool.store(env, CONTENT)
    path = spool.queue_path(env.queue_id)
    assert path.parent.name == bucket_of(env.queue_id)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(spool.root / "incoming") == []
    loaded_env, loaded_content = yield spool.load(env.queue_id)
    assert loaded_env == env
    assert loaded_content == CONTENT
    assert (yield spool.queue_ids()) == [env.queue_id]
    # The file was fsync'd, and so were the new bucket's entry in queue/ and the bucket.
    assert fsyncs.files == 1
    assert fsyncs.dir_syncs(path.parent) == 1
    assert fsyncs.dir_syncs(spool.root / "queue") == 1
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_a_short_write_is_continued(spool: FileSpool, monkeypatch: pytest.MonkeyPatch):
    # The three parts go out in one writev; whatever the kernel does not take is
    # written by the next call.
    real = os.writev
    calls: list[int] = []

    def at_most_seven_bytes(fd: int, buffers: list[memoryview]) -> int:
        data = b"".join(bytes(b) for b in buffers)[:7]
        calls.append(len(buffers))
        return real(fd, [data])

    yield spool.recover()
    env = envelope()
    monkeypatch.setattr(os, "writev", at_most_seven_bytes)
    yield spool.store(env, CONTENT)
    monkeypatch.undo()
    assert calls[0] == 3 and len(calls) > 3
    assert (yield spool.load(env.queue_id)) == (env, CONTENT)
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_directories_removed_while_running_come_back(spool: FileSpool, fsyncs: FsyncRecorder):
    # The spool remembers which directories exist; a failed store makes it look again.
    yield spool.recover()
    first = envelope()
    yield spool.store(first, CONTENT)
    bucket = spool.queue_path(first.queue_id).parent
    yield spool.remove([first.queue_id])
    os.rmdir(bucket)
    second = envelope(ids_in_bucket(1, bucket.name)[0])
    with pytest.raises(FileNotFoundError):
        yield spool.store(second, CONTENT)
    assert not (spool.root / "incoming" / second.queue_id).exists()
    yield spool.store(second, CONTENT)
    assert (yield spool.load(second.queue_id)) == (second, CONTENT)
    assert fsyncs.dir_syncs(spool.root / "queue") == 2  # the new entry, both times
    os.rename(spool.root / "incoming", spool.root / "incoming.gone")
    third = envelope()
    with pytest.raises(FileNotFoundError):
        yield spool.store(third, CONTENT)
    yield spool.store(third, CONTENT)
    assert (yield spool.queue_ids()) == sorted([second.queue_id, third.queue_id])
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_empty_and_large_content(spool: FileSpool):
    yield spool.recover()
    big = os.urandom(3 * 1024 * 1024)
    envs = [envelope(), envelope()]
    yield gatherResults([spool.store(envs[0], b""), spool.store(envs[1], big)])
    assert (yield spool.load(envs[0].queue_id))[1] == b""
    assert (yield spool.load(envs[1].queue_id))[1] == big
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_concurrent_stores_are_group_committed(
    spool: FileSpool, pool: CountingThreadPool, fsyncs: FsyncRecorder
):
    yield spool.recover()
    envs = [envelope(q) for q in ids_in_bucket(40, "a5")]
    jobs_before = pool.jobs
    yield gatherResults([spool.store(e, CONTENT) for e in envs])
    batches = pool.jobs - jobs_before
    # The first store starts a batch at once; the 39 submitted meanwhile share the next.
    assert batches == 2
    assert fsyncs.files == 40
    assert fsyncs.dir_syncs(spool.root / "queue" / "a5") == batches
    assert (yield spool.queue_ids()) == sorted(e.queue_id for e in envs)
    for e in envs:
        assert (yield spool.load(e.queue_id)) == (e, CONTENT)
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_max_batch_bounds_a_batch(tmp_path: Path, pool: CountingThreadPool, reactor):
    spool = FileSpool(reactor, pool, tmp_path / "spool", max_batch=4)
    yield spool.recover()
    envs = [envelope() for _ in range(10)]
    jobs_before = pool.jobs
    yield gatherResults([spool.store(e, CONTENT) for e in envs])
    assert pool.jobs - jobs_before == 4  # 1, then 4, 4, 1
    assert len((yield spool.queue_ids())) == 10
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_fsync_false_never_syncs(tmp_path: Path, pool: CountingThreadPool, reactor, fsyncs):
    spool = FileSpool(reactor, pool, tmp_path / "spool", fsync=False)
    yield spool.recover()
    env = envelope()
    yield spool.store(env, CONTENT)
    yield spool.remove([env.queue_id])
    assert fsyncs.files == 0 and fsyncs.dirs == []
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_recover_removes_crash_leftovers(spool: FileSpool):
    yield spool.recover()
    committed = envelope()
    yield spool.store(committed, CONTENT)
    incoming = spool.root / "incoming"
    # A crash mid-write leaves partial files; one between fsync and rename leaves a
    # complete one. Neither was acknowledged, so neither may ever be delivered.
    partial = ids()
    (incoming / partial).write_bytes(b"MTQF\x00\x01\x00\x00")
    whole = envelope()
    yield spool.store(whole, CONTENT)
    os.rename(spool.queue_path(whole.queue_id), incoming / whole.queue_id)
    (incoming / "junkdir").mkdir()
    (incoming / "junkdir" / "x").write_bytes(b"x")
    assert (yield spool.queue_ids()) == [committed.queue_id]

    removed = yield spool.recover()
    assert removed == 3
    assert os.listdir(incoming) == []
    assert (yield spool.queue_ids()) == [committed.queue_id]
    assert (yield spool.recover()) == 0
    with pytest.raises(MessageNotFound):
        yield spool.load(whole.queue_id)
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_recover_syncs_incoming_after_removing(spool: FileSpool, fsyncs: FsyncRecorder):
    yield spool.recover()
    (spool.root / "incoming" / ids()).write_bytes(b"partial")
    assert (yield spool.recover()) == 1
    assert fsyncs.dir_syncs(spool.root / "incoming") == 1
    yield spool.close()


@pytest.mark.parametrize(
    "damage",
    [
        "empty",
        "half_header",
        "header_only",
        "half_envelope",
        "one_short",
        "flipped",
        "extra",
        "zeroed",
        "directory",
    ],
)
@pytest_twisted.inlineCallbacks
def test_damaged_queue_file_raises_spool_corruption(spool: FileSpool, damage: str):
    yield spool.recover()
    env = envelope()
    yield spool.store(env, CONTENT)
    path = spool.queue_path(env.queue_id)
    data = path.read_bytes()
    damaged = {
        "empty": b"",
        "half_header": data[: HEADER_SIZE // 2],
        "header_only": data[:HEADER_SIZE],
        "half_envelope": data[: HEADER_SIZE + 10],
        "one_short": data[:-1],
        "flipped": data[:-3] + bytes([data[-3] ^ 0x20]) + data[-2:],
        "extra": data + b"\r\n",
        "zeroed": bytes(len(data)),
        "directory": None,  # a directory where the file was
    }[damage]
    if damaged is None:
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(damaged)
    with pytest.raises(SpoolCorruption):
        yield spool.load(env.queue_id)
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_file_under_another_id_is_corruption(spool: FileSpool):
    yield spool.recover()
    a, b = envelope(), envelope()
    yield spool.store(a, CONTENT)
    target = spool.queue_path(b.queue_id)
    target.parent.mkdir(exist_ok=True)
    os.rename(spool.queue_path(a.queue_id), target)
    with pytest.raises(SpoolCorruption):
        yield spool.load(b.queue_id)
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_remove_unlinks_without_syncing_directories(spool: FileSpool, fsyncs: FsyncRecorder):
    # A removal lost in a crash only brings back a message start-up sorts out by its
    # tracking record (tests/integration/test_node_lifecycle.py): no fsync is owed.
    yield spool.recover()
    envs = [envelope(q) for q in ids_in_bucket(6, "3c")]
    keep = envelope()
    yield gatherResults([spool.store(e, CONTENT) for e in [*envs, keep]])
    before = (fsyncs.files, list(fsyncs.dirs))
    yield spool.remove([e.queue_id for e in envs] + [ids()])  # an unknown id is ignored
    assert (fsyncs.files, fsyncs.dirs) == before
    assert (yield spool.queue_ids()) == [keep.queue_id]
    for e in envs:
        assert not spool.queue_path(e.queue_id).exists()
        with pytest.raises(MessageNotFound):
            yield spool.load(e.queue_id)
    yield spool.remove([e.queue_id for e in envs])  # idempotent
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_duplicate_queue_id_is_refused(spool: FileSpool):
    yield spool.recover()
    env = envelope()
    yield spool.store(env, CONTENT)
    with pytest.raises(DuplicateQueueId):
        yield spool.store(env, b"other")
    first, second = spool.store(envelope("dup1"), CONTENT), spool.store(envelope("dup1"), b"x")
    yield first
    with pytest.raises(DuplicateQueueId):
        yield second
    assert (yield spool.load(env.queue_id))[1] == CONTENT
    assert (yield spool.load("dup1"))[1] == CONTENT
    assert os.listdir(spool.root / "incoming") == []
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_failed_directory_fsync_fails_the_store(spool: FileSpool, monkeypatch: pytest.MonkeyPatch):
    yield spool.recover()
    real = os.fsync

    def failing_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    env = envelope()
    with pytest.raises(OSError):
        yield spool.store(env, CONTENT)
    monkeypatch.setattr(os, "fsync", real)
    assert (yield spool.queue_ids()) == []
    assert os.listdir(spool.root / "incoming") == []
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_failed_write_fails_only_that_message(spool: FileSpool, monkeypatch: pytest.MonkeyPatch):
    yield spool.recover()
    real = os.writev
    bad = b"\r\nPOISON\r\n"

    def writev(fd: int, buffers: list[memoryview]) -> int:
        if any(bytes(buffer) == bad for buffer in buffers):
            raise OSError(28, "No space left on device")
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)
    good, poisoned = envelope(), envelope()
    d_good, d_bad = spool.store(good, CONTENT), spool.store(poisoned, bad)
    yield d_good
    with pytest.raises(OSError):
        yield d_bad
    assert (yield spool.queue_ids()) == [good.queue_id]
    assert os.listdir(spool.root / "incoming") == []
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_invalid_arguments_fail_without_touching_disk(spool: FileSpool, pool):
    for bad_id in ["", "../x", "a/b", ".hidden", "x" * 65, "é"]:
        with pytest.raises(ValueError):
            yield spool.store(envelope(bad_id), CONTENT)
        with pytest.raises(ValueError):
            yield spool.load(bad_id)
        with pytest.raises(ValueError):
            yield spool.remove([bad_id])
    with pytest.raises(TypeError):
        yield spool.store(envelope(), "text")  # type: ignore[arg-type]
    assert pool.jobs == 0
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_queue_ids_ignores_foreign_files(spool: FileSpool):
    yield spool.recover()
    env = envelope()
    yield spool.store(env, CONTENT)
    (spool.root / "queue" / "README").write_text("x")
    (spool.queue_path(env.queue_id).parent / ".tmp").write_text("x")
    misplaced = ids()
    wrong_bucket = "00" if bucket_of(misplaced) != "00" else "01"
    (spool.root / "queue" / wrong_bucket).mkdir(exist_ok=True)
    (spool.root / "queue" / wrong_bucket / misplaced).write_text("x")
    assert (yield spool.queue_ids()) == [env.queue_id]
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_free_space(spool: FileSpool):
    yield spool.recover()
    st = os.statvfs(spool.root)
    free = yield spool.free_space()
    assert isinstance(free, int)
    assert abs(free - st.f_bavail * st.f_frsize) < 64 * 1024 * 1024
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_close_waits_for_batches_then_refuses_work(spool: FileSpool):
    yield spool.recover()
    envs = [envelope() for _ in range(5)]
    stores = [spool.store(e, CONTENT) for e in envs]
    closing = spool.close()
    stored: list[bool] = []
    gatherResults(stores).addCallback(lambda _: stored.append(True))
    yield closing
    assert stored == [True]
    assert all(spool.queue_path(e.queue_id).exists() for e in envs)
    for call in (
        lambda: spool.store(envelope(), CONTENT),
        lambda: spool.load(envs[0].queue_id),
        lambda: spool.remove([envs[0].queue_id]),
        spool.queue_ids,
        spool.recover,
        spool.free_space,
    ):
        d: Deferred[object] = call()
        with pytest.raises(SpoolError):
            yield d
    yield spool.close()


@pytest_twisted.inlineCallbacks
def test_close_waits_for_reads_in_flight(spool: FileSpool):
    yield spool.recover()
    env = envelope()
    yield spool.store(env, CONTENT)
    loading = spool.load(env.queue_id)
    closing = spool.close()
    assert not closing.called  # the read is still running in the thread pool
    yield closing
    assert loading.called
    assert (yield loading) == (env, CONTENT)


# -- streaming a message in (IIncoming) ---------------------------------------------------


@pytest.fixture
def small_spool(tmp_path: Path, pool: CountingThreadPool, reactor) -> FileSpool:
    """A spool that keeps at most 4 KiB of an incoming message in memory."""
    return FileSpool(reactor, pool, tmp_path / "spool", memory_limit=4096)


def test_incoming_provides_iincoming(small_spool: FileSpool) -> None:
    assert verifyObject(IIncoming, small_spool.incoming(ids()))


@pytest_twisted.inlineCallbacks
def test_small_message_stays_in_memory_and_commits_in_one_write(small_spool: FileSpool):
    yield small_spool.recover()
    env = envelope()
    incoming = small_spool.incoming(env.queue_id)
    assert incoming.write(CONTENT[:10]) is None
    assert incoming.write(CONTENT[10:]) is None
    assert os.listdir(small_spool.root / "incoming") == []  # nothing on disk yet
    held = yield incoming.commit(env)
    assert held == CONTENT  # the queue's first run need not read the file back
    assert (yield small_spool.load(env.queue_id)) == (env, CONTENT)
    yield small_spool.close()


@pytest_twisted.inlineCallbacks
def test_a_message_written_a_line_at_a_time_is_held_in_few_pieces(small_spool: FileSpool):
    yield small_spool.recover()
    env = envelope()
    incoming = small_spool.incoming(env.queue_id)
    lines = [b"line %03d of a message sent slowly\r\n" % n for n in range(100)]
    for line in lines:
        assert incoming.write(line) is None
    content = b"".join(lines)  # 3,600 octets: under the 4 KiB kept in memory
    assert len(incoming._held) <= len(content) // MERGE_BELOW + 1
    incoming.write(b"x" * 2000)  # past the limit: all of it goes to incoming/
    assert (yield incoming.commit(env)) is None  # streamed: nothing held to hand over
    assert (yield small_spool.load(env.queue_id)) == (env, content + b"x" * 2000)
    yield small_spool.close()


@pytest_twisted.inlineCallbacks
def test_large_message_streams_to_disk_with_bounded_memory(small_spool: FileSpool):
    # A 2 MB message arrives in 1,000 pieces: past 4 KiB it goes to incoming/ as it
    # comes, and the writer is asked to wait whenever more than 4 KiB are held.
    yield small_spool.recover()
    env = envelope()
    incoming = small_spool.incoming(env.queue_id)
    piece = b"x" * 2046 + b"\r\n"
    waits = 0
    for _ in range(1000):
        wait = incoming.write(piece)
        assert incoming._held_size <= 4096 + len(piece)
        if wait is not None:
            waits += 1
            yield wait
    assert waits > 0
    assert os.listdir(small_spool.root / "incoming") == [env.queue_id]
    held = yield incoming.commit(env)
    assert held is None
    assert os.listdir(small_spool.root / "incoming") == []
    loaded = yield small_spool.load(env.queue_id)
    assert loaded == (env, piece * 1000)
    yield small_spool.close()


@pytest_twisted.inlineCallbacks
def test_discarded_stream_leaves_nothing(small_spool: FileSpool):
    yield small_spool.recover()
    queue_id = ids()
    incoming = small_spool.incoming(queue_id)
    for _ in range(10):
        wait = incoming.write(b"y" * 1000)
        if wait is not None:
            yield wait
    incoming.discard()
    yield small_spool.close()  # waits for the unlink too
    assert os.listdir(small_spool.root / "incoming") == []
    assert (
        yield FileSpool(small_spool._reactor, small_spool._threadpool, small_spool.root).queue_ids()
    ) == []


@pytest_twisted.inlineCallbacks
def test_failed_stream_write_fails_the_commit(small_spool: FileSpool, monkeypatch):
    yield small_spool.recover()
    env = envelope()
    incoming = small_spool.incoming(env.queue_id)
    real = os.writev

    def writev(fd: int, buffers: list[memoryview]) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", writev)
    for _ in range(10):
        wait = incoming.write(b"z" * 1000)
        if wait is not None:
            yield wait
    monkeypatch.setattr(os, "writev", real)
    with pytest.raises(OSError):
        yield incoming.commit(env)
    assert (yield small_spool.queue_ids()) == []
    assert os.listdir(small_spool.root / "incoming") == []
    yield small_spool.close()


@pytest_twisted.inlineCallbacks
def test_version_1_files_are_still_read(spool: FileSpool):
    # Files written before content came first (envelope, then content) still load.
    yield spool.recover()
    env = envelope()
    envelope_data = encode_envelope(env)
    prefix = struct.pack(">4sHIQ", b"MTQF", 1, len(envelope_data), len(CONTENT))
    crc = zlib.crc32(CONTENT, zlib.crc32(envelope_data, zlib.crc32(prefix)))
    path = spool.queue_path(env.queue_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(prefix + struct.pack(">I", crc) + envelope_data + CONTENT)
    assert (yield spool.load(env.queue_id)) == (env, CONTENT)
    yield spool.close()
