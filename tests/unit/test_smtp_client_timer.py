"""The SMTP client's one timer: moved from reply to reply and kept across transactions."""

from __future__ import annotations

from test_smtp_client_bdat import Session

PLAIN = ("PIPELINING", "8BITMIME")


def _deliver(s: Session) -> None:
    done = s.send()
    if s.said() == b"RSET\r\n":  # a connection used before
        s.reply("250 2.0.0 Ok")
        s.said()
    s.reply("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead")
    s.said()
    s.reply("250 2.0.0 queued")
    (result,) = done
    assert result.error is None and [r.reply.code for r in result.per_recipient()] == [250]


def test_transactions_on_one_connection_share_one_timer():
    s = Session(PLAIN)
    _deliver(s)
    (timer,) = s.clock.getDelayedCalls()
    for _ in range(3):
        _deliver(s)
        assert s.clock.getDelayedCalls() == [timer]


def test_the_timer_of_an_idle_connection_breaks_nothing():
    s = Session(PLAIN)
    _deliver(s)
    s.clock.advance(s.client.settings.timeouts.mail + 3600)
    assert s.client.usable and not s.transport.disconnecting
    assert s.clock.getDelayedCalls() == []
    _deliver(s)


def test_a_closed_connection_leaves_no_timer():
    s = Session(PLAIN)
    _deliver(s)
    s.client.connectionLost(None)
    assert [call for call in s.clock.getDelayedCalls() if call.active()] == []
