"""Tests for mtrkmta.smtp.reply: rendering, SMTPError and the incremental reply reader."""

from __future__ import annotations

import pickle

import pytest

from mtrkmta.smtp.reply import MalformedReply, Reply, ReplyReader, SMTPError


def feed_all(reader: ReplyReader, *lines: bytes) -> list[Reply | None]:
    return [reader.feed(line) for line in lines]


class TestRender:
    def test_single_line_with_enhanced_code(self):
        assert Reply(250, "2.1.0", ("Ok",)).render() == b"250 2.1.0 Ok\r\n"

    def test_single_line_without_enhanced_code(self):
        assert Reply(220, None, ("mx.example ESMTP",)).render() == b"220 mx.example ESMTP\r\n"

    def test_multi_line_repeats_enhanced_code_on_every_line(self):
        reply = Reply(501, "5.5.4", ("first", "second", "third"))
        assert reply.render() == (b"501-5.5.4 first\r\n501-5.5.4 second\r\n501 5.5.4 third\r\n")

    def test_multi_line_without_enhanced_code(self):
        reply = Reply(250, None, ("mx.example", "PIPELINING", "DSN"))
        assert reply.render() == b"250-mx.example\r\n250-PIPELINING\r\n250 DSN\r\n"

    def test_empty_lines_render_bare_code(self):
        assert Reply(250).render() == b"250\r\n"
        assert Reply(250, None, ("",)).render() == b"250\r\n"
        assert Reply(250, None, ("", "")).render() == b"250-\r\n250\r\n"

    def test_empty_text_with_enhanced_code(self):
        assert Reply(250, "2.0.0", ("",)).render() == b"250 2.0.0\r\n"

    def test_utf8_text(self):
        assert Reply(250, None, ("h\u00e9",)).render() == "250 h\u00e9\r\n".encode()

    def test_lines_list_becomes_tuple(self):
        reply = Reply(250, None, ["a", "b"])  # type: ignore[arg-type]
        assert reply.lines == ("a", "b")

    @pytest.mark.parametrize("code", [0, 199, 600, 1000])
    def test_code_out_of_range(self, code):
        with pytest.raises(ValueError):
            Reply(code, None, ("x",))

    @pytest.mark.parametrize("enhanced", ["5.5", "5.5.4.1", "x.y.z", "3.0.0", "5.1234.0", ""])
    def test_malformed_enhanced(self, enhanced):
        with pytest.raises(ValueError):
            Reply(501, enhanced, ("x",))

    def test_enhanced_class_must_match_code(self):
        with pytest.raises(ValueError):
            Reply(501, "4.5.4", ("x",))

    @pytest.mark.parametrize("line", ["a\r\nb", "a\nb", "a\r"])
    def test_line_with_cr_or_lf_rejected(self, line):
        with pytest.raises(ValueError):
            Reply(250, None, (line,))

    def test_classification(self):
        assert Reply(250).is_positive and not Reply(250).is_transient
        assert Reply(354).is_intermediate
        assert Reply(451).is_transient and not Reply(451).is_permanent
        assert Reply(550).is_permanent and not Reply(550).is_positive

    def test_text_joins_lines(self):
        assert Reply(250, None, ("a", "b")).text == "a\nb"


class TestSMTPError:
    def test_carries_reply(self):
        error = SMTPError(501, "5.5.4", "Invalid MTRK parameter")
        assert error.reply == Reply(501, "5.5.4", ("Invalid MTRK parameter",))
        assert str(error) == "501 5.5.4 Invalid MTRK parameter"

    def test_from_reply(self):
        reply = Reply(555, "5.5.4", ("MTRK not supported",))
        assert SMTPError.from_reply(reply).reply == reply

    def test_without_enhanced_or_text(self):
        assert str(SMTPError(500, None)) == "500"

    def test_pickles(self):
        error = pickle.loads(pickle.dumps(SMTPError(501, "5.1.7", "a", "b")))
        assert error.reply == Reply(501, "5.1.7", ("a", "b"))


class TestReplyReader:
    def test_single_line(self):
        assert ReplyReader().feed(b"250 2.1.0 Ok\r\n") == Reply(250, "2.1.0", ("Ok",))

    def test_line_without_crlf(self):
        assert ReplyReader().feed(b"354 go ahead") == Reply(354, None, ("go ahead",))

    def test_bare_lf(self):
        assert ReplyReader().feed(b"221 bye\n") == Reply(221, None, ("bye",))

    def test_multi_line_returns_none_until_last(self):
        reader = ReplyReader()
        results = feed_all(reader, b"250-mx.example\r\n", b"250-PIPELINING\r\n", b"250 MTRK\r\n")
        assert results[:2] == [None, None]
        assert results[2] == Reply(250, None, ("mx.example", "PIPELINING", "MTRK"))
        assert not reader.pending

    def test_pending(self):
        reader = ReplyReader()
        reader.feed(b"250-a")
        assert reader.pending

    def test_smtp_sink_empty_last_line(self):
        # smtp-sink ends its replies with "250 " (code, space, nothing).
        reader = ReplyReader()
        assert reader.feed(b"250-smtp-sink\r\n") is None
        assert reader.feed(b"250 \r\n") == Reply(250, None, ("smtp-sink", ""))
        assert ReplyReader().feed(b"250 ") == Reply(250, None, ("",))

    def test_bare_code(self):
        assert ReplyReader().feed(b"250\r\n") == Reply(250, None, ("",))

    def test_extracts_enhanced_code_from_every_line(self):
        reader = ReplyReader()
        reader.feed(b"550-5.1.1 No such user\r\n")
        reply = reader.feed(b"550 5.1.1 Try again\r\n")
        assert reply == Reply(550, "5.1.1", ("No such user", "Try again"))

    def test_enhanced_code_only_on_first_line(self):
        reader = ReplyReader()
        reader.feed(b"550-5.1.1 No such user\r\n")
        assert reader.feed(b"550 see docs\r\n") == Reply(550, "5.1.1", ("No such user", "see docs"))

    def test_enhanced_code_alone(self):
        assert ReplyReader().feed(b"250 2.0.0") == Reply(250, "2.0.0", ("",))

    def test_enhanced_code_class_mismatch_kept_as_text(self):
        assert ReplyReader().feed(b"250 5.0.0 odd") == Reply(250, None, ("5.0.0 odd",))

    def test_version_number_is_not_an_enhanced_code(self):
        assert ReplyReader().feed(b"220 2.0.0beta ready") == Reply(220, None, ("2.0.0beta ready",))

    def test_round_trip_of_render(self):
        original = Reply(452, "4.5.3", ("Too many", "recipients"))
        reader = ReplyReader()
        replies = [reader.feed(line + b"\r\n") for line in original.render().split(b"\r\n")[:-1]]
        assert replies[-1] == original

    def test_invalid_utf8_is_replaced_not_fatal(self):
        reply = ReplyReader().feed(b"250 caf\xe9")
        assert reply is not None and reply.lines == ("caf\ufffd",)

    @pytest.mark.parametrize(
        "line",
        [b"", b"25", b"abc ok", b"2500 ok", b"250x ok", b"150 preliminary", b"650 x", b"250 a\rb"],
    )
    def test_malformed_line(self, line):
        with pytest.raises(MalformedReply):
            ReplyReader().feed(line)

    def test_code_change_mid_reply(self):
        reader = ReplyReader()
        reader.feed(b"250-first")
        with pytest.raises(MalformedReply):
            reader.feed(b"251 second")
        assert not reader.pending
        assert reader.feed(b"221 bye") == Reply(221, None, ("bye",))

    def test_malformed_line_discards_partial_reply(self):
        reader = ReplyReader()
        reader.feed(b"250-first")
        with pytest.raises(MalformedReply):
            reader.feed(b"garbage")
        assert reader.feed(b"250 ok") == Reply(250, None, ("ok",))

    def test_too_many_lines(self):
        reader = ReplyReader(max_lines=3)
        feed_all(reader, b"250-a", b"250-b", b"250-c")
        with pytest.raises(MalformedReply):
            reader.feed(b"250 d")

    def test_reset(self):
        reader = ReplyReader()
        reader.feed(b"250-a")
        reader.reset()
        assert reader.feed(b"354 go") == Reply(354, None, ("go",))

    def test_malformed_reply_is_value_error(self):
        assert issubclass(MalformedReply, ValueError)
