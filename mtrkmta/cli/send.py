"""`mtrkmta send`: submit a message with MTRK and ENVID, keep its secret, print its mtqp URI."""

from __future__ import annotations

import getpass
import smtplib
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, TextIO

from twisted.python import usage

from mtrkmta.cli.conventions import EXIT_USAGE, CommandOptions, parse
from mtrkmta.mtqp.protocol import DEFAULT_PORT
from mtrkmta.originator import (
    RET_VALUES,
    SentRecord,
    TrackingSecret,
    append_record,
    default_secrets_path,
    mail_options,
    message_subject,
    new_tracking,
    rcpt_options,
    tracking_uri,
)
from mtrkmta.smtp.mtrk import MAX_TIMEOUT

DEFAULT_SMTP_PORT = 25
SMTP_TIMEOUT = 60.0  # seconds per SMTP step


def host_and_port(text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address; the port is
    None when not given. ValueError when malformed."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad server {text!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"no host in {text!r}")
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


def split_host_port(text: str, default: int) -> tuple[str, int]:
    """:func:`host_and_port` with ``default`` for a missing port."""
    host, port = host_and_port(text)
    return host, default if port is None else port


class SendOptions(CommandOptions):
    program = "mtrkmta send"
    synopsis = "--server HOST[:PORT] --from ADDRESS --to ADDRESS [options] [FILE]"
    longdesc = (
        "Submit the message in FILE (or standard input) with a fresh tracking secret and "
        "ENVID, record the secret in the secrets file and print the mtqp:// URI that tracks it."
    )
    optFlags = (("starttls", None, "Use STARTTLS (the certificate is verified)."),)
    optParameters = (
        ("server", None, None, "SMTP or submission server, HOST[:PORT] [port 25]."),
        ("from", None, None, "Envelope sender (MAIL FROM)."),
        ("user", None, None, "Authenticate (AUTH) as this user; needs --starttls."),
        ("password", None, None, "Password for --user [asked on the terminal]."),
        ("ca-file", None, None, "PEM file of CAs to verify the server with (--starttls)."),
        ("timeout", None, None, "Ask MTAs to keep tracking data this many seconds (MTRK=)."),
        ("notify", None, None, "DSN NOTIFY: NEVER or a list of SUCCESS,FAILURE,DELAY."),
        ("ret", None, None, "DSN RET: FULL or HDRS."),
        ("mtqp-server", None, None, "Tracking server for the URI, HOST[:PORT] [--server's host]."),
        ("secrets", None, None, "Secrets file [~/.local/share/mtrkmta/sent.jsonl]."),
        ("hostname", None, None, "Name for EHLO and the ENVID [this machine's name]."),
    )

    def __init__(self) -> None:
        super().__init__()
        self["to"] = []

    def opt_to(self, address: str) -> None:
        """Recipient (RCPT TO); repeatable."""
        self["to"].append(address)

    def parseArgs(self, message: str | None = None) -> None:
        self["message"] = message

    def postOptions(self) -> None:
        for name in ("server", "from"):
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")
        if not self["to"]:
            raise usage.UsageError("at least one --to is required")
        try:
            self["server-address"] = split_host_port(self["server"], DEFAULT_SMTP_PORT)
            mtqp = self["mtqp-server"] or self["server-address"][0]
            self["mtqp-address"] = split_host_port(mtqp, DEFAULT_PORT)
        except ValueError as error:
            raise usage.UsageError(str(error)) from None
        if self["timeout"] is not None:
            text = self["timeout"]
            if not text.isdigit() or not 1 <= int(text) <= MAX_TIMEOUT:
                raise usage.UsageError(f"--timeout is 1 to {MAX_TIMEOUT} seconds, not {text!r}")
            self["timeout"] = int(text)
        if self["password"] is not None and not self["user"]:
            raise usage.UsageError("--password needs --user")
        if self["user"] and not self["starttls"]:
            raise usage.UsageError("--user needs --starttls: a password is never sent in clear")
        if self["ret"] is not None and self["ret"].upper() not in RET_VALUES:
            raise usage.UsageError(f"--ret is FULL or HDRS, not {self['ret']!r}")
        try:
            rcpt_options(self["notify"].split(",") if self["notify"] else None)
        except ValueError as error:
            raise usage.UsageError(f"--notify: {error}") from None


class SendError(Exception):
    """The server did not take the message."""


@dataclass(frozen=True, slots=True)
class Submission:
    """What to send and where; built from the options."""

    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    content: bytes
    tracking: TrackingSecret
    hostname: str
    starttls: bool = False
    ca_file: str | None = None
    user: str | None = None
    password: str | None = None
    timeout: int | None = None
    notify: tuple[str, ...] | None = None
    ret: str | None = None


def submit(submission: Submission, smtp_class: type[smtplib.SMTP] = smtplib.SMTP) -> list[str]:
    """Send it (blocking); the recipients the server refused. Raises SendError or OSError."""
    with smtp_class(
        submission.host,
        submission.port,
        local_hostname=submission.hostname,
        timeout=SMTP_TIMEOUT,
    ) as smtp:
        smtp.ehlo()
        if submission.starttls:
            context = ssl.create_default_context(cafile=submission.ca_file)
            smtp.starttls(context=context)
            smtp.ehlo()
        if submission.user:
            smtp.login(submission.user, submission.password or "")
        for keyword in ("mtrk", "dsn"):
            if not smtp.has_extn(keyword):
                raise SendError(
                    f"{submission.host} does not offer {keyword.upper()}: "
                    "the message could not be tracked, so it was not sent"
                )
        try:
            refused = smtp.sendmail(
                submission.sender,
                list(submission.recipients),
                submission.content,
                mail_options=mail_options(
                    submission.tracking, timeout=submission.timeout, ret=submission.ret
                ),
                rcpt_options=rcpt_options(submission.notify),
            )
        except smtplib.SMTPRecipientsRefused as error:
            why = "; ".join(
                f"{rcpt}: {code} {text.decode(errors='replace')}"
                for rcpt, (code, text) in error.recipients.items()
            )
            raise SendError(f"every recipient was refused: {why}") from None
        except smtplib.SMTPResponseException as error:
            text = (
                error.smtp_error.decode(errors="replace")
                if isinstance(error.smtp_error, bytes)
                else str(error.smtp_error)
            )
            raise SendError(f"{error.smtp_code} {text}") from None
    return sorted(refused)


def main(
    args: Sequence[str],
    *,
    stdin: BinaryIO | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    ask_password: Callable[[str], str] = getpass.getpass,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    smtp_class: type[smtplib.SMTP] = smtplib.SMTP,
) -> int:
    """Exit 0 when the message was accepted for every recipient, 1 when not (or only for
    some), 2 for a usage error."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    options = SendOptions()
    status = parse(options, args, err)
    if status is not None:
        return status
    try:
        if options["message"] is not None:
            content = Path(options["message"]).read_bytes()
        else:
            content = (stdin if stdin is not None else sys.stdin.buffer).read()
    except OSError as error:
        print(f"mtrkmta: cannot read the message: {error.strerror or error}", file=err)
        return EXIT_USAGE
    password = options["password"]
    if options["user"] and password is None:
        password = ask_password(f"Password for {options['user']}: ")
    hostname = options["hostname"] or socket.getfqdn()
    host, port = options["server-address"]
    tracking = new_tracking(hostname)
    submission = Submission(
        host=host,
        port=port,
        sender=options["from"],
        recipients=tuple(options["to"]),
        content=content,
        tracking=tracking,
        hostname=hostname,
        starttls=bool(options["starttls"]),
        ca_file=options["ca-file"],
        user=options["user"],
        password=password,
        timeout=options["timeout"],
        notify=tuple(options["notify"].split(",")) if options["notify"] else None,
        ret=options["ret"],
    )
    try:
        refused = submit(submission, smtp_class)
    except (SendError, smtplib.SMTPException, OSError) as error:
        print(f"mtrkmta: {host}:{port}: not sent: {error}", file=err)
        return 1
    uri = tracking_uri(tracking, *options["mtqp-address"])
    path = Path(options["secrets"]) if options["secrets"] else default_secrets_path()
    record = SentRecord(
        envid=tracking.envid,
        secret=tracking.secret_text,
        server=f"{host}:{port}",
        mtqp=uri,
        sender=submission.sender,
        recipients=tuple(r for r in submission.recipients if r not in refused),
        sent_at=now().isoformat(timespec="seconds"),
        subject=message_subject(content),
    )
    status = 0
    try:
        append_record(path, record)
    except OSError as error:
        print(f"mtrkmta: could not record the secret in {path}: {error}", file=err)
        status = 1
    print(uri, file=out)
    print(f"mtrkmta: accepted by {host}:{port}; envelope id {tracking.envid}", file=err)
    if refused:
        print(f"mtrkmta: refused recipients: {', '.join(refused)}", file=err)
        status = 1
    if status == 0:
        print(f"mtrkmta: secret saved in {path}; `mtrkmta track --last` tracks it", file=err)
    return status
