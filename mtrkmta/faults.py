"""Fault injection at the named steps of the accept and delivery paths (for tests only)."""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from zope.interface import Interface, implementer

# Every named step, in the order a message passes them, with what is true at that instant.
POINTS: dict[str, str] = {
    "spool.write": "about to write a message file into spool/incoming/",
    "spool.written": "a batch of message files written in spool/incoming/, not yet fsync'd",
    "spool.synced": "the batch's files fsync'd in spool/incoming/, not yet renamed",
    "spool.renamed": "the batch's files renamed into spool/queue/<bucket>/, not yet fsync'd",
    "spool.dir_synced": "bucket directories fsync'd: the files are durable, no tracking record",
    "tracking.write": "in a tracking database transaction, before its COMMIT",
    "tracking.arrival_committed": "the arrival record committed, no 250 sent yet",
    "smtp.reply_sent": "the 250 for a message written to the client",
    "pickup.queued": "a picked-up message's spool file and record durable, pickup file still there",
    "maildir.write": "about to write a copy into the mailbox's tmp/",
    "maildir.tmp_written": "copy written in tmp/, not yet fsync'd",
    "maildir.tmp_synced": "copy fsync'd in tmp/, not yet renamed",
    "maildir.renamed": "copy renamed into new/, directory not yet fsync'd",
    "maildir.dir_synced": "new/ fsync'd: the attempt's copies are durable, no outcome recorded",
    "transport.data_sent": "end of data sent to the next hop, its final reply not yet read",
    "transport.reply_received": "the next hop's final reply read, no outcome recorded yet",
    "tracking.outcome_committed": "a delivery outcome committed in the tracking database",
    "queue.outcome_committed": "the queue saw the outcomes committed, spool file still there",
    "queue.spool_removed": "a finished message's spool file removed",
}

# What a plan can do at a point.
ACTIONS: dict[str, int | None] = {"crash": None, "enospc": errno.ENOSPC, "eio": errno.EIO}

ENVIRONMENT = "MTRKMTA_FAULTS"


class FaultSpecError(ValueError):
    """A fault plan that names an unknown point or action."""


class IFaults(Interface):
    """Told each time the process passes a named step (see POINTS)."""

    def reached(point: str) -> None:
        """The process is at this named step; may raise OSError or end the process."""


@implementer(IFaults)
class NoFaults:
    """The default everywhere: nothing happens at any step."""

    def reached(self, point: str) -> None:
        return None


@implementer(IFaults)
@dataclass
class FaultPlan:
    """Act once, at the ``hit``-th time ``point`` is reached: SIGKILL the process (``crash``,
    so that no clean-up runs) or raise OSError (``enospc``, ``eio``)."""

    point: str
    action: str
    hit: int = 1
    seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def parse(cls, spec: str) -> FaultPlan:
        """``point:action[:hit]``, e.g. ``spool.renamed:crash:3`` or ``maildir.write:eio``."""
        parts = spec.strip().split(":")
        if len(parts) not in (2, 3):
            raise FaultSpecError(f"{ENVIRONMENT}={spec!r}: expected point:action[:hit]")
        point, action = parts[0], parts[1]
        if point not in POINTS:
            raise FaultSpecError(
                f"{ENVIRONMENT}: unknown point {point!r}; known: {', '.join(POINTS)}"
            )
        if action not in ACTIONS:
            raise FaultSpecError(
                f"{ENVIRONMENT}: unknown action {action!r}; known: {', '.join(ACTIONS)}"
            )
        hit = 1
        if len(parts) == 3:
            if not parts[2].isdigit() or int(parts[2]) < 1:
                raise FaultSpecError(f"{ENVIRONMENT}: hit count {parts[2]!r} is not a number >= 1")
            hit = int(parts[2])
        return cls(point, action, hit)

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        with self.lock:  # reached from the reactor thread and from pool threads
            self.seen += 1
            if self.seen != self.hit:
                return
        code = ACTIONS[self.action]
        if code is None:
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            raise OSError(code, f"{os.strerror(code)} (injected at {point})")


def from_environment(environ: Mapping[str, str]) -> IFaults:
    """The plan in MTRKMTA_FAULTS, or NoFaults when it is unset or empty."""
    spec = environ.get(ENVIRONMENT, "")
    return FaultPlan.parse(spec) if spec else NoFaults()
