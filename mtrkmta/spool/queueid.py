"""Queue id generation: short, filesystem-safe, time-sortable, unique across restarts and nodes."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable

# Crockford's base32 in lower case: digits sort before letters in ASCII, so the
# string order of equal-length ids is the numeric order of what they encode, and
# no two characters differ only in case (safe on case-insensitive filesystems).
ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
TIME_CHARS = 11  # 55 bits of microseconds since the epoch: good until the year 3111
RANDOM_CHARS = 9  # 45 random bits: collisions between nodes in one microsecond are ~2**-45
LENGTH = TIME_CHARS + RANDOM_CHARS


def _b32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        chars.append(ALPHABET[digit])
    if value:
        raise ValueError(f"value does not fit in {width} base32 characters")
    return "".join(reversed(chars))


class QueueIdGenerator:
    """Make 20-character queue ids: 11 chars of microsecond time, then 9 random chars.

    Ids from one generator strictly increase even if the clock stalls or steps back
    (the time part then advances by one microsecond per id), so they are unique
    within a process; the random part makes them unique across nodes and restarts.
    Safe to call from several threads.
    """

    def __init__(
        self,
        clock: Callable[[], int] = time.time_ns,
        randbits: Callable[[int], int] = secrets.randbits,
    ) -> None:
        """``clock`` returns POSIX time in nanoseconds; ``randbits(k)`` a k-bit integer."""
        self._clock = clock
        self._randbits = randbits
        self._lock = threading.Lock()
        self._last_us = -1

    def __call__(self) -> str:
        """Return a new queue id."""
        with self._lock:
            now_us = max(self._clock() // 1000, self._last_us + 1)
            self._last_us = now_us
        return _b32(now_us, TIME_CHARS) + _b32(self._randbits(5 * RANDOM_CHARS), RANDOM_CHARS)

    @staticmethod
    def timestamp(queue_id: str) -> float:
        """The POSIX time (seconds) encoded in a queue id made by this class."""
        if len(queue_id) != LENGTH or any(c not in ALPHABET for c in queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        us = 0
        for c in queue_id[:TIME_CHARS]:
            us = us * 32 + ALPHABET.index(c)
        return us / 1_000_000
