"""ISpool on a local directory: write to incoming/, fsync, rename into queue/, fsync the directory.

Layout under ``root`` (directories mode 0700, files mode 0600)::

    incoming/<queue_id>              being written; never read, removed by recover()
    queue/<bucket>/<queue_id>        committed; bucket = 2 hex digits of blake2s(queue_id)
    quarantine/<queue_id>            moved out of the queue: damaged, or without a record

Each message is one file: a fixed 22-byte header, the content, the encoded envelope::

    offset  size  field
         0     4  magic b"MTQF"
         4     2  format version, big-endian (2)
         6     4  envelope length E, big-endian
        10     8  content length C, big-endian
        18     4  CRC-32 of the content, then the envelope, then bytes 0..17
        22     C  content, exactly as received
      22+C     E  envelope (mtrkmta.spool.codec, JSON)

The content comes first so that a large message streams into incoming/ as it
arrives (IIncoming): the envelope is appended and the header written last, when
the message ends. Version 1 files (envelope before content, CRC over bytes 0..17,
the envelope, the content) are still read.

A file is only ever renamed into queue/ after it has been written completely and
fsync'd, so a crash can leave a partial file only in incoming/, and the file size,
lengths and CRC make any damage to a queue file a SpoolCorruption on load.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mtrkmta.envelope import Envelope
from mtrkmta.faults import IFaults, NoFaults
from mtrkmta.groupcommit import GroupCommit
from mtrkmta.spool.codec import CodecError, decode_envelope, encode_envelope
from mtrkmta.spool.interfaces import (
    DuplicateQueueId,
    IIncoming,
    ISpool,
    MessageNotFound,
    QuarantinedFile,
    SpoolCorruption,
    SpoolError,
)

MAGIC = b"MTQF"
FORMAT_VERSION = 2
_ENVELOPE_FIRST = 1  # the version-1 layout, still read
_PREFIX = struct.Struct(">4sHIQ")  # magic, version, envelope length, content length
_CRC = struct.Struct(">I")
HEADER_SIZE = _PREFIX.size + _CRC.size
_QUEUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_FILE_MODE = 0o600
_DIR_MODE = 0o700
DEFAULT_MEMORY_LIMIT = 256 * 1024

R = TypeVar("R")


def sync_directory(path: Path) -> None:
    """Make the entries of directory ``path`` (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bucket_of(queue_id: str) -> str:
    """The queue/ subdirectory of ``queue_id``: two hex digits, spread evenly over 256."""
    return hashlib.blake2s(queue_id.encode("ascii"), digest_size=1).hexdigest()


def check_queue_id(queue_id: str) -> str:
    """Return ``queue_id`` if it is safe as a file name here, else raise ValueError."""
    if not isinstance(queue_id, str) or _QUEUE_ID.fullmatch(queue_id) is None:
        raise ValueError(f"invalid queue id: {queue_id!r}")
    return queue_id


def message_header(envelope_data: bytes, content_length: int, content_crc: int) -> bytes:
    """The 22-byte header of a message file, given the CRC-32 of its content."""
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(envelope_data), content_length)
    crc = zlib.crc32(prefix, zlib.crc32(envelope_data, content_crc))
    return prefix + _CRC.pack(crc)


def encode_message(envelope: Envelope, content: bytes) -> tuple[bytes, bytes]:
    """The header and encoded envelope of a message file: header, content, envelope."""
    envelope_data = encode_envelope(envelope)
    return message_header(envelope_data, len(content), zlib.crc32(content)), envelope_data


def read_message(f: BinaryIO, size: int, queue_id: str) -> tuple[Envelope, bytes]:
    """Parse a whole message file of ``size`` bytes; raise SpoolCorruption on any defect."""
    header = f.read(HEADER_SIZE)
    if len(header) != HEADER_SIZE:
        raise SpoolCorruption(f"{queue_id}: truncated header ({len(header)} bytes)")
    magic, version, envelope_len, content_len = _PREFIX.unpack_from(header)
    (crc,) = _CRC.unpack_from(header, _PREFIX.size)
    if magic != MAGIC:
        raise SpoolCorruption(f"{queue_id}: bad magic {magic!r}")
    if version not in (FORMAT_VERSION, _ENVELOPE_FIRST):
        raise SpoolCorruption(f"{queue_id}: unsupported format version {version}")
    expected = HEADER_SIZE + envelope_len + content_len
    if size != expected:
        raise SpoolCorruption(f"{queue_id}: file has {size} bytes, header says {expected}")
    if version == _ENVELOPE_FIRST:
        envelope_data = f.read(envelope_len)
        content = f.read(content_len)
        prefix = header[: _PREFIX.size]
        actual = zlib.crc32(content, zlib.crc32(envelope_data, zlib.crc32(prefix)))
    else:
        content = f.read(content_len)
        envelope_data = f.read(envelope_len)
        actual = zlib.crc32(header[: _PREFIX.size], zlib.crc32(envelope_data, zlib.crc32(content)))
    if len(envelope_data) != envelope_len or len(content) != content_len or f.read(1):
        raise SpoolCorruption(f"{queue_id}: file changed size while being read")
    if actual != crc:
        raise SpoolCorruption(f"{queue_id}: checksum mismatch")
    try:
        envelope = decode_envelope(envelope_data)
    except CodecError as e:
        raise SpoolCorruption(f"{queue_id}: bad envelope: {e}") from e
    if envelope.queue_id != queue_id:
        raise SpoolCorruption(f"{queue_id}: file holds queue id {envelope.queue_id!r}")
    return envelope, content


@dataclass(frozen=True, slots=True)
class _Pending:
    """One message on its way into the queue: its whole content in memory, or already
    streamed into incoming/ (``content`` None, ``fd`` open on that file)."""

    queue_id: str
    header: bytes
    envelope_data: bytes
    content: bytes | None
    fd: int = -1
    content_length: int = 0


# Small pieces of an incoming message are held merged up to this size: a message that
# arrives a line at a time (20,000 slow sessions, bench/ (f)) is then a few objects
# instead of one per line (each about 50 octets over its content). A byte is copied at
# most MERGE_BELOW / (line length) times; large pieces are held as they come.
MERGE_BELOW = 1024


@implementer(IIncoming)
class _Incoming:
    """IIncoming of FileSpool: content is held in memory up to ``memory_limit`` octets;
    past that it goes to incoming/<queue_id> (after a header placeholder), one write
    at a time in the io thread pool, and the writer is asked to wait while more than
    ``memory_limit`` octets are held. Commit appends the envelope and writes the real
    header in the commit batch, which fsyncs and renames as for ``store``."""

    # One per session receiving content (20,000 in bench/ (f)): no instance dictionary.
    __slots__ = (
        "_closed",
        "_crc",
        "_error",
        "_fd",
        "_held",
        "_held_size",
        "_limit",
        "_spool",
        "_waiter",
        "_writing",
        "queue_id",
        "size",
    )

    def __init__(self, spool: FileSpool, queue_id: str, memory_limit: int) -> None:
        self.queue_id = queue_id
        self.size = 0
        self._spool = spool
        self._limit = memory_limit
        self._held: list[bytes] = []
        self._held_size = 0
        self._fd: int | None = None  # the incoming/ file, once content went to disk
        self._crc = 0  # CRC-32 of the content written to the file so far
        self._writing: Deferred[tuple[int, int]] | None = None  # the write in flight
        self._waiter: Deferred[None] | None = None  # handed to a writer asked to wait
        self._error: Failure | None = None
        self._closed = False  # committed or discarded

    def write(self, data: bytes) -> Deferred[None] | None:
        if self._closed:
            raise SpoolError(f"{self.queue_id}: content written after commit or discard")
        if self._error is not None or not data:
            return None
        held = self._held
        if held and len(held[-1]) + len(data) <= MERGE_BELOW:
            held[-1] += data  # a slow client's lines: a few objects, not one per line
        else:
            held.append(data)
        self._held_size += len(data)
        self.size += len(data)
        if self._fd is None and self._writing is None and self.size <= self._limit:
            return None
        self._pump()
        if self._held_size <= self._limit:
            return None
        if self._waiter is None:
            self._waiter = Deferred()
        return self._waiter

    def commit(self, envelope: Envelope) -> Deferred[bytes | None]:
        if self._closed:
            return fail(SpoolError(f"{self.queue_id}: already committed or discarded"))
        if envelope.queue_id != self.queue_id:
            return fail(ValueError(f"envelope of {envelope.queue_id} for {self.queue_id}"))
        self._closed = True
        return self._drained().addCallback(lambda _: self._submit(envelope))

    def discard(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._held, self._held_size = [], 0
        # Counted as work in flight, so that the spool's close() waits for the unlink.
        self._spool._counted(self._drained().addBoth(lambda _: self._remove_file()))

    # -- internals --------------------------------------------------------------

    def _pump(self) -> None:
        """Start writing what is held, unless a write is already in flight."""
        if self._writing is not None or not self._held or self._error is not None:
            return
        chunk = b"".join(self._held)
        self._held, self._held_size = [], 0
        self._writing = self._spool._append(self.queue_id, self._fd, chunk, self._crc)
        self._writing.addCallbacks(self._written, self._write_failed)

    def _written(self, result: tuple[int, int]) -> None:
        self._fd, self._crc = result
        self._writing = None
        self._pump()
        self._wake()

    def _write_failed(self, failure: Failure) -> None:
        self._writing = None
        self._error = failure
        self._held, self._held_size = [], 0
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and (self._held_size <= self._limit or self._error):
            waiter, self._waiter = self._waiter, None
            waiter.callback(None)

    def _drained(self) -> Deferred[None]:
        """Fires once nothing is in flight (and, unless discarding, everything written)."""
        if self._writing is None and (not self._held or self._fd is None or self._error):
            return succeed(None)
        if self._writing is None:
            self._pump()
        assert self._writing is not None
        d: Deferred[None] = Deferred()
        self._writing.addBoth(lambda _: self._drained().chainDeferred(d))
        return d

    def _submit(self, envelope: Envelope) -> Deferred[bytes | None]:
        if self._error is not None:
            self._remove_file()
            return fail(self._error)
        try:
            envelope_data = encode_envelope(envelope)
        except (ValueError, TypeError) as e:
            self._remove_file()
            return fail(e)
        if self._fd is None:
            content = b"".join(self._held)
            self._held = []
            d = self._spool._commit(
                _Pending(
                    self.queue_id,
                    message_header(envelope_data, len(content), zlib.crc32(content)),
                    envelope_data,
                    content,
                )
            )
            return d.addCallback(lambda _: content)
        fd, self._fd = self._fd, None
        pending = _Pending(
            self.queue_id,
            message_header(envelope_data, self.size, self._crc),
            envelope_data,
            None,
            fd,
            self.size,
        )
        return self._spool._commit(pending).addCallback(lambda _: None)

    def _remove_file(self) -> Deferred[None] | None:
        fd, self._fd = self._fd, None
        return None if fd is None else self._spool._drop_incoming(self.queue_id, fd)


@implementer(ISpool)
class FileSpool:
    """The durable spool in one directory, every filesystem call in ``threadpool``.

    Stores are group-committed: all messages submitted while a batch runs form the
    next batch (at most ``max_batch``), which writes and fsyncs each file, renames
    each into queue/, then fsyncs each queue directory it touched once. Removals
    are batched the same way. ``fsync=False`` skips every fsync and is for tests
    only: it gives up all crash safety.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        root: Path,
        *,
        fsync: bool = True,
        max_batch: int = 256,
        commit_pool: ThreadPool | None = None,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        faults: IFaults = NoFaults(),
    ) -> None:
        """Remember where the spool lives; touches no file until first used.

        Batches of stores and removals run in ``commit_pool`` (default: ``threadpool``).
        An incoming message keeps at most ``memory_limit`` octets of content in memory.
        """
        self._memory_limit = memory_limit
        self._faults = faults  # told each named step (mtrkmta.faults.POINTS)
        self._reactor = reactor
        self._threadpool = threadpool
        self._root = Path(root)
        self._incoming = self._root / "incoming"
        self._queue = self._root / "queue"
        self._fsync = fsync
        commits = threadpool if commit_pool is None else commit_pool
        self._stores: GroupCommit[_Pending, None] = GroupCommit(
            reactor, commits, self._store_batch, max_batch
        )
        self._removals: GroupCommit[tuple[str, ...], None] = GroupCommit(
            reactor, commits, self._remove_batch, max_batch
        )
        self._closed = False
        # What the store batches know exists, so that they need not ask each time;
        # forgotten after any failed store, so that a removed directory comes back.
        self._dirs_ready = False
        self._buckets: set[Path] = set()
        self._running = 0
        self._idle_waiters: list[Deferred[None]] = []

    @property
    def root(self) -> Path:
        """The spool directory."""
        return self._root

    def queue_path(self, queue_id: str) -> Path:
        """Where the committed message ``queue_id`` lives (no filesystem access)."""
        return self._queue / bucket_of(check_queue_id(queue_id)) / queue_id

    # ISpool

    def store(self, envelope: Envelope, content: bytes) -> Deferred[None]:
        """Durably store one message; fires only after file and directory are fsync'd."""
        if self._closed:
            return fail(SpoolError("spool is closed"))
        try:
            check_queue_id(envelope.queue_id)
            if not isinstance(content, bytes):
                raise TypeError(f"content must be bytes, not {type(content).__name__}")
            header, envelope_data = encode_message(envelope, content)
        except (ValueError, TypeError) as e:
            return fail(e)
        return self._commit(_Pending(envelope.queue_id, header, envelope_data, content))

    def incoming(self, queue_id: str) -> _Incoming:
        """Receive a message's content as a stream; see IIncoming and ``memory_limit``."""
        if self._closed:
            raise SpoolError("spool is closed")
        return _Incoming(self, check_queue_id(queue_id), self._memory_limit)

    def load(self, queue_id: str) -> Deferred[tuple[Envelope, bytes]]:
        """Read a committed message; MessageNotFound or SpoolCorruption on failure."""
        try:
            path = self.queue_path(queue_id)
        except ValueError as e:
            return fail(e)
        return self._run(self._load, path, queue_id)

    def remove(self, queue_ids: Iterable[str]) -> Deferred[None]:
        """Unlink committed messages, in batches, without fsync'ing their directories.

        A removal lost in a crash only brings a file back, and start-up sorts out
        such files by their tracking records (``MTAService._reconcile``): a finished
        message is removed again and one without a record is quarantined. Nothing is
        delivered twice, so the directory fsync, which costs a journal commit per
        batch, buys nothing here. (Postfix fsyncs its queue files and never a directory.)
        """
        if self._closed:
            return fail(SpoolError("spool is closed"))
        try:
            ids = tuple(check_queue_id(q) for q in queue_ids)
        except ValueError as e:
            return fail(e)
        if not ids:
            return succeed(None)
        return self._removals.submit(ids)

    def quarantine(self, queue_ids: Iterable[str]) -> Deferred[Path]:
        """Move committed messages out of the queue into ``quarantine/``; fire with that dir.

        For files the tracking store does not know: normally never acknowledged
        (a crash between the spool commit and the tracking commit), but kept for
        the administrator rather than deleted, in case the database is the wrong one.
        """
        if self._closed:
            return fail(SpoolError("spool is closed"))
        try:
            ids = tuple(check_queue_id(q) for q in queue_ids)
        except ValueError as e:
            return fail(e)
        return self._run(self._quarantine, ids)

    def quarantined(self) -> Deferred[list[QuarantinedFile]]:
        """What is in ``quarantine/``, sorted by queue id."""
        return self._run(self._list_quarantine)

    def unquarantine(self, queue_id: str) -> Deferred[tuple[Envelope, bytes]]:
        """Move a quarantined message back into the queue, if it reads whole now; fire
        with it. SpoolCorruption (it stays in quarantine) or MessageNotFound otherwise."""
        if self._closed:
            return fail(SpoolError("spool is closed"))
        try:
            path = self.queue_path(queue_id)
        except ValueError as e:
            return fail(e)
        return self._run(self._unquarantine, path, queue_id)

    def drop_quarantined(self, queue_id: str) -> Deferred[bool]:
        """Delete a quarantined file (or directory); fire with False when there is none."""
        if self._closed:
            return fail(SpoolError("spool is closed"))
        try:
            check_queue_id(queue_id)
        except ValueError as e:
            return fail(e)
        return self._run(self._drop_quarantined, queue_id)

    def queue_ids(self) -> Deferred[list[str]]:
        """Every committed queue id, sorted (so, for generated ids, oldest first)."""
        return self._run(self._list_queue)

    def recover(self) -> Deferred[int]:
        """Create the directories if needed and empty incoming/; return how many were removed.

        Call it once at start-up, before the first store: it deletes whatever is in
        incoming/, which would include messages being stored at that moment.
        """
        return self._run(self._recover)

    def free_space(self) -> Deferred[int]:
        """Bytes available to unprivileged users on the spool's filesystem."""
        return self._run(self._free_space)

    def probe(self) -> Deferred[None]:
        """Create, fsync and remove a file in incoming/, in the thread pool (``/readyz``)."""
        return self._run(self._probe)

    def close(self) -> Deferred[None]:
        """Refuse new work; fire once all batches and reads in flight have finished."""
        self._closed = True
        waits: list[Deferred[None]] = [self._stores.idle(), self._removals.idle()]
        if self._running:
            d: Deferred[None] = Deferred()
            self._idle_waiters.append(d)
            waits.append(d)
        return gatherResults(waits).addCallback(lambda _: None)

    # Reactor-side helpers

    def _commit(self, item: _Pending) -> Deferred[None]:
        if self._closed:
            if item.fd >= 0:
                self._drop_incoming(item.queue_id, item.fd)
            return fail(SpoolError("spool is closed"))
        return self._stores.submit(item)

    def _append(
        self, queue_id: str, fd: int | None, chunk: bytes, crc: int
    ) -> Deferred[tuple[int, int]]:
        """Append ``chunk`` to incoming/<queue_id> (created on first use); fire with the
        descriptor and the CRC-32 of all content written so far."""
        return self._run(self._append_incoming, queue_id, fd, chunk, crc)

    def _drop_incoming(self, queue_id: str, fd: int) -> Deferred[None]:
        """Close and unlink a streamed message's incoming/ file (in the thread pool).

        Best effort, even after close(): a leftover harms nobody, and recover()
        empties incoming/ at the next start anyway.
        """
        path = self._incoming / queue_id

        def drop() -> None:
            os.close(fd)
            self._discard(path)

        d = deferToThreadPool(self._reactor, self._threadpool, drop)
        return d.addErrback(lambda _: None)

    def _counted(self, d: Deferred[R]) -> Deferred[R]:
        """Count ``d`` as work in flight until it fires, as ``_run`` does."""
        self._running += 1
        return d.addBoth(self._finished)

    def _run(self, f: Callable[..., R], *args: object) -> Deferred[R]:
        """Run ``f(*args)`` in the thread pool, counted so that close() can wait for it."""
        if self._closed:
            return fail(SpoolError("spool is closed"))
        return self._counted(deferToThreadPool(self._reactor, self._threadpool, f, *args))

    def _finished(self, result: R | Failure) -> R | Failure:
        self._running -= 1
        if not self._running:
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                w.callback(None)
        return result

    # Everything below runs in the thread pool.

    def _sync(self, fd: int) -> None:
        if self._fsync:
            os.fsync(fd)

    def _sync_dir(self, path: Path) -> None:
        if self._fsync:
            sync_directory(path)

    def _make_dir(self, path: Path) -> bool:
        """Create directory ``path`` (mode 0700) durably; return whether it was created."""
        try:
            os.mkdir(path, _DIR_MODE)
        except FileExistsError:
            return False
        self._sync_dir(path.parent)
        return True

    def _ensure_dirs(self) -> None:
        if not self._root.is_dir():
            self._root.parent.mkdir(parents=True, exist_ok=True)
            self._make_dir(self._root)
        self._make_dir(self._incoming)
        self._make_dir(self._queue)

    def _store_batch(self, batch: list[_Pending]) -> list[Exception | None]:
        """Commit a batch of messages; one result per message, None meaning committed."""
        if not self._dirs_ready:
            self._ensure_dirs()
            self._dirs_ready = True
        results = self._commit_stores(batch)
        if any(result is not None for result in results):
            self._dirs_ready = False
            self._buckets.clear()
        return results

    def _commit_stores(self, batch: list[_Pending]) -> list[Exception | None]:
        results: list[Exception | None] = [None] * len(batch)

        # 1. Write every message completely into incoming/ (O_EXCL: never clobber).
        fds: dict[int, int] = {}
        for i, item in enumerate(batch):
            try:
                if item.content is None:
                    fds[i] = self._finish_incoming(item)
                else:
                    fds[i] = self._write_incoming(item)
            except (OSError, SpoolError) as e:
                results[i] = e
        self._faults.reached("spool.written")

        # 2. fsync each file, so its data is on disk before its name enters queue/.
        for i, fd in fds.items():
            try:
                try:
                    self._sync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                results[i] = e
                self._discard(self._incoming / batch[i].queue_id)
        self._faults.reached("spool.synced")

        # 3. Rename each file into its bucket: the atomic commit point of a message.
        by_dir: dict[Path, list[int]] = {}
        created_buckets = False
        for i, item in enumerate(batch):
            if results[i] is not None:
                continue
            source = self._incoming / item.queue_id
            target = self.queue_path(item.queue_id)
            try:
                if target.parent not in by_dir:
                    created_buckets |= self._make_bucket(target.parent)
                    by_dir[target.parent] = []
                if os.path.lexists(target):
                    raise DuplicateQueueId(f"{item.queue_id}: already in the queue")
                os.rename(source, target)
            except (OSError, SpoolError) as e:
                results[i] = e
                self._discard(source)
                continue
            by_dir[target.parent].append(i)
        self._faults.reached("spool.renamed")

        # 4. fsync each touched directory once: the renames become durable. The old
        # names in incoming/ need no fsync: if one reappears after a crash, recover()
        # unlinks that name only, and the queue/ name keeps the data.
        if created_buckets:
            try:
                self._sync_dir(self._queue)
            except OSError as e:
                self._fail_renamed(batch, results, [i for ids in by_dir.values() for i in ids], e)
        for directory, indices in by_dir.items():
            pending = [i for i in indices if results[i] is None]
            if not pending:
                continue
            try:
                self._sync_dir(directory)
            except OSError as e:
                self._fail_renamed(batch, results, pending, e)
        self._faults.reached("spool.dir_synced")
        return results

    def _append_incoming(
        self, queue_id: str, fd: int | None, chunk: bytes, crc: int
    ) -> tuple[int, int]:
        """Append content to a streamed message's file; create it (header placeholder
        first) on the first call."""
        if fd is None:
            if not self._dirs_ready:
                self._ensure_dirs()
            path = self._incoming / queue_id
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            try:
                fd = os.open(path, flags, _FILE_MODE)
            except FileExistsError:
                raise DuplicateQueueId(f"{queue_id}: already being stored") from None
            try:
                self._write_all(fd, [memoryview(bytes(HEADER_SIZE)), memoryview(chunk)])
            except BaseException:
                os.close(fd)
                self._discard(path)
                raise
        else:
            self._write_all(fd, [memoryview(chunk)])
        return fd, zlib.crc32(chunk, crc)

    @staticmethod
    def _write_all(fd: int, parts: list[memoryview]) -> None:
        """Write every part, in one writev unless the kernel takes less than everything."""
        while parts:
            written = os.writev(fd, parts)
            while parts and written >= len(parts[0]):
                written -= len(parts.pop(0))
            if parts:
                parts[0] = parts[0][written:]

    def _finish_incoming(self, item: _Pending) -> int:
        """Complete a streamed message's file: envelope after the content, then the header."""
        try:
            self._faults.reached("spool.write")
            self._write_all(item.fd, [memoryview(item.envelope_data)])
            os.pwrite(item.fd, item.header, 0)
        except BaseException:
            os.close(item.fd)
            self._discard(self._incoming / item.queue_id)
            raise
        return item.fd

    def _write_incoming(self, item: _Pending) -> int:
        """Create incoming/<queue_id> with the whole message; return its open descriptor.

        The layout is the one ``_append_incoming`` and ``_finish_incoming`` build in
        pieces: header, content, envelope.
        """
        path = self._incoming / item.queue_id
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, _FILE_MODE)
        except FileExistsError:
            raise DuplicateQueueId(f"{item.queue_id}: already being stored") from None
        assert item.content is not None
        try:
            self._faults.reached("spool.write")
            parts = [item.header, item.content, item.envelope_data]
            self._write_all(fd, [memoryview(part) for part in parts])
        except BaseException:
            os.close(fd)
            self._discard(path)
            raise
        return fd

    def _make_bucket(self, bucket: Path) -> bool:
        """Create a queue/ bucket if missing; its entry in queue/ is fsync'd by the caller."""
        if bucket in self._buckets:
            return False
        try:
            os.mkdir(bucket, _DIR_MODE)
        except FileExistsError:
            created = False
        else:
            created = True
        self._buckets.add(bucket)
        return created

    def _fail_renamed(
        self,
        batch: list[_Pending],
        results: list[Exception | None],
        indices: list[int],
        error: Exception,
    ) -> None:
        """A directory fsync failed: these messages are not committed; try to take them back."""
        for i in indices:
            if results[i] is None:
                results[i] = error
                self._discard(self.queue_path(batch[i].queue_id))

    @staticmethod
    def _discard(path: Path) -> None:
        """Best-effort unlink of a file that must not survive (its store has failed)."""
        try:
            os.unlink(path)
        except OSError:
            pass

    def _remove_batch(self, batch: list[tuple[str, ...]]) -> list[Exception | None]:
        """Unlink every listed message. No directory fsync: see ``remove``."""
        results: list[Exception | None] = [None] * len(batch)
        for i, ids in enumerate(batch):
            for queue_id in ids:
                try:
                    os.unlink(self.queue_path(queue_id))
                except FileNotFoundError:
                    continue
                except OSError as e:
                    results[i] = results[i] or e
        return results

    def _quarantine(self, ids: tuple[str, ...]) -> Path:
        target = self._root / "quarantine"
        self._make_dir(target)
        sources: set[Path] = set()
        for queue_id in ids:
            path = self.queue_path(queue_id)
            try:
                os.rename(path, target / queue_id)
            except FileNotFoundError:
                continue
            sources.add(path.parent)
        self._sync_dir(target)
        for directory in sources:
            self._sync_dir(directory)
        return target

    def _load(self, path: Path, queue_id: str) -> tuple[Envelope, bytes]:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise MessageNotFound(queue_id) from None
        except IsADirectoryError:
            raise SpoolCorruption(f"{queue_id}: a directory, not a queue file") from None
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SpoolCorruption(f"{queue_id}: not a regular file")
            return read_message(f, st.st_size, queue_id)

    def _list_quarantine(self) -> list[QuarantinedFile]:
        found: list[QuarantinedFile] = []
        try:
            with os.scandir(self._root / "quarantine") as entries:
                for entry in entries:
                    if not _QUEUE_ID.fullmatch(entry.name):
                        continue
                    st = entry.stat(follow_symlinks=False)
                    found.append(QuarantinedFile(entry.name, st.st_size, st.st_mtime))
        except FileNotFoundError:
            return found
        found.sort(key=lambda q: q.queue_id)
        return found

    def _unquarantine(self, path: Path, queue_id: str) -> tuple[Envelope, bytes]:
        source = self._root / "quarantine" / queue_id
        if not os.path.lexists(source):
            raise MessageNotFound(queue_id)
        message = self._load(source, queue_id)  # SpoolCorruption: it stays where it is
        if self._make_bucket(path.parent):
            self._sync_dir(self._queue)
        if os.path.lexists(path):
            raise DuplicateQueueId(queue_id)
        os.rename(source, path)
        self._sync_dir(path.parent)
        self._sync_dir(source.parent)
        return message

    def _drop_quarantined(self, queue_id: str) -> bool:
        path = self._root / "quarantine" / queue_id
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            return False
        self._sync_dir(path.parent)
        return True

    def _list_queue(self) -> list[str]:
        ids: list[str] = []
        try:
            with os.scandir(self._queue) as it:
                buckets = list(it)
        except FileNotFoundError:
            return ids
        for bucket in buckets:
            if not bucket.is_dir(follow_symlinks=False):
                continue
            with os.scandir(bucket.path) as entries:
                ids.extend(
                    e.name
                    for e in entries
                    if _QUEUE_ID.fullmatch(e.name) and bucket_of(e.name) == bucket.name
                )
        ids.sort()
        return ids

    def _recover(self) -> int:
        self._ensure_dirs()
        removed = 0
        with os.scandir(self._incoming) as entries:
            leftovers = list(entries)
        for entry in leftovers:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        if removed:
            self._sync_dir(self._incoming)
        return removed

    def _free_space(self) -> int:
        st = os.statvfs(self._root)
        return st.f_bavail * st.f_frsize

    def _probe(self) -> None:
        # incoming/ is where every message starts; recover() removes a probe a crash left.
        path = self._incoming / f"probe-{os.getpid()}-{os.urandom(6).hex()}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(path)
