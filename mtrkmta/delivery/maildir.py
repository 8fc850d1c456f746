"""Final delivery into Maildir mailboxes: write in tmp/, fsync, rename into new/, fsync."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mtrkmta.address import base_local_part, split_address
from mtrkmta.delivery.interfaces import Attempt, ITransport, RecipientOutcome, Relay
from mtrkmta.envelope import BINARYMIME
from mtrkmta.faults import IFaults, NoFaults
from mtrkmta.tracking.interfaces import RecipientState

log = Logger()

LOCAL = Relay("local")
"""The delivery log's ``relay=`` of a Maildir delivery."""

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._=-")
NAME_MAX = 255
"""The longest file name, in octets, that the usual file systems take (ext4, XFS, tmpfs)."""


def mailbox_name(address: str, delimiter: str = "+") -> str:
    """The mailbox of an address: its lower-cased local part without ``+detail``.

    One-to-one: every character outside ``A-Z a-z 0-9 . _ = -`` (``%`` included) is
    replaced by the %XX escapes of its UTF-8 octets, and so is a leading dot, so an
    address can never name a path outside the Maildir root and two local parts never
    share a mailbox. A local part made of letters, digits and those marks keeps its
    (lower-cased) name. Raises ValueError for an empty local part: it has no mailbox
    (RCPT refuses it; nothing falls back to postmaster).
    """
    local, _ = split_address(address)
    local = base_local_part(local, delimiter).lower()
    if not local:
        raise ValueError(f"<{address}> has an empty local part: no mailbox")
    encoded = "".join(
        char
        if char in _SAFE and not (index == 0 and char == ".")
        else "".join(f"%{octet:02X}" for octet in char.encode("utf-8", "surrogatepass"))
        for index, char in enumerate(local)
    )
    return encoded


_KEY_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def delivery_key(queue_id: str, index: int) -> str:
    """The unique part of the Maildir name of recipient ``index``'s copy of ``queue_id``.

    ``Q<queue id>R<index>``: the same for every attempt, distinct for every message
    and recipient (queue ids are unique across nodes and restarts). Characters of
    the queue id outside ``A-Z a-z 0-9 _ -`` are %XX-escaped, so the key holds no
    ``.``, ``/`` or ``:`` (which separate the fields of a Maildir name) and stays
    one-to-one; the index, all digits after the last ``R``, ends it unambiguously.
    """
    token = "".join(
        char if char in _KEY_SAFE else "".join(f"%{o:02X}" for o in char.encode("utf-8"))
        for char in queue_id
    )
    return f"Q{token}R{index}"


def _holds(directory: Path, key: str) -> bool:
    """Whether ``directory`` (``new/`` or ``cur/``) holds a file whose unique part,
    the second ``.``-separated field of the name before any ``:``, is ``key``."""
    names = os.listdir(directory)
    # One search in C over the joined listing first: a mailbox of 100,000 messages is
    # read in milliseconds. "/" cannot occur in a name; the key holds no ".".
    if f".{key}." not in "/".join(names):
        return False
    return any(name.split(":", 1)[0].split(".", 2)[1:2] == [key] for name in names)


@implementer(ITransport)
class MaildirTransport:
    """Delivers each recipient's copy into ``root/<mailbox>/new/`` (Maildir).

    Each copy gets ``Return-Path:`` and ``Delivered-To:`` headers and LF line
    ends (the Maildir convention); a ``BODY=BINARYMIME`` message keeps the octets it
    arrived with, CRLF line ends included, and its two headers end in CRLF too.
    The file is written in ``tmp/`` with a unique name, fsync'd, renamed into
    ``new/``, and ``new/`` is fsync'd before the outcome is reported, so
    ``delivered`` means on disk. Work runs in the thread pool.

    Exactly once across crashes: a kill after the rename into ``new/`` and before
    the queue commits the outcome makes the queue try the same recipient again.
    The name in ``new/`` is ``<time>.<unique>.<host>,S=<size>`` where ``<unique>``
    (see delivery_key) is derived from the queue id and the recipient's index in
    the envelope, the mailbox being the directory. Before writing, ``new/`` and
    ``cur/`` are searched for a name with that unique part (in ``cur/`` the reader
    may have appended ``:2,<flags>``; only the part before ``:`` counts, and the
    time and host fields are ignored, so a restart under another host name still
    finds it); when found, the outcome is ``delivered`` and nothing is written.
    The search reads both directory listings (names only, no stat), so its cost
    grows with the mailbox (about 12 ms for 20,000 names on a slow test VM); it
    runs in the thread pool.

    Known limit: once the reader has deleted (or moved to another folder) the
    copy, a retry after such a crash delivers it again. No per-mailbox marker is
    kept for that case: a marker outlives the message it guards and would need its
    own expiry and clean-up inside the user's Maildir (where a reader may treat an
    unknown directory as a folder), all to close a window that needs a crash
    within milliseconds of a rename *and* a reader that fetches and deletes the
    message before the node is back.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        root: Path,
        *,
        hostname: str | None = None,
        fsync: bool = True,
        delimiter: str = "+",
        template: str = "{local}",
        faults: IFaults = NoFaults(),
    ) -> None:
        """``template`` places a mailbox under ``root``: ``{local}`` is the mailbox name
        (see mailbox_name), ``{domain}`` the lower-cased recipient domain."""
        self._reactor = reactor
        self._threadpool = threadpool
        self.root = root
        self._host = (hostname or socket.gethostname()).replace("/", "\\057").replace(":", "\\072")
        self._fsync = fsync
        self._delimiter = delimiter
        self._template = template
        self._faults = faults  # told each named step (mtrkmta.faults.POINTS)
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def deliver(self, attempt: Attempt) -> Deferred[list[RecipientOutcome]]:
        return deferToThreadPool(self._reactor, self._threadpool, self._deliver, attempt)

    def abort(self) -> None:
        """Nothing to drop: a Maildir write finishes in its own short thread call."""

    def close(self) -> Deferred[None]:
        return succeed(None)  # nothing cached: every attempt finishes in its own call

    def _deliver(self, attempt: Attempt) -> list[RecipientOutcome]:
        # RFC 3030 §3: a BINARYMIME message is stored as received, CRLF line ends and all;
        # turning CRLF into LF would change its binary body.
        binary = attempt.envelope.params.body == BINARYMIME
        body = attempt.content if binary else attempt.content.replace(b"\r\n", b"\n")
        eol = "\r\n" if binary else "\n"
        sender = attempt.envelope.sender
        outcomes = []
        touched: set[Path] = set()
        for index in attempt.recipients:
            address = attempt.recipient(index).address
            headers = f"Return-Path: <{sender}>{eol}Delivered-To: <{address}>{eol}"
            problem = self.unusable(address)
            if problem is not None:
                # RCPT refuses such addresses; one that comes from an alias target fails.
                log.error(
                    "{queue_id}: maildir delivery to <{address}> failed: {problem}",
                    queue_id=attempt.envelope.queue_id,
                    address=address,
                    problem=problem,
                )
                outcomes.append(
                    RecipientOutcome(
                        index, RecipientState.FAILED, "5.1.3", f"x-local; {problem}", relay=LOCAL
                    )
                )
                continue
            try:
                key = delivery_key(attempt.envelope.queue_id, index)
                new_dir = self._write(
                    self.mailbox_path(address), key, headers.encode(), body, look=not attempt.first
                )
                touched.add(new_dir)
                outcomes.append(
                    RecipientOutcome(index, RecipientState.DELIVERED, "2.1.5", relay=LOCAL)
                )
            except OSError as error:
                log.error(
                    "{queue_id}: maildir delivery to <{address}> failed: {error}",
                    queue_id=attempt.envelope.queue_id,
                    address=address,
                    error=error,
                )
                outcomes.append(
                    RecipientOutcome(index, RecipientState.DEFERRED, "4.3.0", relay=LOCAL)
                )
        try:
            for new_dir in touched:
                self._sync_dir(new_dir)
        except OSError as error:
            log.error(
                "{queue_id}: maildir fsync failed: {error}",
                queue_id=attempt.envelope.queue_id,
                error=error,
            )
            return [
                RecipientOutcome(o.index, RecipientState.DEFERRED, "4.3.0", relay=LOCAL)
                for o in outcomes
            ]
        self._faults.reached("maildir.dir_synced")
        return outcomes

    def mailbox_path(self, address: str) -> str:
        """The mailbox directory of ``address`` (``local.mailbox``), relative to the root."""
        domain = split_address(address)[1].lower()
        safe_domain = mailbox_name(domain, "") if domain else "localhost"
        return self._template.format(
            local=mailbox_name(address, self._delimiter), domain=safe_domain
        )

    def unusable(self, address: str) -> str | None:
        """Why ``address`` can have no mailbox here (None when it can): an empty local
        part, or a name longer than a file name may be (``NAME_MAX`` octets)."""
        try:
            path = self.mailbox_path(address)
        except ValueError:
            return "empty local part: no mailbox"
        if any(len(part.encode("utf-8")) > NAME_MAX for part in path.split("/")):
            return "local part too long for a mailbox name"
        return None

    def _unique(self, size: int) -> str:
        with self._lock:
            sequence = next(self._counter)
        now = time.time()
        seconds = int(now)
        micros = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{micros}P{os.getpid()}Q{sequence}.{self._host},S={size}"

    def _write(
        self, mailbox: str, key: str, headers: bytes, body: bytes, *, look: bool = True
    ) -> Path:
        """Write one copy (unless ``look`` finds the one named by ``key`` in ``new/`` or
        ``cur/``); return the directory to fsync. The first attempt of a message this
        process accepted need not look (``Attempt.first``): listing a large mailbox
        costs milliseconds."""
        maildir = self.root / mailbox
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in ("new", "cur") if look else ():
            if _holds(maildir / sub, key):
                # An earlier attempt got this far; fsync its directory again, since
                # that attempt may have died before doing so.
                return maildir / sub
        size = len(headers) + len(body)
        # tmp/ gets a name of its own, so that a file left there by a crashed attempt
        # never blocks the retry (readers remove tmp/ files older than 36 hours).
        tmp_path = maildir / "tmp" / self._unique(size)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            self._faults.reached("maildir.write")
            with os.fdopen(fd, "wb", closefd=False) as handle:
                handle.write(headers)
                handle.write(body)
            self._faults.reached("maildir.tmp_written")
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._faults.reached("maildir.tmp_synced")
        seconds = int(time.time())
        os.rename(tmp_path, maildir / "new" / f"{seconds}.{key}.{self._host},S={size}")
        self._faults.reached("maildir.renamed")
        return maildir / "new"

    def _sync_dir(self, directory: Path) -> None:
        if not self._fsync:
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
