"""The server core under hostile input: bounded memory, backpressure and time limits."""

from __future__ import annotations

import tracemalloc

from test_smtp_server import Client, RecordingReceiver, make_factory
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from mtrkmta.sessionguard import CLOSE_GRACE

START = b"EHLO c.example\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<m@x.test>\r\nDATA\r\n"


class CountingReceiver(RecordingReceiver):
    """Its sinks count the content octets and keep none of them."""

    def incoming(self, queue_id):
        sink = super().incoming(queue_id)
        sink.octets = 0

        def write(data, sink=sink):
            sink.octets += len(data)
            return sink.wait

        sink.write = write
        return sink


class ReadingTransport(StringTransport):
    """A StringTransport that, like Twisted's TCP transport, pauses its push producer
    when more than ``buffer_size`` octets of output are waiting for the client, and
    resumes it once the client read them (``drain``)."""

    buffer_size = 65536

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.value()) > self.buffer_size:
            if self.producerState != "paused":
                self.producer.pauseProducing()
                self.producerState = "paused"

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if self.producer is not None and self.producerState == "paused":
            self.producerState = "producing"
            self.producer.resumeProducing()
        return data


def connect(receiver, clock, transport=None, **settings) -> Client:
    factory = make_factory(receiver, clock, **settings)
    if transport is None:
        return Client(factory)
    client = Client.__new__(Client)
    client.proto = factory.buildProtocol(None)
    client.transport = transport
    client.proto.makeConnection(transport)
    return client


# -- DATA amplification ----------------------------------------------------------------------


def test_data_streams_with_memory_that_does_not_grow_with_the_message(clock):
    # 34 MB of "ab\r\n" without a final dot grew the server by about 14 times the
    # octets sent (one object per line). Now content goes to the sink as it comes.
    receiver = CountingReceiver()
    client = connect(receiver, clock)
    client.send(START)
    chunk = b"ab\r\n" * 16384  # 64 KiB, what one read of a TCP socket gives
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(160):  # 10 MiB
            client.proto.dataReceived(chunk)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert receiver.sinks[0].octets > 10 * 1024 * 1024
    assert current - before < 512 * 1024
    assert peak - before < 2 * 1024 * 1024
    client.close()


def test_over_size_is_refused_at_once_and_the_rest_thrown_away(clock):
    receiver = CountingReceiver()
    client = connect(receiver, clock, message_size=100_000)
    client.send(START)
    replies = client.send(b"x" * 998 + b"\r\n")
    assert replies == []
    replies = client.send((b"y" * 998 + b"\r\n") * 200)
    # 552 as soon as the limit is crossed (the one reply to the content); the sink goes.
    assert replies == [b"552 5.3.4 Message size exceeds fixed maximum message size"]
    assert receiver.sinks[0].discarded
    kept = receiver.sinks[0].octets
    assert client.send((b"z" * 998 + b"\r\n") * 200) == []
    assert receiver.sinks[0].octets == kept
    # The end of the content gets no second reply; the session goes on.
    assert client.send(b".\r\nNOOP\r\n") == [b"250 2.0.0 Ok"]
    assert receiver.accepted == []
    client.close()


def test_waiting_for_the_spool_stops_reading(clock):
    receiver = RecordingReceiver()
    client = connect(receiver, clock)
    client.send(START)
    sink = receiver.sinks[0]
    sink.wait = Deferred()
    client.send(b"Subject: slow disk\r\n\r\n")
    assert client.transport.producerState == "paused"
    wait, sink.wait = sink.wait, None
    wait.callback(None)
    assert client.transport.producerState == "producing"
    assert client.send(b"body\r\n.\r\n") == [b"250 2.0.0 Ok: queued as Q1"]
    client.close()


# -- line ends (RFC 5321 §2.3.8) -------------------------------------------------------------


def test_bare_cr_is_normalised_before_it_is_stored(clock):
    receiver = RecordingReceiver()
    client = connect(receiver, clock)
    client.send(START)
    replies = client.send(b"Subject: x\r\n\r\nhello\r.\r\nMAIL FROM:<admin@x.test>\r\n.\r\n")
    assert replies == [b"250 2.0.0 Ok: queued as Q1"]
    content = receiver.accepted[0][1]
    assert content.endswith(b"\r\n\r\nhello\r\n.\r\nMAIL FROM:<admin@x.test>\r\n")
    assert content.count(b"\r") == content.count(b"\n") == content.count(b"\r\n")


def test_bare_line_ends_can_be_refused(clock):
    receiver = RecordingReceiver()
    client = connect(receiver, clock, bare_line_ends="reject")
    client.send(START)
    replies = client.send(b"Subject: x\r\n\r\nhello\n.\nQUIT\r\n.\r\n")
    assert replies == [b"550 5.6.0 Bare CR or LF in message content (RFC 5321 \xc2\xa72.3.8)"]
    assert receiver.accepted == [] and receiver.sinks[0].discarded


# -- replies nobody reads (backpressure) -------------------------------------------------------


def test_a_client_that_does_not_read_its_replies_is_not_answered_further(clock):
    # 13 MB of HELP without reading the replies grew the server by 225 MB. Now the
    # session stops reading once 64 KiB of replies wait, until the client reads them.
    receiver = RecordingReceiver()
    transport = ReadingTransport()
    client = connect(receiver, clock, transport)
    burst = b"HELP\r\n" * 10_000
    client.proto.dataReceived(burst)
    assert transport.producerState == "paused"  # reading stopped
    waiting = len(transport.value())
    assert waiting < 64 * 1024 + 1024
    answered = transport.value().count(b"214 2.0.0 See")
    assert answered < 10_000
    while transport.producerState == "paused":
        transport.drain()
        answered += transport.value().count(b"214 2.0.0 See")
        assert len(transport.value()) < 64 * 1024 + 1024
    assert answered + transport.value().count(b"214 2.0.0 See") >= 10_000 - 1
    client.close()


def test_a_client_that_never_reads_is_cut_off_after_its_farewell(clock):
    receiver = RecordingReceiver()
    transport = ReadingTransport()
    client = connect(receiver, clock, transport, idle_timeout=60)
    client.proto.dataReceived(b"HELP\r\n" * 20_000)
    clock.advance(60)
    assert transport.disconnecting  # 421 queued behind the unread replies
    clock.advance(CLOSE_GRACE)
    assert transport.disconnected  # not waiting forever for the client to read
    client.close()


# -- time limits that bytes cannot reset (RFC 5321 §4.5.3.2) -----------------------------------


def test_trickling_a_command_does_not_keep_the_session(clock):
    receiver = RecordingReceiver()
    client = connect(receiver, clock, idle_timeout=300)
    for byte in b"NOOP":
        client.send(bytes([byte]))
        clock.advance(150)  # one byte every half idle timeout
        if client.transport.disconnecting:
            break
    assert client.lines()[-1] == b"421 4.4.2 mx.example.test Idle timeout, closing"
    assert clock.seconds() == 300
    client.close()


def test_each_command_gives_the_next_one_a_full_idle_timeout(clock):
    receiver = RecordingReceiver()
    client = connect(receiver, clock, idle_timeout=300)
    for _ in range(5):
        clock.advance(299)
        assert client.send(b"NOOP\r\n") == [b"250 2.0.0 Ok"]
    clock.advance(299)
    assert not client.transport.disconnecting
    clock.advance(1)
    assert client.transport.disconnecting
    client.close()


def test_trickling_content_is_cut_off_by_the_minimum_rate(clock):
    receiver = RecordingReceiver()
    client = connect(receiver, clock, data_timeout=180, data_min_rate=500)
    client.send(START)
    sent = 0
    while not client.transport.disconnecting and clock.seconds() < 10_000:
        client.proto.dataReceived(b"x" * 10)  # 10 octets every 170 s: never a 3-minute gap
        sent += 10
        clock.advance(170)
    assert client.lines()[-1] == (
        b"421 4.4.2 mx.example.test Timeout: message content too slow, closing"
    )
    assert clock.seconds() <= 180 + 170  # 180 s grace plus a few octets' worth
    assert receiver.sinks[0].discarded
    client.close()


def test_content_that_stops_coming_times_out(clock):
    receiver = RecordingReceiver()
    client = connect(receiver, clock, data_timeout=180, data_min_rate=0)
    client.send(START)
    client.send(b"Subject: x\r\n")
    clock.advance(179)
    assert not client.transport.disconnecting
    clock.advance(1)
    assert client.transport.disconnecting
    client.close()


def test_a_fast_message_is_not_cut_off_by_a_later_pause_within_data_timeout(clock):
    receiver = RecordingReceiver()
    client = connect(receiver, clock, data_timeout=180, data_min_rate=500)
    client.send(START)
    # 100 KB buys 200 s at 500 octets a second, on top of the 180 s of grace.
    client.proto.dataReceived((b"y" * 998 + b"\r\n") * 100)
    clock.advance(170)
    client.proto.dataReceived((b"z" * 998 + b"\r\n") * 100)
    clock.advance(170)
    assert not client.transport.disconnecting
    assert client.send(b".\r\n") == [b"250 2.0.0 Ok: queued as Q1"]
    client.close()


def test_the_session_ends_after_session_time_whatever_it_does(clock):
    receiver = RecordingReceiver()
    client = connect(receiver, clock, idle_timeout=300, session_time=3600)
    client.transport.clear()
    while True:
        clock.advance(100)
        if client.transport.disconnecting:
            break
        client.proto.dataReceived(b"NOOP\r\n")
    assert clock.seconds() == 3600
    assert client.lines()[-1] == b"421 4.4.2 mx.example.test Session time limit reached, closing"
    client.close()
    assert not clock.getDelayedCalls()


def test_one_timer_serves_the_phase_and_the_session_time_and_none_is_cancelled(clock):
    # A reactor timer is about 0.3 KiB, and a cancelled one stays in the reactor's heap
    # for a while: a session keeps one, which never has to fire earlier than planned.
    made = []
    call_later = clock.callLater

    def counting(delay, f, *args, **kwargs):
        made.append(call_later(delay, f, *args, **kwargs))
        return made[-1]

    clock.callLater = counting
    receiver = RecordingReceiver()
    receiver.pending_accepts = []
    client = connect(receiver, clock, idle_timeout=300, data_timeout=180, session_time=3600)
    client.send(START)
    client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")  # the 250 waits: no client deadline
    clock.advance(170)
    receiver.pending_accepts[0].callback(None)
    client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<m@x.test>\r\nDATA\r\nx\r\n")
    assert len(made) == 1 and made[0].getTime() == 180  # woken at most every data_timeout
    clock.advance(10)  # early for every deadline: re-armed
    assert len(made) == 2 and made[1].getTime() == 170 + 180  # the content's deadline
    assert not [call for call in made if call.cancelled]
    assert len(clock.getDelayedCalls()) == 1
    client.close()
    assert not clock.getDelayedCalls()


def test_session_time_never_interrupts_a_message_being_made_durable(clock):
    receiver = RecordingReceiver()
    receiver.pending_accepts = []
    client = connect(receiver, clock, session_time=60)
    client.send(START)
    client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    clock.advance(61)
    assert not client.transport.disconnecting
    client.transport.clear()
    receiver.pending_accepts[0].callback(None)
    assert client.lines() == [
        b"250 2.0.0 Ok: queued as Q1",
        b"421 4.4.2 mx.example.test Session time limit reached, closing",
    ]
    client.close()


def test_time_spent_waiting_for_the_spool_does_not_count_against_the_client(clock):
    # The server stopped reading while its disk caught up: that wait is not the
    # client's slowness, so neither data_timeout nor data_min_rate counts it.
    receiver = RecordingReceiver()
    client = connect(receiver, clock, data_timeout=180, data_min_rate=500)
    client.send(START)
    sink = receiver.sinks[0]
    sink.wait = Deferred()
    client.send(b"Subject: slow disk\r\n\r\n")
    clock.advance(1000)  # the disk takes its time
    assert not client.transport.disconnecting
    wait, sink.wait = sink.wait, None
    wait.callback(None)
    clock.advance(100)
    assert not client.transport.disconnecting
    assert client.send(b"body\r\n.\r\n") == [b"250 2.0.0 Ok: queued as Q1"]
    client.close()
