"""The node's pickup: messages sendmail left in the pickup directory, into the queue.

Postfix's pickup daemon: the directory is scanned at start-up, every
``pickup.poll_interval`` and whenever sendmail nudges the node over the control socket.
Each file is read as hostile input (``mtrkmta.spool.pickup.read_pickup``): a malformed
or over-size file is moved to ``<data_dir>/pickup-rejected/`` with one log line. A good
one goes through the node's one ``Acceptor`` under the queue id that is its name, with
a ``Received:`` header naming the uid that owns the file; the file is removed only
after the spool file and the tracking record are durable.

A crash after the acceptance and before the removal leaves the file for the next scan,
which finds its queue id already recorded and only removes it: nothing is queued twice.
A crash before the tracking commit leaves a spool file without a record, which start-up
quarantines (doc/architecture.rst, "Crash safety"); the next scan then drops that
quarantined copy and queues the message from its pickup file again.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mtrkmta.envelope import ClientInfo, Envelope, MailParams, Recipient
from mtrkmta.faults import IFaults, NoFaults
from mtrkmta.receive.acceptor import Accepted, Acceptor
from mtrkmta.smtp.command import parse_mail, parse_rcpt
from mtrkmta.smtp.params import parse_mail_params, parse_rcpt_params
from mtrkmta.smtp.reply import SMTPError
from mtrkmta.smtp.xtext import encode as xtext
from mtrkmta.spool.filespool import check_queue_id, sync_directory
from mtrkmta.spool.pickup import (
    REJECTED_DIR,
    TEMP_PREFIX,
    PickupError,
    ensure_pickup_directory,
    pickup_directory,
    read_pickup,
)

log = Logger()

STALE_TEMPORARY = 3600.0  # seconds after which a sendmail's unfinished file is removed
_ADVERTISED = frozenset({"DSN", "8BITMIME", "SMTPUTF8"})
_LINE_END = re.compile(rb"\r\n|\r|\n")


def qualify(address: str, domain: str) -> str:
    """``root`` becomes ``root@domain`` (Postfix appends $myorigin); others stay as they are."""
    return address if not address or "@" in address else f"{address}@{domain}"


def checked_envelope(envelope: Envelope, *, domain: str, uid: int, arrival: float) -> Envelope:
    """The envelope a pickup file asks for, validated as the SMTP server validates MAIL and
    RCPT, unqualified addresses completed with ``domain``; the client is the local ``uid``
    (nothing the file says about its origin is believed). Raises PickupError."""
    params = envelope.params
    words = [f"FROM:<{qualify(envelope.sender, domain)}>"]
    if params.body is not None:
        words.append(f"BODY={params.body}")
    if params.ret is not None:
        words.append(f"RET={params.ret}")
    if params.envid is not None:
        words.append(f"ENVID={xtext(params.envid)}")
    if params.smtputf8:
        words.append("SMTPUTF8")
    what = f"sender <{envelope.sender}>"
    try:
        sender, mail_params = parse_mail(" ".join(words))
        parsed = parse_mail_params(mail_params, advertised=_ADVERTISED)
        recipients = []
        for recipient in envelope.recipients:
            what = f"recipient <{recipient.address}>"
            words = [f"TO:<{qualify(recipient.address, domain)}>"]
            if recipient.params.notify is not None:
                words.append("NOTIFY=" + ",".join(sorted(recipient.params.notify)))
            address, rcpt_params = parse_rcpt(" ".join(words))
            recipients.append(
                Recipient(address, parse_rcpt_params(rcpt_params, advertised=_ADVERTISED))
            )
    except SMTPError as error:
        raise PickupError(f"{what}: {' '.join(error.reply.lines)}") from None
    if not recipients:
        raise PickupError("no recipients")
    return Envelope(
        queue_id=envelope.queue_id,
        sender=sender,
        recipients=tuple(recipients),
        params=MailParams(
            body=parsed.body, envid=parsed.envid, ret=parsed.ret, smtputf8=parsed.smtputf8
        ),
        arrival=arrival,
        client=ClientInfo(address="", helo="", protocol="local", listener="pickup"),
    )


def shown(name: str) -> str:
    """A file name for the log: as it is if plain, else escaped (no forged log lines)."""
    return name if name.isascii() and name.isprintable() else ascii(name)


def received_header(hostname: str, uid: int, queue_id: str, now: float) -> bytes:
    """``Received: by host (mtrkmta, from userid 1000) id Q; date``, as Postfix's pickup
    writes it (RFC 5321 §4.4: the time stamp line)."""
    date = format_datetime(datetime.fromtimestamp(int(now), timezone.utc))
    return (
        f"Received: by {hostname} (mtrkmta, from userid {uid})\r\n\tid {queue_id}; {date}\r\n"
    ).encode("ascii")


def with_crlf(content: bytes) -> bytes:
    """Content with every line ending as CRLF, as the spool holds it."""
    return _LINE_END.sub(b"\r\n", content)


@dataclass(kw_only=True)
class Pickup:
    """Scans one node's pickup directory and queues what it finds (see the module).

    ``blocking`` runs a blocking call in the node's I/O thread pool; ``enqueue`` gets
    each accepted message (the queue's ``admit``; None: the node does not deliver).
    """

    data_dir: Path
    acceptor: Acceptor
    hostname: str
    domain: str  # completes unqualified addresses: the first local domain
    message_size: int
    poll_interval: float
    clock: IReactorTime
    blocking: Callable[..., Deferred[Any]]
    enqueue: Callable[[Accepted], object] | None = None
    faults: IFaults = field(default_factory=NoFaults)
    _timer: LoopingCall | None = field(default=None, init=False)
    _busy: bool = field(default=False, init=False)
    _waiters: list[Deferred[int]] = field(default_factory=list, init=False)
    _again: bool = field(default=False, init=False)
    _stopped: bool = field(default=False, init=False)

    @property
    def directory(self) -> Path:
        return pickup_directory(self.data_dir)

    def start(self) -> Deferred[None]:
        """Create the directory if needed, then scan now and every ``poll_interval``."""

        def started(_: object) -> None:
            self._timer = LoopingCall(self.scan)
            self._timer.clock = self.clock
            self._timer.start(self.poll_interval, now=True)

        return self.blocking(ensure_pickup_directory, self.data_dir).addCallback(started)

    def stop(self) -> Deferred[None]:
        """Stop scanning; fires once the scan in progress (if any) has finished."""
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._again = False
        self._stopped = True
        if not self._busy:
            return succeed(None)
        waiter: Deferred[int] = Deferred()
        self._waiters.append(waiter)
        return waiter.addCallback(lambda _: None)

    def scan(self) -> Deferred[int]:
        """Queue every file in the directory now; fire with how many were queued. A scan
        asked for while one runs runs again after it (a file may have come meanwhile)."""
        if self._stopped:
            return succeed(0)
        if self._busy:
            self._again = True
            waiter: Deferred[int] = Deferred()
            self._waiters.append(waiter)
            return waiter
        self._busy = True
        return ensureDeferred(self._run()).addBoth(self._finished)

    def _finished(self, result: object) -> object:
        self._busy = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(0)
        if self._again and not self._stopped:
            self._again = False
            self.scan()
        return result

    async def _run(self) -> int:
        count = 0
        try:
            names = await self.blocking(self._list)
        except Exception as error:
            log.error("pickup: cannot read {path}: {error}", path=self.directory, error=error)
            return 0
        for name in names:
            if self._stopped:
                break
            try:
                if await self._take(name):
                    count += 1
            except Exception as error:  # a full disk, a database away: the file stays
                log.error(
                    "pickup: {name} not queued now ({error}); tried again at the next scan",
                    name=name,
                    error=error,
                )
        return count

    def _list(self) -> list[str]:
        """The names of finished files, oldest first; stale unfinished ones are removed."""
        names = []
        now = time.time()
        for entry in os.scandir(self.directory):
            if not entry.name.startswith(TEMP_PREFIX):
                names.append(entry.name)
                continue
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMPORARY:
                    os.unlink(entry.path)
                    log.warn(
                        "pickup: removed {name}, unfinished for an hour", name=shown(entry.name)
                    )
            except FileNotFoundError:
                continue
        return sorted(names)

    async def _take(self, name: str) -> bool:
        path = self.directory / name
        try:
            envelope, content, uid = await self.blocking(read_pickup, path, self.message_size)
            envelope = checked_envelope(
                envelope, domain=self.domain, uid=uid, arrival=self.clock.seconds()
            )
        except FileNotFoundError:
            return False  # taken by a scan that overlapped, or removed by its writer
        except (PickupError, OSError) as error:
            await self._reject(name, error)
            return False
        tracking = self.acceptor.tracking
        if envelope.queue_id in await tracking.known([envelope.queue_id]):
            # Queued before a crash took the node down ahead of the removal.
            log.info("{queue_id}: pickup file already queued: removed", queue_id=name)
            await self.blocking(os.unlink, path)
            return False
        # A spool file of this id without a record is a copy of this very file, from an
        # attempt whose tracking write failed (still in the queue directory) or from
        # before a crash (quarantined at start-up): the pickup file is the one to keep.
        spool = self.acceptor.spool
        await spool.drop_quarantined(envelope.queue_id)
        await spool.remove([envelope.queue_id])
        content = received_header(self.hostname, uid, envelope.queue_id, envelope.arrival) + (
            with_crlf(content)
        )
        accepted = await self.acceptor.accept_content(envelope, content)
        log.info(
            "{queue_id}: uid={uid} from=<{sender}> picked up",
            queue_id=envelope.queue_id,
            uid=uid,
            sender=envelope.sender,
        )
        self.faults.reached("pickup.queued")
        await self.blocking(os.unlink, path)
        if self.enqueue is not None:
            self.enqueue(accepted)
        return True

    async def _reject(self, name: str, error: Exception) -> None:
        """Move a bad file to pickup-rejected/ (one log line); delete it if that fails."""
        target = self.data_dir / REJECTED_DIR
        try:
            check_queue_id(name)
            kept = name
        except ValueError:
            kept = f"bad-{int(self.clock.seconds())}-{abs(hash(name)) % 10**8}"

        def move() -> Path:
            target.mkdir(mode=0o700, exist_ok=True)
            os.rename(self.directory / name, target / kept)
            sync_directory(target)
            return target / kept

        try:
            where = await self.blocking(move)
        except OSError as move_error:
            log.error(
                "pickup: rejected {name} ({error}) and could not keep it: {move_error}",
                name=shown(name),
                error=error,
                move_error=move_error,
            )
            try:
                await self.blocking(os.unlink, self.directory / name)
            except OSError:
                return
            return
        log.warn(
            "pickup: rejected {name}: {error}; moved to {where}",
            name=shown(name),
            error=error,
            where=where,
        )
