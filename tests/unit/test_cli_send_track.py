"""`mtrkmta send` / `mtrkmta track` and the MTQP client logic, without a network
(RFC 3885 §3.1-§3.2, §4.2; RFC 3887 §2, §6, §9, RFC 3886 §3.3.3)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import smtplib
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSServerError
from zope.interface import implementer

from mtrkmta.cli import send, track
from mtrkmta.cli.main import main as mtrkmta_main
from mtrkmta.mtqp.client import (
    Hop,
    LocateError,
    Locator,
    MTQPClientProtocol,
    Target,
    Trace,
    TrackingClient,
    TrackingError,
    order_srv,
    recipient_paths,
)
from mtrkmta.mtqp.protocol import Response, StartTLS, Track
from mtrkmta.mtqp.uri import parse_uri
from mtrkmta.originator import (
    SECRET_BYTES,
    SentRecord,
    TrackingSecret,
    append_record,
    default_secrets_path,
    last_record,
    mail_options,
    new_tracking,
    rcpt_options,
    read_records,
    tracking_uri,
)
from mtrkmta.tracking.status import RecipientStatus, TrackingReport, TypedValue

# Our own vector for RFC 3885 §3.1 (not an RFC 3887 example: those use a 64-bit secret and a
# SHA1 value that matches no input).
VECTOR_SECRET = bytes(range(16))
# 27 characters, no "=" padding: an esmtp-value excludes "=" (RFC 5321 §4.1.2).
VECTOR_CERTIFIER_B64 = "VheLhqV/rCKJmplkGFwsyW59pYk"
ENVID = "k2J9@client.example.test"
SECRET_B64 = base64.b64encode(bytes(range(32))).decode()
WHEN = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


# -- originator: secret, ENVID, parameters (RFC 3885 §3.1-§3.2, §4.2) ---


def test_new_tracking_is_random_and_unique():
    # RFC 3885 §3.1, §4.2 (MUST): A random, 128..1024 bits, never reused; §3.2: ENVID never reused.
    first, second = new_tracking("client.example.test"), new_tracking("client.example.test")
    assert len(first.secret) == SECRET_BYTES == 32
    assert first.secret != second.secret and first.envid != second.envid
    local, _, domain = first.envid.partition("@")
    assert domain == "client.example.test" and len(local) >= 20
    assert first.certifier == hashlib.sha1(first.secret).digest()  # RFC 3885 §3.1: B = SHA1(A)


def test_long_fqdn_is_hashed_into_the_envid():
    envid = new_tracking("x" * 60 + ".example.test" * 5).envid
    assert len(envid) <= 100 and "example" not in envid


def test_mail_options_carry_envid_and_the_certifier_of_the_vector():
    # RFC 3885 §3.1: base64(SHA1(A)) is sent, never A.
    tracking = TrackingSecret(VECTOR_SECRET, "a+b=c@client.example.test")
    assert mail_options(tracking, timeout=3600, ret="hdrs") == [
        "ENVID=a+2Bb+3Dc@client.example.test",
        f"MTRK={VECTOR_CERTIFIER_B64}:3600",
        "RET=HDRS",
    ]
    assert mail_options(tracking)[1] == f"MTRK={VECTOR_CERTIFIER_B64}"
    assert base64.b64encode(VECTOR_SECRET).decode() not in " ".join(mail_options(tracking))
    with pytest.raises(ValueError):
        mail_options(tracking, ret="ALL")


@pytest.mark.parametrize(
    ("notify", "expected"),
    [
        (None, []),
        (["never"], ["NOTIFY=NEVER"]),
        (["success", "FAILURE", "success"], ["NOTIFY=SUCCESS,FAILURE"]),
    ],
)
def test_rcpt_options(notify, expected):
    assert rcpt_options(notify) == expected


@pytest.mark.parametrize("notify", [["NEVER", "SUCCESS"], ["SOMETIMES"], [" "]])
def test_bad_notify(notify):
    with pytest.raises(ValueError):
        rcpt_options(notify)


def test_tracking_uri_round_trips():
    # RFC 3887 §9: %XX for "/" in the secret; the port only when not 1038.
    tracking = TrackingSecret(b"\xff" * 32, "a/b@client.example.test")
    uri = tracking_uri(tracking, "mx.example.test", 1038)
    assert "/" not in uri.split("/track/", 1)[1].replace("%2F", "").split("/", 1)[1]
    parsed = parse_uri(uri)
    assert (parsed.host, parsed.port, parsed.secret) == (
        "mx.example.test",
        1038,
        tracking.secret_text,
    )
    assert parsed.track().envid == "a/b@client.example.test"
    assert parse_uri(tracking_uri(tracking, "127.0.0.1", 4242)).port == 4242


# -- the secrets file ---


def record(number: int = 1) -> SentRecord:
    return SentRecord(
        envid=f"{number}@client.example.test",
        secret=SECRET_B64,
        server="127.0.0.1:25",
        mtqp=f"mtqp://mx.example.test/track/{number}@client.example.test/{SECRET_B64}",
        sender="alice@example.test",
        recipients=("bob@example.test",),
        sent_at="2026-03-01T12:00:00+00:00",
    )


def test_secrets_file_is_private_json_lines(tmp_path):
    path = tmp_path / "new" / "dir" / "sent.jsonl"
    append_record(path, record(1))
    append_record(path, record(2))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    lines = path.read_text().splitlines()
    assert [json.loads(line)["envid"] for line in lines] == [
        "1@client.example.test",
        "2@client.example.test",
    ]
    assert json.loads(lines[0])["secret"] == SECRET_B64
    assert last_record(path) == record(2)


def test_secrets_file_permissions_are_tightened(tmp_path):
    path = tmp_path / "sent.jsonl"
    path.write_text("")
    path.chmod(0o644)
    append_record(path, record())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_unreadable_lines_are_skipped(tmp_path):
    path = tmp_path / "sent.jsonl"
    path.write_text(record(1).to_json() + "\nnot json\n[1]\n{}\n\n" + record(3).to_json() + "\n")
    assert read_records(path) == [record(1), record(3)]


def test_default_secrets_path():
    assert default_secrets_path({"HOME": "/home/u"}) == Path(
        "/home/u/.local/share/mtrkmta/sent.jsonl"
    )
    assert default_secrets_path({"HOME": "/home/u", "XDG_DATA_HOME": "/data"}) == Path(
        "/data/mtrkmta/sent.jsonl"
    )
    assert default_secrets_path({"HOME": "/h", "XDG_DATA_HOME": "relative"}) == Path(
        "/h/.local/share/mtrkmta/sent.jsonl"
    )


# -- mtrkmta send ---


class SMTPScript:
    """What the fake server offers and refuses, and what `mtrkmta send` asked of smtplib."""

    def __init__(self) -> None:
        self.extensions = {"mtrk", "dsn"}
        self.refuse: dict[str, tuple[int, bytes]] = {}
        self.sent: list[dict[str, Any]] = []

    def smtp_class(self) -> type:
        script = self

        class FakeSMTP:
            def __init__(self, host: str, port: int, local_hostname: str, timeout: float):
                self.connection = (host, port, local_hostname)

            def __enter__(self) -> FakeSMTP:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def ehlo(self) -> tuple[int, bytes]:
                return 250, b"ok"

            def has_extn(self, name: str) -> bool:
                return name.lower() in script.extensions

            def sendmail(self, sender, recipients, content, mail_options, rcpt_options):
                script.sent.append(
                    {
                        "connection": self.connection,
                        "sender": sender,
                        "recipients": recipients,
                        "content": content,
                        "mail": mail_options,
                        "rcpt": rcpt_options,
                    }
                )
                refused = {r: script.refuse[r] for r in recipients if r in script.refuse}
                if len(refused) == len(recipients):
                    raise smtplib.SMTPRecipientsRefused(refused)
                return refused

        return FakeSMTP


@pytest.fixture
def fake_smtp():
    return SMTPScript()


def run_send(tmp_path: Path, script: SMTPScript, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = send.main(
        [*args, "--secrets", str(tmp_path / "sent.jsonl")],
        stdin=io.BytesIO(b"Subject: x\r\n\r\nbody\r\n"),
        out=out,
        err=err,
        now=lambda: WHEN,
        smtp_class=script.smtp_class(),
    )
    return status, out.getvalue(), err.getvalue()


BASE = ("--server", "mail.example.test:587", "--from", "alice@example.test")


def test_send_submits_with_mtrk_and_records_the_secret(tmp_path, fake_smtp):
    status, out, err = run_send(
        tmp_path,
        fake_smtp,
        *BASE,
        "--to",
        "bob@example.test",
        "--to",
        "carol@example.test",
        "--timeout",
        "86400",
        "--notify",
        "SUCCESS,FAILURE",
        "--ret",
        "HDRS",
        "--hostname",
        "client.example.test",
    )
    assert status == 0, err
    (sent,) = fake_smtp.sent
    assert sent["connection"] == ("mail.example.test", 587, "client.example.test")
    assert sent["recipients"] == ["bob@example.test", "carol@example.test"]
    assert sent["rcpt"] == ["NOTIFY=SUCCESS,FAILURE"]
    saved = last_record(tmp_path / "sent.jsonl")
    secret = base64.b64decode(saved.secret)
    envid, mtrk, ret = sent["mail"]
    assert envid == f"ENVID={saved.envid}" and saved.envid.endswith("@client.example.test")
    certifier = base64.b64encode(hashlib.sha1(secret).digest()).decode().rstrip("=")
    assert len(certifier) == 27  # unpadded: RFC 3885 §1 base64, RFC 5321 §4.1.2
    assert mtrk == f"MTRK={certifier}:86400" and ret == "RET=HDRS"
    assert (saved.server, saved.sent_at) == ("mail.example.test:587", WHEN.isoformat())
    assert saved.recipients == ("bob@example.test", "carol@example.test")
    # The URI on stdout points at the server's host on the MTQP port (1038 by default).
    assert out.strip() == saved.mtqp
    uri = parse_uri(saved.mtqp)
    assert (uri.host, uri.port, uri.secret) == ("mail.example.test", 1038, saved.secret)
    assert saved.secret not in err


def test_send_refuses_a_server_without_mtrk(tmp_path, fake_smtp):
    fake_smtp.extensions = {"dsn"}
    status, out, err = run_send(tmp_path, fake_smtp, *BASE, "--to", "bob@example.test")
    assert status == 1 and out == ""
    assert "does not offer MTRK" in err
    assert fake_smtp.sent == [] and not (tmp_path / "sent.jsonl").exists()


def test_send_reports_refused_recipients(tmp_path, fake_smtp):
    fake_smtp.refuse = {"carol@example.test": (550, b"5.1.1 no such user")}
    status, out, err = run_send(
        tmp_path, fake_smtp, *BASE, "--to", "bob@example.test", "--to", "carol@example.test"
    )
    assert status == 1 and out.startswith("mtqp://")
    assert "refused recipients: carol@example.test" in err
    assert last_record(tmp_path / "sent.jsonl").recipients == ("bob@example.test",)
    fake_smtp.refuse["bob@example.test"] = (550, b"5.1.1 nope")
    status, out, err = run_send(
        tmp_path, fake_smtp, *BASE, "--to", "bob@example.test", "--to", "carol@example.test"
    )
    assert status == 1 and out == "" and "every recipient was refused" in err


def test_send_mtqp_server_override(tmp_path, fake_smtp):
    status, out, _ = run_send(
        tmp_path,
        fake_smtp,
        *BASE,
        "--to",
        "b@example.test",
        "--mtqp-server",
        "track.example.test:4242",
    )
    assert status == 0
    assert out.startswith("mtqp://track.example.test:4242/track/")


@pytest.mark.parametrize(
    "args",
    [
        ("--from", "a@example.test", "--to", "b@example.test"),
        ("--server", "mx.example.test", "--to", "b@example.test"),
        BASE,
        (*BASE, "--to", "b@example.test", "--timeout", "0"),
        (*BASE, "--to", "b@example.test", "--timeout", "1000000000"),
        (*BASE, "--to", "b@example.test", "--ret", "ALL"),
        (*BASE, "--to", "b@example.test", "--notify", "NEVER,DELAY"),
        (*BASE, "--to", "b@example.test", "--user", "alice"),  # no password in clear
        (*BASE, "--to", "b@example.test", "--password", "pw"),
        ("--server", "mx.example.test:99999", "--from", "a@x.test", "--to", "b@example.test"),
        (*BASE, "--to", "b@example.test", "--bogus"),
    ],
)
def test_send_usage_errors_exit_2(tmp_path, fake_smtp, args):
    status, out, err = run_send(tmp_path, fake_smtp, *args)
    assert status == 2 and out == "" and err.startswith("mtrkmta send: ")
    assert err.endswith("\nTry 'mtrkmta send --help'.\n") and err.count("\n") == 2
    assert fake_smtp.sent == []


def test_send_and_track_are_mtrkmta_commands(capsys):
    assert mtrkmta_main(["send"]) == 2
    assert "--server is required" in capsys.readouterr().err
    assert mtrkmta_main(["track"]) == 64  # EX_USAGE: 2 means "failed" for track
    assert "give an mtqp:// URI" in capsys.readouterr().err
    assert mtrkmta_main(["--help"]) == 0
    usage_text = capsys.readouterr().out
    assert "\n  send " in usage_text and "\n  track " in usage_text


# -- mtrkmta track: arguments ---


def parse_track(*args: str) -> track.TrackOptions:
    options = track.TrackOptions()
    options.parseOptions(args)  # options may follow the URI: the parser moves them first
    return options


def test_track_takes_an_mtqp_uri():
    options = parse_track(f"mtqp://MX.example.test/TRACK/{ENVID}/{SECRET_B64}")
    assert (options["host"], options["port"], options["envid"]) == ("MX.example.test", None, ENVID)
    assert options["secret"] == SECRET_B64 and options["tls"] == "may"
    explicit = parse_track(f"mtqp://127.0.0.1:4242/track/%3C{ENVID}%3E/{SECRET_B64}")
    # <...> stripped (doc/conformance.rst 3887-P2)
    assert (explicit["port"], explicit["envid"]) == (4242, ENVID)


def test_track_takes_server_envid_secret():
    options = parse_track("--server", "mx.example.test", ENVID, SECRET_B64, "--tls", "require")
    assert (options["host"], options["port"], options["tls"]) == (
        "mx.example.test",
        None,
        "require",
    )
    options = parse_track("--server", "[2001:db8::1]:1038", ENVID, SECRET_B64)
    assert (options["host"], options["port"]) == ("2001:db8::1", 1038)


def test_track_last_reads_the_secrets_file(tmp_path):
    path = tmp_path / "sent.jsonl"
    append_record(path, record(1))
    append_record(path, record(2))
    options = parse_track("--last", "--secrets", str(path))
    assert (options["host"], options["envid"]) == ("mx.example.test", "2@client.example.test")


def test_track_connect_to():
    options = parse_track(
        "--connect-to",
        "MX.example.test.=127.0.0.1:4242",
        "--connect-to",
        "mx.example.test:2000=127.0.0.1:9999",
        "--connect-to",
        "[IPv6:2001:DB8::1]=[::1]:4243",
        f"mtqp://mx.example.test/track/{ENVID}/{SECRET_B64}",
    )
    # HOST applies when HOST is asked without a port (a referral), HOST:PORT at that port.
    assert options["connect-to"] == {
        ("mx.example.test", None): ("127.0.0.1", 4242),
        ("mx.example.test", 2000): ("127.0.0.1", 9999),
        ("2001:db8::1", None): ("::1", 4243),
    }


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("http://example.test/",),
        (f"mtqp://mx.example.test/track/{ENVID}",),
        ("--server", "mx.example.test", ENVID),
        ("--server", "mx.example.test", "no-at-sign", SECRET_B64),
        ("--server", "mx.example.test", ENVID, "not*base64"),
        ("--tls", "sometimes", f"mtqp://mx.example.test/track/{ENVID}/{SECRET_B64}"),
        ("--json", "--raw", f"mtqp://mx.example.test/track/{ENVID}/{SECRET_B64}"),
        ("--max-hops", "0", f"mtqp://mx.example.test/track/{ENVID}/{SECRET_B64}"),
        ("--connect-to", "nohost", f"mtqp://mx.example.test/track/{ENVID}/{SECRET_B64}"),
        ("--connect-to", "h:x=127.0.0.1:1", f"mtqp://mx.example.test/track/{ENVID}/{SECRET_B64}"),
        ("--last", "--secrets", "/nonexistent/sent.jsonl"),
        ("--last", f"mtqp://mx.example.test/track/{ENVID}/{SECRET_B64}"),
        ("--ca-file", "/nonexistent.pem", f"mtqp://mx.example.test/track/{ENVID}/{SECRET_B64}"),
        ("--watch", "4", f"mtqp://mx.example.test/track/{ENVID}/{SECRET_B64}"),
        ("--watch", "5", "6", f"mtqp://mx.example.test/track/{ENVID}/{SECRET_B64}"),
        ("--watch", "--json", f"mtqp://mx.example.test/track/{ENVID}/{SECRET_B64}"),
    ],
)
def test_track_usage_errors_exit_64_without_touching_the_network(args):
    # 2 means "some recipient failed" for this command: a usage error is EX_USAGE (sysexits).
    err = io.StringIO()
    assert track.main(list(args), out=io.StringIO(), err=err) == 64
    assert err.getvalue().startswith("mtrkmta track: ")
    assert err.getvalue().endswith("\nTry 'mtrkmta track --help'.\n")
    assert err.getvalue().count("\n") == 2


# -- recipient paths and output (RFC 3886 §3.3.3) ---


def status(action: str, code: str, remote: str | None = None, **more: Any) -> RecipientStatus:
    return RecipientStatus(
        original_recipient=TypedValue("rfc822", "bob@dest.example"),
        final_recipient=TypedValue("rfc822", more.pop("final", "bob@dest.example")),
        action=action,
        status=code,
        remote_mta=None if remote is None else TypedValue("dns", remote),
        last_attempt_date=WHEN if remote else None,
        **more,
    )


def report(mta: str, *recipients: RecipientStatus) -> TrackingReport:
    return TrackingReport(ENVID, TypedValue("dns", mta), WHEN, recipients)


def hop(host: str, *reports: TrackingReport, error: str | None = None, **more: Any) -> Hop:
    return Hop(host=host, reports=reports, error=error, **more)


def test_paths_follow_transferred_to_the_final_hop():
    hops = [
        hop("a.example", report("a.example", status("transferred", "2.4.0", "B.example."))),
        hop("b.example", report("b.example", status("delivered", "2.1.5"))),
    ]
    (path,) = recipient_paths(hops)
    assert (path.outcome, path.final, [s.hop for s in path.steps]) == ("delivered", True, [0, 1])
    assert Trace(ENVID, tuple(hops), (path,)).complete


def test_paths_prefer_the_chained_part_of_the_same_answer():
    # 3886 §3: a chaining server's answer holds the next hop's part too.
    chained = hop(
        "a.example",
        report("a.example", status("transferred", "2.4.0", "inner.example")),
        report("inner.example", status("delayed", "4.4.1", will_retry_until=WHEN)),
    )
    (path,) = recipient_paths([chained])
    assert (path.outcome, [s.reporting_mta for s in path.steps]) == (
        "delayed",
        ["a.example", "inner.example"],
    )
    assert not path.final


def test_paths_end_unknown_when_the_next_hop_cannot_say():
    hops = [
        hop("a.example", report("a.example", status("transferred", "2.4.0", "b.example"))),
        hop("b.example", error="-ERR/noinfo No tracking information"),
    ]
    (path,) = recipient_paths(hops)
    assert (path.outcome, path.final) == ("unknown", False)
    assert path.reason == "b.example: -ERR/noinfo No tracking information"
    stranger = RecipientStatus(
        TypedValue("rfc822", "someone@else.example"),
        TypedValue("rfc822", "someone@else.example"),
        "delivered",
        "2.1.5",
    )
    other = hop("b.example", report("b.example", stranger))
    assert recipient_paths([hops[0], other])[0].reason == "b.example does not report this recipient"


def test_paths_detect_loops():
    hops = [
        hop("a.example", report("a.example", status("transferred", "2.4.0", "b.example"))),
        hop("b.example", report("b.example", status("transferred", "2.4.0", "a.example"))),
    ]
    (path,) = recipient_paths(hops)
    assert path.outcome == "loop" and not path.final


def test_json_and_timeline_output(time_zone):
    time_zone("UTC")
    hops = (
        hop(
            "a.example",
            report("a.example", status("transferred", "2.4.0", "b.example")),
            server=Target("192.0.2.1", 1038, "a.example"),
            tls=True,
        ),
        hop(
            "b.example",
            report(
                "b.example",
                status(
                    "delayed",
                    "4.4.1",
                    "c.example",
                    will_retry_until=WHEN,
                    extensions=(("Diagnostic-Code", "smtp; 421 busy"),),
                ),
            ),
            referred_by="a.example",
        ),
    )
    trace = Trace(ENVID, hops, recipient_paths(hops))
    data = track.trace_json(trace)
    assert data["complete"] is False
    assert [h["outcome"] for h in data["hops"]] == ["answered", "answered"]
    assert data["hops"][0]["server"] == {"address": "192.0.2.1", "port": 1038, "name": "a.example"}
    assert data["recipients"][0]["outcome"] == "delayed"
    delayed = data["hops"][1]["reports"][0]["recipients"][0]
    assert delayed["will_retry_until"] == WHEN.isoformat()
    assert delayed["extensions"] == [["Diagnostic-Code", "smtp; 421 busy"]]
    assert data["recipients"][0]["diagnostic"] == "smtp; 421 busy"
    out = io.StringIO()
    track.render_timeline(trace, out)
    text = out.getvalue()
    assert "Hop 1: a.example (192.0.2.1 port 1038, TLS)\n" in text
    assert "Hop 2: b.example, referred by a.example\n" in text
    # A hop without events: its RFC 3886 fields stand for them (arrival, last attempt).
    assert (
        "  2026-03-01 12:00:00 +0000      +0s  hop 2  bob@dest.example: attempt failed: "
        "4.4.1 No answer from host (421 busy); will retry until 12:00:00\n"
    ) in text
    assert text.endswith(
        "Result: not finished\n"
        "  bob@dest.example: still queued at b.example (4.4.1: no answer from host), "
        "will retry until 2026-03-01 12:00:00 +0000\n"
    )


def failed_trace() -> Trace:
    hops = (
        hop(
            "a.example",
            report("a.example", status("failed", "5.1.1", "mx.dest.example")),
        ),
    )
    return Trace(ENVID, hops, recipient_paths(hops))


def test_timeline_times_are_local_with_their_offset(time_zone):
    time_zone("XYZ-05:30")  # POSIX TZ: local time is UTC+05:30
    out = io.StringIO()
    track.render_timeline(failed_trace(), out)
    text = out.getvalue()
    assert "  2026-03-01 17:30:00 +0530      +0s  hop 1  accepted by a.example\n" in text
    assert "+0000" not in text


def test_timeline_times_in_utc_when_asked(time_zone):
    time_zone("XYZ-05:30")
    options = track.TrackOptions()
    options.parseOptions(["--utc", f"mtqp://a.example/track/{ENVID}/{SECRET_B64}"])
    assert options["utc"]
    out = io.StringIO()
    track.render_timeline(failed_trace(), out, timezone.utc)
    text = out.getvalue()
    assert "  2026-03-01 12:00:00 +0000      +0s  hop 1  accepted by a.example\n" in text
    assert "+0530" not in text


def test_timeline_and_json_say_what_a_status_code_means():
    # RFC 3463 §3.2: X.1.1 is "Bad destination mailbox address".
    out = io.StringIO()
    trace = failed_trace()
    track.render_timeline(trace, out)
    text = out.getvalue()
    assert "bob@dest.example: failed: 5.1.1 Bad destination mailbox address\n" in text
    assert "bob@dest.example: failed (5.1.1: bad destination mailbox address) at a.example" in text
    data = track.trace_json(trace)
    (rcpt,) = data["hops"][0]["reports"][0]["recipients"]
    assert (rcpt["status"], rcpt["meaning"]) == ("5.1.1", "bad destination mailbox address")
    (step,) = data["recipients"][0]["path"]
    assert step["meaning"] == "bad destination mailbox address"


# -- following referrals (RFC 3886 §3.3.3) ---


class ScriptedClient(TrackingClient):
    """A TrackingClient whose servers answer from a script instead of the network."""

    def __init__(self, answers: dict[Any, Hop], **kw: Any) -> None:
        super().__init__(MemoryReactorClock(), None, **kw)
        self.answers = answers
        self.asked: list[tuple[str, int | None, str | None]] = []

    def query(self, host, envid, secret, *, port=None, referred_by=None) -> Deferred:
        self.asked.append((host, port, referred_by))
        answer = self.answers.get(
            (host.lower(), port), self.answers.get(host.lower(), Hop(host=host, error="no server"))
        )
        return succeed(
            Hop(
                host=host,
                port=port,
                referred_by=referred_by,
                reports=answer.reports,
                error=answer.error,
            )
        )


def result(d: Deferred) -> Any:
    found: list[Any] = []
    d.addBoth(found.append)
    (value,) = found
    return value


def test_follow_asks_each_transferred_remote_mta_once():
    answers = {
        "a.example": hop(
            "a.example",
            report(
                "a.example",
                status("transferred", "2.4.0", "b.example"),
                RecipientStatus(
                    TypedValue("rfc822", "carol@dest.example"),
                    TypedValue("rfc822", "carol@dest.example"),
                    "transferred",
                    "2.4.0",
                    TypedValue("dns", "B.Example"),
                    WHEN,
                ),
            ),
        ),
        "b.example": hop(
            "b.example",
            report(
                "b.example",
                status("relayed", "2.1.9", "legacy.example"),
                RecipientStatus(
                    TypedValue("rfc822", "carol@dest.example"),
                    TypedValue("rfc822", "carol@dest.example"),
                    "failed",
                    "5.1.1",
                    TypedValue("dns", "legacy.example"),
                    WHEN,
                ),
            ),
        ),
    }
    client = ScriptedClient(answers)
    trace = result(client.follow("a.example", ENVID, SECRET_B64, port=4242))
    assert client.asked == [("a.example", 4242, None), ("b.example", None, "a.example")]
    assert [(p.original_recipient, p.outcome) for p in trace.recipients] == [
        ("bob@dest.example", "relayed"),
        ("carol@dest.example", "failed"),
    ]
    assert trace.complete


def test_follow_skips_hosts_a_chained_answer_covers_and_stops_at_the_hop_limit():
    answers = {
        "a.example": hop(
            "a.example",
            report("a.example", status("transferred", "2.4.0", "inner.example")),
            report("inner.example", status("transferred", "2.4.0", "c.example")),
        ),
        "c.example": hop(
            "c.example", report("c.example", status("transferred", "2.4.0", "d.example"))
        ),
    }
    client = ScriptedClient(answers, max_hops=2)
    trace = result(client.follow("a.example", ENVID, SECRET_B64))
    assert [host for host, _, _ in client.asked] == ["a.example", "c.example"]
    assert [h.host for h in trace.hops] == ["a.example", "c.example", "d.example"]
    assert trace.hops[2].error == "not asked: more than 2 tracking servers"
    (path,) = trace.recipients
    assert path.outcome == "unknown" and not trace.complete


def test_follow_never_asks_a_host_twice():
    answers = {
        "a.example": hop(
            "a.example", report("a.example", status("transferred", "2.4.0", "b.example"))
        ),
        "b.example": hop(
            "b.example", report("b.example", status("transferred", "2.4.0", "A.example."))
        ),
    }
    client = ScriptedClient(answers)
    trace = result(client.follow("a.example", ENVID, SECRET_B64))
    assert [host for host, _, _ in client.asked] == ["a.example", "b.example"]
    assert trace.recipients[0].outcome == "loop"


def test_follow_asks_one_address_at_two_ports():
    # Two nodes on one address: the first asked at its explicit port names the other
    # only as "dns; [127.0.0.1]" (RFC 3461 §9.3), whose server is asked without a port
    # (where --connect-to or 1038 says): another server, not a loop.
    answers = {
        ("127.0.0.1", 4001): hop(
            "127.0.0.1", report("a.example", status("transferred", "2.4.0", "[127.0.0.1]"))
        ),
        ("[127.0.0.1]", None): hop(
            "[127.0.0.1]", report("b.example", status("delivered", "2.1.5"))
        ),
    }
    client = ScriptedClient(answers)
    trace = result(client.follow("127.0.0.1", ENVID, SECRET_B64, port=4001))
    assert client.asked == [("127.0.0.1", 4001, None), ("[127.0.0.1]", None, "a.example")]
    (path,) = trace.recipients
    assert (path.outcome, [s.hop for s in path.steps]) == ("delivered", [0, 1])
    assert trace.complete


# -- locating servers (RFC 3887 §2) ---


class FakeResolver:
    """IResolver answers from tables; names missing from every table are NXDOMAIN."""

    def __init__(self, srv=None, a=None, aaaa=None, broken=()) -> None:
        self.srv = srv or {}
        self.a = a or {}
        self.aaaa = aaaa or {}
        self.broken = set(broken)
        self.asked: list[tuple[str, str]] = []

    def _answer(self, kind: str, table: dict, name: str, make: Any) -> Deferred:
        self.asked.append((kind, name))
        if name in self.broken:
            return fail(DNSServerError(name))
        known = set(self.srv) | set(self.a) | set(self.aaaa)
        if name not in known:
            return fail(DNSNameError(name))
        records = [
            dns.RRHeader(name, record.TYPE, payload=record) for record in make(table.get(name, []))
        ]
        return succeed((records, [], []))

    def lookupService(self, name: str) -> Deferred:
        return self._answer(
            "SRV", self.srv, name, lambda rows: [dns.Record_SRV(*row) for row in rows]
        )

    def lookupAddress(self, name: str) -> Deferred:
        return self._answer("A", self.a, name, lambda rows: [dns.Record_A(row) for row in rows])

    def lookupIPV6Address(self, name: str) -> Deferred:
        return self._answer(
            "AAAA", self.aaaa, name, lambda rows: [dns.Record_AAAA(row) for row in rows]
        )


def locate(resolver: FakeResolver, host: str, port: int | None = None, **kw: Any) -> Any:
    return result(Locator(resolver, rng=random.Random(1), **kw).locate(host, port))


def test_srv_first_then_the_host_itself_on_1038():
    # RFC 3887 §2: SRV _mtqp._tcp.H, else H's address records, port 1038.
    resolver = FakeResolver(
        srv={"_mtqp._tcp.mx.example.test": [(0, 0, 4242, b"track.example.test")]},
        a={"track.example.test": ["192.0.2.9"], "plain.example.test": ["192.0.2.1"]},
        aaaa={"v6.example.test": ["2001:db8::1"]},
    )
    assert locate(resolver, "MX.example.test.") == [Target("192.0.2.9", 4242, "track.example.test")]
    assert locate(resolver, "plain.example.test") == [
        Target("192.0.2.1", 1038, "plain.example.test")
    ]
    assert locate(resolver, "v6.example.test") == [Target("2001:db8::1", 1038, "v6.example.test")]
    assert ("SRV", "_mtqp._tcp.plain.example.test") in resolver.asked


def test_explicit_port_literal_and_override_skip_srv():
    resolver = FakeResolver(
        srv={"_mtqp._tcp.mx.example.test": [(0, 0, 4242, b"x.example.test")]},
        a={"mx.example.test": ["192.0.2.5"]},
    )
    assert locate(resolver, "mx.example.test", 1111) == [
        Target("192.0.2.5", 1111, "mx.example.test")
    ]
    assert locate(resolver, "[IPv6:2001:DB8::2]") == [Target("2001:db8::2", 1038, "2001:db8::2")]
    table = {("mx.example.test", None): ("127.0.0.1", 5555), ("127.0.0.1", 2000): ("::1", 9)}

    def override(host: str, port: int | None) -> tuple[str, int] | None:
        return table.get((host, port))

    assert locate(resolver, "mx.example.test", connect_to=override) == [
        Target("127.0.0.1", 5555, "mx.example.test")
    ]
    # An explicit port is where to ask unless an override names that port too.
    assert locate(resolver, "[127.0.0.1]", 4001, connect_to=override) == [
        Target("127.0.0.1", 4001, "127.0.0.1")
    ]
    assert locate(resolver, "127.0.0.1", 2000, connect_to=override) == [
        Target("::1", 9, "127.0.0.1")
    ]
    assert [kind for kind, _ in resolver.asked] == ["A"]


def test_srv_dot_means_no_service_and_errors_are_reported():
    resolver = FakeResolver(
        srv={"_mtqp._tcp.none.example.test": [(0, 0, 0, b".")]},
        a={"none.example.test": ["192.0.2.1"]},
        broken={"_mtqp._tcp.flaky.example.test", "flaky.example.test"},
    )
    resolver.srv["_mtqp._tcp.flaky.example.test"] = []
    failure = locate(resolver, "none.example.test")
    assert failure.check(LocateError) and "publishes no MTQP service" in str(failure.value)
    assert locate(resolver, "nowhere.example.test").check(LocateError)
    failure = locate(resolver, "flaky.example.test")
    assert failure.check(LocateError) and "has no address" in str(failure.value)


def test_srv_order_priority_then_weight():
    records = [
        dns.Record_SRV(20, 0, 1, b"late"),
        dns.Record_SRV(10, 0, 2, b"zero"),
        dns.Record_SRV(10, 100, 3, b"heavy"),
    ]
    seen = {
        tuple(str(r.target) for r in order_srv(records, random.Random(seed))) for seed in range(50)
    }
    assert all(order[-1] == "late" for order in seen)
    assert ("heavy", "zero", "late") in seen  # weight 100 against 0: heavy nearly always first


# -- the session protocol (RFC 3887 §2.2-§2.3, §2.5, §6) ---


@implementer(ITLSTransport)
class TLSTransport(StringTransport):
    tls: object = None

    def startTLS(self, context: object) -> None:
        self.tls = context


def connected(clock: MemoryReactorClock) -> tuple[MTQPClientProtocol, TLSTransport]:
    protocol = MTQPClientProtocol(clock, 120.0, "mx.example.test")
    transport = TLSTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_reply_timeout_is_measured_on_the_clock():
    clock = MemoryReactorClock()
    protocol, transport = connected(clock)
    greeting = protocol.next_response()
    clock.advance(119)
    assert not greeting.called
    clock.advance(1)
    failure = result(greeting)
    assert failure.check(TrackingError) and "no reply from mx.example.test in 120 s" in str(
        failure.value
    )
    assert transport.disconnecting and not clock.getDelayedCalls()


def test_responses_in_order_and_clear_text_forgotten_after_starttls():
    # RFC 3887 §6 (MUST): the client forgets what it read before the handshake.
    clock = MemoryReactorClock()
    protocol, transport = connected(clock)
    protocol.dataReceived(b"+OK+/MTQP hi\r\nSTARTTLS\r\n.\r\n")
    greeting = result(protocol.next_response())
    assert greeting.data_lines == (b"STARTTLS",)
    reply = protocol.command(StartTLS("mx.example.test"))
    assert transport.value() == b"STARTTLS mx.example.test\r\n"
    new_greeting: list[Deferred] = []

    def go(response: Response) -> None:
        new_greeting.append(protocol.start_tls("context"))

    reply.addCallback(go)
    protocol.dataReceived(b"+OK go\r\n+OK/MTQP injected in clear\r\n")
    assert transport.tls == "context" and not new_greeting[0].called
    protocol.dataReceived(b"+OK/MTQP under TLS\r\n")
    assert result(new_greeting[0]).text == "under TLS"
    transport.clear()
    answer = protocol.command(Track(ENVID, SECRET_B64))
    assert transport.value() == f"TRACK {ENVID} {SECRET_B64}\r\n".encode()
    protocol.dataReceived(b"+OK+ here\r\n..dot\r\n.\r\n")
    assert result(answer).data_lines == (b".dot",)
    protocol.connectionLost(None)
    assert not clock.getDelayedCalls()


def test_overlong_or_malformed_responses_break_the_session():
    clock = MemoryReactorClock()
    protocol, transport = connected(clock)
    waiting = protocol.next_response()
    protocol.dataReceived(b"+OK " + b"x" * 1000 + b"\r\n")
    assert result(waiting).check(TrackingError)
    assert transport.disconnecting and not clock.getDelayedCalls()
    protocol, _ = connected(clock)
    waiting = protocol.next_response()
    protocol.dataReceived(b"220 this is SMTP\r\n")
    assert "malformed status line" in str(result(waiting).value)
