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
    # doc/conformance.rst 3885-P2: lines past the limit get 500 5.5.2; pipelined lines after it
    # are kept.
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


# -- streaming (bounded memory) and line ends (RFC 5321 §2.3.8) ---------------------------


def stream(chunks, **options):
    """Feed chunks, taking the decoded content after each: (content, result)."""
    reader = DataReader(10**9, **options)
    out = []
    for chunk in chunks:
        result = reader.feed(chunk)
        out.append(reader.take() if result is None else result.content)
        if result is not None:
            return b"".join(out), result
    return b"".join(out), None


def test_reader_holds_no_more_than_one_line_between_takes():
    # 34 MB of "ab\r\n" used to become one Python object per line; now each feed is
    # decoded as a whole and only the unfinished last line stays behind.
    reader = DataReader(10**9)
    chunk = b"ab\r\n" * 16384 + b"a"
    for _ in range(20):
        assert reader.feed(chunk) is None
        assert len(reader.take()) > 0
        assert reader._out == [] and len(reader._tail) <= 999
    result = reader.feed(b"b\r\n.\r\n")
    assert result is not None and result.content == b"ab\r\n"


def test_over_size_content_is_not_kept():
    reader = DataReader(1000)
    reader.feed(b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n")
    assert reader.refused and reader.size_exceeded
    assert reader.take() == b""
    for _ in range(100):
        assert reader.feed(b"z" * 500 + b"\r\n") is None
        assert reader.take() == b"" and reader._out == []
    result = reader.feed(b".\r\n")
    assert result.size_exceeded and result.content == b""


def test_bare_cr_and_lf_become_crlf():
    content, result = stream([b"Subject: x\r\n\r\nhello\r.\r\nMAIL FROM:<a@x.test>\nNEXT\r\n.\r\n"])
    assert content == b"Subject: x\r\n\r\nhello\r\n.\r\nMAIL FROM:<a@x.test>\r\nNEXT\r\n"
    assert result.bare_line_ends and not result.size_exceeded


def test_bare_line_ends_can_be_refused():
    content, result = stream([b"hello\r.\r\n", b".\r\n"], reject_bare_line_ends=True)
    assert result.bare_line_ends and content == b""


def test_smuggled_ends_of_data_do_not_end_data():
    # Only <CRLF>.<CRLF> ends DATA; the variants a lenient server might take do not.
    for fake in [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\n", b"\r\n.\n", b"\r\n.\r"]:
        reader = DataReader(10**6)
        assert reader.feed(b"a" + fake + b"MAIL FROM:<x@y>\r\n") is None, fake
        assert reader.feed(b".\r\n") is not None


@settings(max_examples=300)
@given(
    content=st.binary(max_size=300).map(
        lambda b: b.replace(b"\x00", b"\r").replace(b"\x01", b"\n")
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_decoded_content_has_only_crlf_line_ends_whatever_the_chunking(content, cuts):
    wire = content.replace(b"\r\n.", b"\r\n..")
    if wire.startswith(b"."):
        wire = b"." + wire
    wire += b"\r\n.\r\n"
    points = sorted({min(c, len(wire)) for c in cuts})
    chunks = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    decoded, result = stream(chunks)
    if result is None or result.leftover:
        return  # the content itself held the terminator: a different message
    assert decoded.count(b"\r") == decoded.count(b"\n") == decoded.count(b"\r\n")
    assert decoded == stream([wire])[0]
