"""The sans-IO framers: command lines and DATA content."""

from hypothesis import given, settings
from hypothesis import strategies as st

from mtrkmta.smtp.framing import OVERLONG, DataReader, LineFramer


def feed_all(framer, chunks):
    events = []
    for chunk in chunks:
        events.extend(framer.feed(chunk))
    return events


def test_lines_split_across_chunks():
    framer = LineFramer(100)
    assert feed_all(framer, [b"EHLO a", b"\r", b"\nNOOP\r\nQU", b"IT\r\n"]) == [
        b"EHLO a",
        b"NOOP",
        b"QUIT",
    ]


def test_overlong_line_is_reported_once_and_later_lines_survive():
    # CHECKLIST 1.2.4: lines past the limit get 500 5.5.2; pipelined lines after it are kept.
    framer = LineFramer(10)
    events = feed_all(framer, [b"X" * 25, b"Y" * 25, b"\r\nNOOP\r\n"])
    assert events == [OVERLONG, b"NOOP"]


def test_line_at_exact_limit_is_accepted():
    framer = LineFramer(10)
    assert framer.feed(b"A" * 10 + b"\r\n") == [b"A" * 10]
    assert framer.feed(b"A" * 11 + b"\r\n") == [OVERLONG]


def test_reset_discards_buffered_partial_line():
    framer = LineFramer(100)
    assert framer.feed(b"STARTTLS\r\nMAIL FROM:<x") == [b"STARTTLS"]
    framer.reset()
    assert framer.feed(b"EHLO b\r\n") == [b"EHLO b"]


def read(chunks, max_size=10_000):
    """Feed chunks until DATA ends; the chunks after that are appended to the leftover."""
    reader = DataReader(max_size)
    for index, chunk in enumerate(chunks):
        result = reader.feed(chunk)
        if result is not None:
            result.leftover += b"".join(chunks[index + 1 :])
            return result
    return None


def test_data_dot_unstuffing_and_leftover():
    result = read([b"Subject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n"])
    assert result.content == b"Subject: x\r\n\r\n.leading dot\r\n"
    assert result.leftover == b"QUIT\r\n"
    assert not result.line_too_long


def test_data_terminator_split_over_chunks():
    result = read([b"a\r", b"\n.", b"\r", b"\n"])
    assert result.content == b"a\r\n"


def test_bare_lf_dot_does_not_end_data():
    # SMTP smuggling: only <CRLF>.<CRLF> ends DATA.
    reader = DataReader(10_000)
    assert reader.feed(b"a\n.\nMAIL FROM:<evil@x>\r\n") is None
    result = reader.feed(b".\r\n")
    assert result is not None
    assert b"MAIL FROM:<evil@x>" in result.content
    assert result.content.count(b"\r\n") == 3  # bare LFs normalised to CRLF


def test_overlong_data_line_is_read_to_the_end_not_ended_early():
    body = b"A" * 5000 + b"\r\n.\r\n"
    reader = DataReader(100_000)
    # the long line arrives in pieces; DATA must not end before the real terminator
    assert reader.feed(body[:2000]) is None
    assert reader.feed(body[2000:4000]) is None
    result = reader.feed(body[4000:])
    assert result is not None and result.line_too_long
    assert result.leftover == b""


def test_size_limit_counts_but_does_not_keep():
    result = read([b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n.\r\n"], max_size=1000)
    assert result.size_exceeded
    assert result.content == b""
    assert result.size == 1804


def test_received_headers_counted_in_header_only():
    message = b"Received: a\r\nreceived: b\r\nSubject: s\r\n\r\nReceived: body\r\n.\r\n"
    assert read([message]).received_headers == 2


def test_empty_message():
    result = read([b".\r\n"])
    assert result.content == b""
    assert result.size == 0


@settings(max_examples=200)
@given(
    lines=st.lists(st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
)
def test_stuffed_content_round_trips_whatever_the_chunking(lines, cuts):
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    wire += b".\r\nNEXT\r\n"
    points = sorted({min(c, len(wire)) for c in cuts})
    chunks = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    result = read(chunks, max_size=10**9)
    assert result is not None
    assert result.content == b"".join(line + b"\r\n" for line in lines)
    assert result.leftover == b"NEXT\r\n"


def test_take_buffer_returns_the_bytes_after_a_line_exactly():
    # DATA pipelined with content: a bare LF framed as a command line end must not
    # turn into a CRLF when the bytes move to the DataReader (no SMTP smuggling).
    framer = LineFramer(100)
    framer.push(b"DATA\r\nA\n.\nMAIL FROM:<x@y>\r\n")
    assert framer.next_line() == b"DATA"
    assert framer.take_buffer() == b"A\n.\nMAIL FROM:<x@y>\r\n"
    assert framer.next_line() is None


def test_partial_line_buffer_is_bounded():
    framer = LineFramer(10)
    framer.push(b"x" * 100_000)
    assert framer.next_line() is None
    assert len(framer.take_buffer()) <= 1
