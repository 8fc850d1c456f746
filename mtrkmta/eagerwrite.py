"""Writing to a plain TCP connection at once when nothing waits in its buffer."""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def write_now(transport: Any, data: bytes) -> None:
    """Send ``data`` to the socket now where that keeps order and flow control, else
    hand it to ``transport.write`` as usual.

    Twisted's TCP transport buffers every write until the reactor's next turn: it turns
    write interest on (one ``epoll_ctl``), waits for the poll to say writable, sends,
    and turns write interest off again (another ``epoll_ctl``). A reply of a few dozen
    octets costs that whole round. When the transport is a plain TCP connection (not
    TLS), nothing is buffered, no pull producer waits for the buffer to drain and the
    connection is not closing, the bytes go to the socket at once: one ``send``. What
    the socket does not take, or every byte when the send fails, goes to
    ``transport.write``, which buffers it and finds any error on its next turn exactly
    as before. Anything that is not a plain TCP connection (TLS, a test's
    ``StringTransport``) gets ``transport.write`` unchanged.
    """
    if (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
        and (transport.producer is None or transport.streamingProducer)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)
