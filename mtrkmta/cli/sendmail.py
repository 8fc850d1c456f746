"""`sendmail`, `mailq` and `newaliases`: the Unix mail commands, onto the pickup directory.

``sendmail`` writes each message durably into ``<data_dir>/pickup`` and exits 0; the
node queues it from there, now if it is running (sendmail nudges it over the control
socket when it may), or when it starts. Options are those of Postfix's sendmail(1) that
programs use; exit statuses are those of sysexits.h.
"""

from __future__ import annotations

import email.utils
import getopt
import os
import pwd
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mtrkmta.config import Config, ConfigError, load_config
from mtrkmta.envelope import ClientInfo, Envelope, MailParams, RcptParams, Recipient
from mtrkmta.queue.control import PICKUP, RELOAD_ALIASES, SOCKET_NAME, ControlError, request
from mtrkmta.receive.pickup import checked_envelope, qualify
from mtrkmta.smtp.server import (
    IncomingTransaction,
    IReceiver,
    ServerSettings,
    Session,
    SMTPServer,
    SMTPServerFactory,
)
from mtrkmta.spool.pickup import PickupError, ensure_pickup_directory, write_pickup
from mtrkmta.spool.queueid import QueueIdGenerator

# sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

DEFAULT_CONFIG = Path("/etc/mtrkmta/mtrkmta.toml")
CONFIG_ENVIRONMENT = "MTRKMTA_CONFIG"
# Postfix's sendmail option letters; those not handled below are accepted and ignored.
OPTIONS = "B:C:F:GIL:N:R:UV:X:b:ce:f:h:imno:p:r:tvx"
MODES = {"m": "deliver", "s": "smtp", "p": "mailq", "i": "newaliases"}
NOTIFY_WORDS = ("success", "failure", "delay")
_PRINTABLE = re.compile(r"[\x21-\x7e]{1,100}")  # RFC 3461 §4.4: ENVID, at most 100 chars
_DOT = re.compile(rb"\.\r?\n?")


class UsageProblem(Exception):
    """A command line sendmail cannot run; ``str()`` is the one line to print."""


@dataclass
class Invocation:
    """What one command line asks for (see ``parse_args``)."""

    mode: str = "deliver"  # deliver (-bm), smtp (-bs), mailq (-bp), newaliases (-bi)
    recipients: list[str] = field(default_factory=list)
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi
    sender: str | None = None  # -f, -r
    full_name: str | None = None  # -F
    notify: frozenset[str] | None = None  # -N
    ret: str | None = None  # -R
    envid: str | None = None  # -V
    verbose: bool = False  # -v
    config: Path | None = None  # -C


def parse_args(args: Sequence[str], program: str = "sendmail") -> Invocation:
    """Parse a sendmail command line as Postfix does (options may follow recipients; an
    unknown ``-o`` option and ``-B`` are ignored). Raises UsageProblem."""
    invocation = Invocation()
    if program == "mailq":
        invocation.mode = "mailq"
    elif program == "newaliases":
        invocation.mode = "newaliases"
    try:
        options, operands = getopt.gnu_getopt(list(args), OPTIONS)
    except getopt.GetoptError as error:
        raise UsageProblem(f"{error}") from None
    for option, value in options:
        letter = option[1]
        if letter == "b":
            if value not in MODES:
                raise UsageProblem(f"-b{value} is not supported (use -bm, -bs, -bp or -bi)")
            invocation.mode = MODES[value]
        elif letter == "I":
            invocation.mode = "newaliases"
        elif letter == "t":
            invocation.extract = True
        elif letter == "i" or (letter == "o" and value == "i"):
            invocation.ignore_dots = True
        elif letter in "fr":
            invocation.sender = "" if value in ("", "<>") else value.strip("<>")
        elif letter == "F":
            invocation.full_name = value
        elif letter == "N":
            invocation.notify = _notify(value)
        elif letter == "R":
            if value.lower() not in ("full", "hdrs"):
                raise UsageProblem(f"-R {value}: expected full or hdrs")
            invocation.ret = value.upper()
        elif letter == "V":
            if _PRINTABLE.fullmatch(value) is None:
                raise UsageProblem(f"-V {value!r}: expected 1 to 100 printable ASCII characters")
            invocation.envid = value
        elif letter == "v":
            invocation.verbose = True
        elif letter == "C":
            invocation.config = Path(value)
        # -B, -o (but -oi), -h, -L, -X, -p, -e, -c, -m, -n, -x, -G, -U: ignored.
    invocation.recipients = [r for operand in operands for r in _split_recipients(operand)]
    if invocation.mode == "deliver" and not invocation.recipients and not invocation.extract:
        raise UsageProblem("no recipients: give them as arguments or use -t")
    return invocation


def _notify(value: str) -> frozenset[str]:
    words = [w.strip().lower() for w in value.split(",")]
    if words == ["never"]:
        return frozenset({"NEVER"})
    if not words or any(w not in NOTIFY_WORDS for w in words):
        raise UsageProblem(f"-N {value}: expected never, or one or more of success,failure,delay")
    return frozenset(w.upper() for w in words)


def _split_recipients(operand: str) -> list[str]:
    """``a@x, b@y`` as one argument is two recipients, as Postfix takes them."""
    return [word.strip().strip("<>") for word in operand.split(",") if word.strip()]


class MessageTooBig(Exception):
    """The message on standard input is over limits.message_size."""


def read_content(stream: BinaryIO, *, ignore_dots: bool, limit: int) -> bytes:
    """The message on ``stream`` with CRLF line ends; without ``ignore_dots`` a line of a
    lone ``.`` ends it (sendmail's default, off with -i/-oi). Raises MessageTooBig."""
    lines = []
    size = 0
    for line in iter(stream.readline, b""):
        if not ignore_dots and _DOT.fullmatch(line):
            break
        line = line.rstrip(b"\r\n") + b"\r\n"
        size += len(line)
        if size > limit:
            raise MessageTooBig(f"message over limits.message_size ({limit} octets)")
        lines.append(line)
    return b"".join(lines)


_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")


def split_header(content: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its folded continuation lines) and the rest."""
    fields: list[bytes] = []
    position = 0
    while position < len(content):
        end = content.find(b"\r\n", position)
        end = len(content) if end < 0 else end + 2
        line = content[position:end]
        if line in (b"\r\n", b""):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _FIELD.match(line):
            fields.append(line)
        else:
            break  # not a header field: the body starts here (no blank line)
        position = end
    return fields, content[position:]


def _name(field_line: bytes) -> str:
    return field_line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def complete_message(
    content: bytes,
    invocation: Invocation,
    *,
    sender: str,
    full_name: str,
    queue_id: str,
    hostname: str,
    now: float,
) -> tuple[bytes, list[str]]:
    """The message as it goes into the pickup directory, and its recipients.

    With -t the recipients of To, Cc and Bcc are added to those given as arguments
    (as Postfix does) and Bcc is removed; From (with -F's name), Date and Message-ID
    are added when missing (RFC 5322 §3.6: Date and From are required).
    """
    fields, body = split_header(content)
    recipients = list(invocation.recipients)
    if invocation.extract:
        values = [
            f.split(b":", 1)[1].decode("utf-8", "replace")
            for f in fields
            if _name(f) in ("to", "cc", "bcc")
        ]
        recipients += [a for _, a in email.utils.getaddresses(values) if a]
        fields = [f for f in fields if _name(f) != "bcc"]
    names = {_name(f) for f in fields}
    added = []
    if "from" not in names:
        added.append(f"From: {email.utils.formataddr((full_name, sender))}")
    if "date" not in names:
        added.append(f"Date: {email.utils.formatdate(now, localtime=True)}")
    if "message-id" not in names:
        added.append(f"Message-ID: <{queue_id}@{hostname}>")
    new = b"".join(line.encode("utf-8") + b"\r\n" for line in added)
    separator = b"" if body.startswith(b"\r\n") else b"\r\n"
    return b"".join(fields) + new + separator + body, list(dict.fromkeys(recipients))


# -- the commands -----------------------------------------------------------------------


def config_path(invocation: Invocation) -> Path | None:
    """-C, else $MTRKMTA_CONFIG, else /etc/mtrkmta/mtrkmta.toml if it exists, else None
    (the built-in defaults)."""
    if invocation.config is not None:
        return invocation.config
    if os.environ.get(CONFIG_ENVIRONMENT):
        return Path(os.environ[CONFIG_ENVIRONMENT])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def _login() -> tuple[str, str]:
    """The caller's login name and full name (the first field of GECOS)."""
    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return f"uid{os.getuid()}", ""
    return entry.pw_name, entry.pw_gecos.split(",")[0]


def nudge(config: Config) -> bool:
    """Tell a running node to scan its pickup directory now; False if it cannot be told
    (not running, or the control socket is the node user's only): it finds the file
    within pickup.poll_interval, or when it starts."""
    try:
        request(config.data_dir / SOCKET_NAME, PICKUP, timeout=5.0)
    except ControlError:
        return False
    return True


def pickup_dir(config: Config) -> Path:
    """The pickup directory, created if the data directory exists. Raises OSError."""
    if not config.data_dir.is_dir():
        raise FileNotFoundError(
            f"no data directory {config.data_dir} (server.data_dir): start mtrkmta once, "
            "or give the server's configuration with -C FILE"
        )
    return ensure_pickup_directory(config.data_dir)


def deliver(invocation: Invocation, config: Config, stdin: BinaryIO, err: TextIO) -> int:
    """-bm: read the message, write it into the pickup directory, nudge the node."""
    login, gecos = _login()
    sender = login if invocation.sender is None else invocation.sender
    domain = config.local_domains[0] if config.local_domains else config.hostname
    queue_id = QueueIdGenerator()()
    now = time.time()
    try:
        raw = read_content(
            stdin, ignore_dots=invocation.ignore_dots, limit=config.limits.message_size
        )
    except MessageTooBig as error:
        print(f"sendmail: {error}", file=err)
        return EX_DATAERR
    content, recipients = complete_message(
        raw,
        invocation,
        sender=qualify(sender, domain) if sender else f"MAILER-DAEMON@{config.hostname}",
        full_name=invocation.full_name if invocation.full_name is not None else gecos,
        queue_id=queue_id,
        hostname=config.hostname,
        now=now,
    )
    if len(content) > config.limits.message_size:
        print(
            f"sendmail: message over limits.message_size ({config.limits.message_size} octets)",
            file=err,
        )
        return EX_DATAERR
    if not recipients:
        print("sendmail: no recipients: none given and none in To, Cc or Bcc", file=err)
        return EX_DATAERR
    envelope = Envelope(
        queue_id=queue_id,
        sender=sender,
        recipients=tuple(Recipient(r, RcptParams(notify=invocation.notify)) for r in recipients),
        params=MailParams(envid=invocation.envid, ret=invocation.ret),
        arrival=now,
        client=ClientInfo(address="", protocol="local", listener="pickup"),
    )
    try:  # the node checks the same way: refuse here what it would reject there
        checked_envelope(envelope, domain=domain, uid=os.getuid(), arrival=now)
    except PickupError as error:
        print(f"sendmail: {error}", file=err)
        return EX_DATAERR
    try:
        directory = pickup_dir(config)
        write_pickup(directory, envelope, content, fsync=config.durability.fsync)
    except PermissionError as error:
        print(
            f"sendmail: cannot write into {error.filename or config.data_dir}: permission "
            f"denied; {config.data_dir} must be searchable by everyone (mode 0711) and its "
            "pickup/ mode 1733 (the node sets it), or run as the node's user",
            file=err,
        )
        return EX_NOPERM
    except OSError as error:
        text = (
            str(error)
            if isinstance(error, FileNotFoundError) and not error.filename
            else (f"cannot write into the pickup directory: {error}")
        )
        print(f"sendmail: {text}", file=err)
        return EX_TEMPFAIL
    told = nudge(config)
    if invocation.verbose:
        when = "now" if told else f"within {config.pickup.poll_interval:g}s or when it starts"
        print(
            f"sendmail: {queue_id}: from=<{sender}> to {', '.join(recipients)}: in "
            f"{directory}; the node picks it up {when}",
            file=err,
        )
    return EX_OK


@implementer(IReceiver)
class PickupReceiver:
    """The IReceiver of ``sendmail -bs``: every message accepted goes into the pickup
    directory (the node checks the envelope when it picks the message up)."""

    def __init__(self, directory: Path, config: Config) -> None:
        self.directory = directory
        self.config = config
        self.new_queue_id = QueueIdGenerator()

    def check_sender(self, session: Session, sender: str, params: MailParams) -> None:
        return None

    def check_recipient(
        self, session: Session, address: str, params: RcptParams, mail: MailParams
    ) -> None:
        return None

    def incoming(self, queue_id: str) -> _Buffer:
        return _Buffer()

    def accept(self, envelope: Envelope, content: Any) -> Deferred[None]:
        assert isinstance(content, _Buffer)
        try:
            write_pickup(
                self.directory, envelope, content.data(), fsync=self.config.durability.fsync
            )
        except OSError as error:
            return fail(error)
        nudge(self.config)
        return succeed(None)


class _Buffer:
    """A message's content held in memory (the SMTP server bounds it to message_size)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._parts.append(data)

    def discard(self) -> None:
        self._parts = []

    def data(self) -> bytes:
        return b"".join(self._parts)


class _StdioSMTPServer(SMTPServer):
    """The SMTP server of ``-bs``: its connection ends with standard input or QUIT."""

    def _received_header(self, transaction: IncomingTransaction, now: float) -> bytes:
        return b""  # the node writes this hop's Received: when it picks the message up

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        finished = self.factory.finished
        if not finished.called:
            finished.callback(None)


def smtp_dialogue(config: Config, err: TextIO) -> int:
    """-bs: an SMTP session on standard input and output (RFC 5321), into the pickup."""
    try:
        directory = pickup_dir(config)
    except OSError as error:
        print(f"sendmail: {error}", file=err)
        return EX_TEMPFAIL
    from twisted.internet import reactor, stdio

    settings = ServerSettings(
        hostname=config.hostname,
        listener="sendmail",
        message_size=config.limits.message_size,
        max_recipients=config.limits.recipients,
        command_line=config.limits.command_line,
        idle_timeout=config.limits.idle_timeout,
        data_timeout=config.limits.data_timeout,
        session_time=config.limits.session_time,
    )
    factory = SMTPServerFactory(settings, PickupReceiver(directory, config), reactor)
    factory.protocol = _StdioSMTPServer
    finished: Deferred[None] = Deferred()
    factory.finished = finished  # type: ignore[attr-defined]
    finished.addCallback(lambda _: reactor.stop())
    stdio.StandardIO(factory.buildProtocol(None), reactor=reactor)
    reactor.run()
    return EX_OK


def mailq(config_file: Path | None) -> int:
    """-bp: ``mtrkmta queue list``."""
    from mtrkmta.cli.queue import main as queue_main

    args = ["--config", str(config_file)] if config_file is not None else []
    status = queue_main([*args, "list"])
    return EX_OK if status == 0 else EX_UNAVAILABLE


def newaliases(config: Config, out: TextIO, err: TextIO) -> int:
    """-bi: check the aliases file; tell a running node to re-read it now."""
    from mtrkmta.routing.aliases import AliasBook, AliasError

    path = config.local.aliases
    if path is None:
        print("newaliases: no aliases file configured (local.aliases): nothing to do", file=out)
        return EX_OK
    try:
        book = AliasBook.parse(path.read_text("utf-8"), f"local.aliases {path}")
    except AliasError as error:
        print(f"newaliases: {error}", file=err)
        return EX_DATAERR
    except (OSError, UnicodeDecodeError) as error:
        print(f"newaliases: local.aliases {path}: {error}", file=err)
        return EX_DATAERR
    try:
        request(config.data_dir / SOCKET_NAME, RELOAD_ALIASES, timeout=5.0)
        state = "the running node re-reads it now"
    except ControlError:
        state = "the node is not running (or not reachable): it reads the file when it starts"
    print(
        f"newaliases: {path}: {len(book.aliases)} alias(es), {len(book.lists)} list(s); {state}",
        file=out,
    )
    return EX_OK


def run(
    program: str,
    args: Sequence[str],
    stdin: BinaryIO,
    out: TextIO,
    err: TextIO,
) -> int:
    """One sendmail, mailq or newaliases command; its exit status (sysexits.h)."""
    try:
        invocation = parse_args(args, program)
    except UsageProblem as error:
        print(f"{program}: {error}", file=err)
        return EX_USAGE
    path = config_path(invocation)
    if invocation.mode == "mailq":
        return mailq(path)
    try:
        config = load_config(path)
    except ConfigError as error:
        print(f"{program}: {error}", file=err)
        return EX_CONFIG
    if invocation.mode == "newaliases":
        return newaliases(config, out, err)
    if invocation.mode == "smtp":
        return smtp_dialogue(config, err)
    return deliver(invocation, config, stdin, err)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``sendmail`` console script."""
    args = sys.argv[1:] if argv is None else argv
    return run("sendmail", args, sys.stdin.buffer, sys.stdout, sys.stderr)


def mailq_main(argv: Sequence[str] | None = None) -> int:
    """The ``mailq`` console script (= sendmail -bp)."""
    args = sys.argv[1:] if argv is None else argv
    return run("mailq", args, sys.stdin.buffer, sys.stdout, sys.stderr)


def newaliases_main(argv: Sequence[str] | None = None) -> int:
    """The ``newaliases`` console script (= sendmail -bi)."""
    args = sys.argv[1:] if argv is None else argv
    return run("newaliases", args, sys.stdin.buffer, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
