"""Fixtures of the unit tests: the time zone, and an SMTP server session (``receiver``,
``clock``, ``client``) driven through a StringTransport."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest
from test_smtp_server import Client, RecordingReceiver, make_factory
from twisted.internet.testing import MemoryReactorClock


@pytest.fixture
def time_zone() -> Iterator[Callable[[str], None]]:
    """Sets the local time zone (TZ) for the test, whatever the machine's; restored after."""
    saved = os.environ.get("TZ")

    def set_zone(zone: str) -> None:
        os.environ["TZ"] = zone
        time.tzset()

    yield set_zone
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


@pytest.fixture
def receiver() -> RecordingReceiver:
    """The policy behind the server: records what it accepts; refuses what it is told to."""
    return RecordingReceiver()


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def client(receiver: RecordingReceiver, clock: MemoryReactorClock) -> Iterator[Client]:
    """An SMTP session on the ``receiver`` and ``clock``; closed after the test."""
    c = Client(make_factory(receiver, clock))
    yield c
    c.close()
