"""Time limits and flow control of server sessions (SMTP, LMTP, MTQP) that bytes cannot reset."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from zope.interface import implementer

CLOSE_GRACE = 10.0
"""Seconds a closing connection may take to send its last replies before it is cut."""

COMMAND = "command"
DATA = "data"
SESSION = "session"

# The reasons reading pauses for, as bits of one small int (a set per session cost
# 200 octets: 4 MiB with 20,000 sessions).
PAUSE_REASONS = {"answer": 1, "spool": 2, "output": 4}


@implementer(IPushProducer)
class SessionGuard:
    """A mixin for a server Protocol: deadlines, pauses of reading, and closing for good.

    Deadlines (RFC 5321 §4.5.3.2 style) are kept on the factory's injected clock and
    are never moved by partial input:

    - a command line must be complete within ``timeout`` of the previous one being
      answered (``_expect_line``): the bytes of an unfinished line extend nothing;
    - message content must keep coming (``_expect_data``): no gap longer than
      ``block_timeout``, and after the first ``block_timeout`` seconds an average of
      at least ``min_rate`` octets per second, so trickling cannot hold a session;
    - the whole session ends after ``session_time`` seconds whatever happens.

    One timer serves the current phase and the session's end (whichever comes first);
    it is re-armed only when it fires early, so input costs no timer work. It is never
    moved earlier either: it sleeps at most ``_wake_step()`` seconds, the shortest
    timeout a phase can start with, so a new phase's deadline is never before it. (A
    reactor timer is about 0.3 KiB, and one cancelled stays in the reactor's heap for
    a while: two or three per session were 20 MiB with 20,000 sessions.) When a
    deadline passes, ``_deadline_passed(phase)`` is called with ``COMMAND``, ``DATA``
    or ``SESSION``.

    Reading pauses for named reasons (an answer being computed, the spool catching
    up, unread output) and resumes when none is left. The session registers itself
    as the transport's push producer: when the client does not read its replies and
    the transport's buffer passes its high-water mark (64 KiB, Twisted's), reading
    stops until the buffer drains, so replies cannot pile up without bound.
    ``_guard_close`` closes the connection and cuts it after ``CLOSE_GRACE`` seconds
    if the client never reads what is left.

    The protocol provides ``factory.clock``, ``transport`` and ``_closing``, and
    implements ``_deadline_passed`` and ``_output_drained``.
    """

    factory: Any
    transport: Any
    _closing: bool
    # The protocol's own: say goodbye when a deadline passed (COMMAND, DATA or SESSION),
    # and go on with input already received once the client read its replies.
    _deadline_passed: Callable[[str], None]
    _output_drained: Callable[[], None]

    _phase: str | None = None
    _deadline = 0.0
    _timer: IDelayedCall | None = None
    _session_end = math.inf  # when session_time runs out (clock seconds)
    _abort_timer: IDelayedCall | None = None
    _pauses = 0  # bits of PAUSE_REASONS
    _producing = False  # registered as the transport's producer
    # The data phase: (start, last arrival, octets received, block timeout, minimum rate).
    _data_clock: list[float] | None = None
    _paused_at: float | None = None

    # -- start and stop ------------------------------------------------------------------

    def _guard_init(self) -> None:
        """Optional, from the protocol's __init__: every attribute set now, in one order,
        so that none is added later. (An attribute added to one instance later, or in
        another order, makes CPython give that instance a dictionary of its own.)"""
        self._phase = None
        self._deadline = 0.0
        self._timer = None
        self._session_end = math.inf
        self._abort_timer = None
        self._pauses = 0
        self._producing = False
        self._data_clock = None
        self._paused_at = None

    def _guard_start(self, session_time: float) -> None:
        """Call from connectionMade: become the transport's producer, start the session clock."""
        self.transport.registerProducer(self, True)
        self._producing = True
        if session_time > 0:
            self._session_end = self.factory.clock.seconds() + session_time
            self._schedule(self._session_end)

    def _guard_close(self) -> None:
        """Close after what was written is sent; cut the connection if that takes too long."""
        self._closing = True
        self._session_end = math.inf  # nothing is said to a closing session
        self._stop_phase()
        # No longer a producer: a transport closes only once its producer is gone (TLS
        # sends its close_notify only then, TCP would resume a paused producer instead
        # of closing). Read again, input is ignored from now on: under TLS the
        # connection ends only once the client's close_notify or end of stream is read.
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        self._pauses = 0
        self.transport.resumeProducing()
        self.transport.loseConnection()
        if self._abort_timer is None:
            self._abort_timer = self.factory.clock.callLater(CLOSE_GRACE, self._abort)

    def _guard_lost(self) -> None:
        """Call from connectionLost: no timer outlives the connection."""
        self._session_end = math.inf
        self._stop_phase()
        for timer in (self._timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._abort_timer = None

    def _abort(self) -> None:
        self._abort_timer = None
        self.transport.abortConnection()

    # -- deadlines ---------------------------------------------------------------------

    def _expect_line(self, timeout: float) -> None:
        """The next command line must be complete within ``timeout`` seconds from now."""
        self._data_clock = None
        self._phase = COMMAND
        self._arm(self.factory.clock.seconds() + timeout)

    def _expect_data(self, block_timeout: float, min_rate: float) -> None:
        """Message content starts now; see the class docstring for its two limits."""
        now = self.factory.clock.seconds()
        self._data_clock = [now, now, 0.0, block_timeout, min_rate]
        self._phase = DATA
        self._arm(now + block_timeout)

    def _data_arrived(self, octets: int) -> None:
        """Count content octets (no timer work: the timer checks when it fires)."""
        data = self._data_clock
        if data is not None:
            data[1] = self.factory.clock.seconds()
            data[2] += octets

    def _stop_phase(self) -> None:
        """No deadline for the client while the server itself is busy answering (the
        timer stays: it finds no phase when it fires, and waits for the session's end)."""
        self._phase = None
        self._data_clock = None

    def _wake_step(self) -> float:
        """The longest the timer sleeps: the shortest timeout a phase can start with
        (the protocol's; none by default)."""
        return math.inf

    def _current_deadline(self) -> float:
        data = self._data_clock
        if data is None:
            return self._deadline
        start, last, received, block, rate = data
        if self._paused_at is not None:  # waiting for the spool: the clock stands still
            waited = self.factory.clock.seconds() - self._paused_at
            start, last = start + waited, last + waited
        deadline = last + block
        if rate > 0:
            deadline = min(deadline, start + block + received / rate)
        return deadline

    def _arm(self, deadline: float) -> None:
        self._deadline = deadline
        self._schedule(deadline)

    def _schedule(self, when: float) -> None:
        """The timer fires at ``when`` at the latest (never: ``math.inf``), and before the
        session's end and ``_wake_step()`` from now."""
        clock = self.factory.clock
        now = clock.seconds()
        when = min(when, self._session_end, now + self._wake_step())
        if when == math.inf:
            return
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return  # fires early and re-arms itself then
            timer.cancel()
        self._timer = clock.callLater(max(0.0, when - now), self._check)

    def _check(self) -> None:
        self._timer = None
        if self._closing:
            return
        now = self.factory.clock.seconds()
        if now >= self._session_end:
            self._session_end = math.inf
            self._deadline_passed(SESSION)
            return
        phase = self._phase
        if phase is None:
            self._schedule(self._session_end)
            return
        deadline = self._current_deadline()
        if now < deadline:
            self._arm(deadline)
            return
        self._stop_phase()
        self._deadline_passed(phase)

    # -- pausing reading ---------------------------------------------------------------

    def _pause_reading(self, reason: str) -> None:
        if not self._pauses and not self._closing:
            self.transport.pauseProducing()
        if reason == "spool" and self._paused_at is None:
            self._paused_at = self.factory.clock.seconds()
        self._pauses |= PAUSE_REASONS[reason]

    def _resume_reading(self, reason: str) -> None:
        bit = PAUSE_REASONS[reason]
        if not self._pauses & bit:
            return
        self._pauses &= ~bit
        if reason == "spool" and self._paused_at is not None:
            # Time the server made the client wait does not count against its rate.
            waited = self.factory.clock.seconds() - self._paused_at
            self._paused_at = None
            if self._data_clock is not None:
                self._data_clock[0] += waited
                self._data_clock[1] += waited
        if not self._pauses and not self._closing:
            self.transport.resumeProducing()

    @property
    def output_blocked(self) -> bool:
        """True while the client leaves more than the transport's buffer of replies unread."""
        return bool(self._pauses & PAUSE_REASONS["output"])

    # -- IPushProducer (the transport's view of this session) --------------------------

    def pauseProducing(self) -> None:
        self._pause_reading("output")

    def resumeProducing(self) -> None:
        if self.output_blocked:
            self._resume_reading("output")
            if not self._closing:
                self._output_drained()

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost does the cleaning up."""
