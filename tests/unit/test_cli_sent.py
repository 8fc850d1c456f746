"""`mtrkmta sent`, the Subject `mtrkmta send` saves, and `mtrkmta track --pick N`."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from test_cli_send_track import BASE, SECRET_B64, WHEN, SMTPScript, record
from twisted.python import usage

from mtrkmta.cli import send, sent, track
from mtrkmta.cli.main import main as mtrkmta_main
from mtrkmta.originator import (
    SUBJECT_LIMIT,
    append_record,
    last_record,
    load_secrets,
    message_subject,
    read_records,
)


def run_sent(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = sent.main(list(args), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def secrets_with(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "sent.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def subject_record(number: int, subject: str, sent_at: str) -> str:
    return replace(record(number), subject=subject, sent_at=sent_at).to_json()


# -- the Subject saved at send time ---


def test_send_saves_the_decoded_subject(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    message = b"From: a@example.test\r\nSubject: =?utf-8?q?Caf=C3=A9?=\r\n report\r\n\r\nbody\r\n"
    status = send.main(
        [*BASE, "--to", "bob@example.test", "--secrets", str(tmp_path / "sent.jsonl")],
        stdin=io.BytesIO(message),
        out=out,
        err=err,
        now=lambda: WHEN,
        smtp_class=SMTPScript().smtp_class(),
    )
    assert status == 0, err.getvalue()
    assert last_record(tmp_path / "sent.jsonl").subject == "Café report"


@pytest.mark.parametrize(
    "header, subject",
    [
        # RFC 2047 §2, §6.2: encoded-words decoded; whitespace between adjacent ones dropped.
        (b"Subject: =?utf-8?q?Caf=C3=A9?= =?utf-8?b?4oKs?=", "Café€"),
        (b"Subject: =?ISO-8859-1?Q?Andr=E9?= Pirard", "André Pirard"),
        (b"Subject: caf\xc3\xa9 in raw UTF-8", "café in raw UTF-8"),  # RFC 6532 §3.2
        (b"Subject: folded\r\n  line", "folded  line"),  # RFC 5322 §2.2.3: unfolding
        (b"Subject: =?nosuchcharset?q?x?=", "=?nosuchcharset?q?x?="),  # shown as written
        (b"Subject: \x1b[31mred\x07", "\\x1b[31mred\\x07"),  # control characters escaped
        (b"Subject: =?utf-8?q?a=E2=80=AEb?=", "a\\u202eb"),  # a bidi override too
        (b"To: bob@example.test", ""),
    ],
)
def test_message_subject(header, subject):
    assert message_subject(header + b"\r\n\r\nSubject: not a header\r\n") == subject


def test_a_long_subject_is_cut_to_the_limit():
    text = message_subject(b"Subject: " + b"x" * 500 + b"\r\n\r\n")
    assert len(text) == SUBJECT_LIMIT == 200 and text == "x" * 199 + "\u2026"
    # An escape is never cut in half.
    text = message_subject(b"Subject: " + b"x" * 197 + b"\x01\x02\r\n\r\n")
    assert text == "x" * 197 + "\u2026"


def test_a_record_written_before_subjects_were_kept_still_loads(tmp_path):
    old = json.loads(record(1).to_json())
    del old["subject"]
    path = secrets_with(tmp_path, json.dumps(old))
    (loaded,) = read_records(path)
    assert loaded == record(1) and loaded.subject == ""


# -- mtrkmta sent ---


def test_sent_lists_newest_first_in_the_local_time_zone(tmp_path, time_zone):
    time_zone("XYZ-05:30")  # POSIX TZ: UTC+05:30
    path = secrets_with(
        tmp_path,
        subject_record(1, "First", "2026-03-01T12:00:00+00:00"),
        subject_record(2, "", "2026-03-02T08:15:00+00:00"),
    )
    status, out, err = run_sent("--secrets", str(path))
    assert (status, err) == (0, "")
    assert out == (
        "1  2026-03-02 13:45:00 +0530  (no subject)\n"
        "   to bob@example.test\n"
        f"   mtqp://mx.example.test/track/2@client.example.test/{SECRET_B64}\n"
        "2  2026-03-01 17:30:00 +0530  First\n"
        "   to bob@example.test\n"
        f"   mtqp://mx.example.test/track/1@client.example.test/{SECRET_B64}\n"
    )


def test_sent_n_and_json(tmp_path, time_zone):
    time_zone("UTC")
    path = secrets_with(
        tmp_path,
        subject_record(1, "First", "2026-03-01T12:00:00+00:00"),
        subject_record(2, "Second", "2026-03-02T12:00:00+00:00"),
        subject_record(3, "Third", "2026-03-03T12:00:00+00:00"),
    )
    status, out, _ = run_sent("-n", "2", "--secrets", str(path))
    assert status == 0
    assert [line.split("  ")[-1] for line in out.splitlines()[::3]] == ["Third", "Second"]
    status, out, _ = run_sent("--json", "-n", "1", "--secrets", str(path))
    assert status == 0
    assert json.loads(out) == [
        {
            "number": 1,
            "sent_at": "2026-03-03T12:00:00+00:00",
            "subject": "Third",
            "sender": "alice@example.test",
            "recipients": ["bob@example.test"],
            "envid": "3@client.example.test",
            "server": "127.0.0.1:25",
            "mtqp": f"mtqp://mx.example.test/track/3@client.example.test/{SECRET_B64}",
        }
    ]


def test_a_damaged_line_is_named_and_the_others_listed(tmp_path):
    path = secrets_with(
        tmp_path,
        subject_record(1, "First", "2026-03-01T12:00:00+00:00"),
        '{"envid": "cut off',
        "",
        subject_record(3, "Third", "2026-03-03T12:00:00+00:00"),
    )
    with path.open("ab") as file:
        file.write(b"\xff\xfe not UTF-8\n")
    assert load_secrets(path).damaged == (2, 5)
    status, out, err = run_sent("--secrets", str(path))
    assert status == 1
    assert err == (
        f"mtrkmta: {path} line 2: not a record of `mtrkmta send`, skipped "
        "(repair or delete the line)\n"
        f"mtrkmta: {path} line 5: not a record of `mtrkmta send`, skipped "
        "(repair or delete the line)\n"
    )
    assert "Third" in out.splitlines()[0] and "First" in out.splitlines()[3]


def test_sent_without_a_secrets_file(tmp_path):
    status, out, err = run_sent("--secrets", str(tmp_path / "none.jsonl"))
    assert (status, out) == (1, "")
    assert err == f"mtrkmta: {tmp_path / 'none.jsonl'}: no such file (send a message first)\n"


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_sent_n_is_a_positive_number(tmp_path, value):
    status, out, err = run_sent("-n", value, "--secrets", str(tmp_path / "sent.jsonl"))
    assert (status, out) == (2, "")
    assert err.startswith("mtrkmta sent: ")


def test_sent_is_an_mtrkmta_command(tmp_path, capsys):
    path = secrets_with(tmp_path, subject_record(1, "Hello", "2026-03-01T12:00:00+00:00"))
    assert mtrkmta_main(["sent", "--secrets", str(path)]) == 0
    assert "Hello\n" in capsys.readouterr().out


# -- mtrkmta track --pick N ---


def parse_track(*args: str) -> track.TrackOptions:
    options = track.TrackOptions()
    options.parseOptions(args)
    return options


def test_track_pick_tracks_the_nth_of_the_list(tmp_path):
    path = tmp_path / "sent.jsonl"
    for number in (1, 2, 3):
        append_record(path, record(number))
    picked = parse_track("--pick", "2", "--secrets", str(path))
    assert picked["envid"] == "2@client.example.test"
    assert parse_track("--pick", "1", "--secrets", str(path))["envid"] == "3@client.example.test"
    assert parse_track("--last", "--secrets", str(path))["envid"] == "3@client.example.test"


@pytest.mark.parametrize(
    "args, problem",
    [
        (("--pick", "4"), "no message number 4; it records 3 (see `mtrkmta sent`)"),
        (("--pick", "0"), "--pick is a number above 0, not '0'"),
        (("--pick", "x"), "--pick is a number above 0, not 'x'"),
        (("--pick", "1", "--last"), "--last and --pick exclude each other (--last is --pick 1)"),
        (("--pick", "1", "mtqp://a/track/e/s"), "--pick takes no URI, --server, ENVID or SECRET"),
    ],
)
def test_track_pick_errors(tmp_path, args, problem):
    path = tmp_path / "sent.jsonl"
    for number in (1, 2, 3):
        append_record(path, record(number))
    with pytest.raises(usage.UsageError) as raised:
        parse_track(*args, "--secrets", str(path))
    assert str(raised.value).endswith(problem)
