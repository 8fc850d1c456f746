"""What one SMTP session costs in memory: its attributes stay within CPython's shared-key
limit for instance dictionaries, through every phase of a session."""

from __future__ import annotations

import sys

from test_smtp_server import Client, make_factory
from twisted.internet.defer import Deferred

# CPython shares one key table among the instances of a class, with a small array of
# values in each, while an instance has fewer than 30 attributes (SHARED_KEYS_MAX_SIZE in
# Objects/dictobject.c). The 30th turns that session's dictionary into a full one of
# about 1.6 KiB instead of 0.3 KiB: 30 MiB more with 20,000 sessions (bench/ (f)).
MOST_ATTRIBUTES = 29


def every_phase(client, receiver) -> set[str]:
    """Drive a session through DATA, a pending accept, a spool that is behind, BDAT and
    QUIT; the union of the attributes it had."""
    seen: set[str] = set()

    def send(data: bytes) -> list[bytes]:
        lines = client.send(data)
        seen.update(vars(client.proto))
        return lines

    receiver.pending_accepts = []
    send(b"EHLO client.example\r\n")
    send(b"MAIL FROM:<a@client.example>\r\n")
    send(b"RCPT TO:<b@mx.example.test>\r\n")
    send(b"DATA\r\n")
    receiver.sinks[-1].wait = behind = Deferred()  # the spool is behind: reading pauses
    send(b"Subject: x\r\n\r\n" + b"body line\r\n" * 2000)
    behind.callback(None)
    assert send(b".\r\n") == []  # the accept is pending: the reply waits
    receiver.pending_accepts.pop().callback(None)
    seen.update(vars(client.proto))
    send(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<b@mx.example.test>\r\n")
    send(b"BDAT 5 LAST\r\nabc\r\n")
    receiver.pending_accepts.pop().callback(None)
    assert send(b"QUIT\r\n")[-1].startswith(b"221")
    return seen


def test_a_session_keeps_its_attributes_within_the_shared_key_limit(client, receiver):
    attributes = every_phase(client, receiver)
    assert {"_pauses", "_paused_at", "_chunk"} <= attributes  # the phases were reached
    assert len(attributes) <= MOST_ATTRIBUTES, sorted(attributes)


def test_a_session_dictionary_does_not_grow_through_its_phases(client, receiver, clock):
    # Another session first, whose attributes change in another order (it closes before
    # anything pauses): the key table the class shares must still fit this one.
    other = Client(make_factory(receiver, clock))
    other.send(b"QUIT\r\n")
    other.close()
    first = sys.getsizeof(vars(client.proto))
    every_phase(client, receiver)
    assert sys.getsizeof(vars(client.proto)) == first
