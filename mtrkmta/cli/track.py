"""`mtrkmta track`: ask MTQP servers where a message is, following referrals hop by hop."""

from __future__ import annotations

import io
import json
import re
import signal
import sys
from collections.abc import Callable, Sequence
from contextlib import suppress
from datetime import datetime, timezone, tzinfo
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.internet.task import deferLater
from twisted.python import usage

from mtrkmta.cli.conventions import CommandOptions, parse, usage_error
from mtrkmta.cli.send import host_and_port, split_host_port
from mtrkmta.mtqp.client import (
    DEFAULT_MAX_HOPS,
    TLS_MODES,
    Hop,
    RecipientPath,
    TLSContextFactory,
    Trace,
    TrackingClient,
    default_tls_context,
    host_key,
    trust_root_from_pem,
    verifying_tls_context,
)
from mtrkmta.mtqp.protocol import (
    DEFAULT_PORT,
    CommandError,
    SecretError,
    decode_envid,
    decode_secret,
)
from mtrkmta.mtqp.timeline import Entry, entry_text, timeline, trace_json
from mtrkmta.mtqp.uri import UriError, parse_uri
from mtrkmta.originator import SecretsFileError, default_secrets_path, load_secrets
from mtrkmta.smtp.statuscodes import with_meaning
from mtrkmta.tracking.interfaces import EventKind
from mtrkmta.tracking.status import DELIVER_BY_FIELD, OMITTED, RecipientStatus

EXIT_COMPLETE = 0  # every recipient delivered, expanded, relayed or transferred
EXIT_INCOMPLETE = 1  # some recipient still pending, or unknown
EXIT_FAILED = 2  # some recipient failed (whatever the others did)
EX_USAGE = 64  # sysexits.h: a usage error (2 means "failed" for this command)
SUCCESSES = frozenset({"delivered", "expanded", "relayed", "transferred"})
WATCH_DEFAULT = 30.0  # seconds between two questions of --watch
WATCH_MINIMUM = 5.0  # never ask more often: each question is a TRACK at every hop


class TrackOptions(CommandOptions):
    program = "mtrkmta track"
    synopsis = (
        "[options] mtqp://HOST[:PORT]/track/ENVID/SECRET | --server HOST E S | --last | --pick N"
    )
    longdesc = (
        "Ask the tracking (MTQP) server where a message is, then the server of every next hop "
        "it was transferred to, and print what happened when, across hops. --watch [SECONDS] "
        f"asks again every SECONDS (default {WATCH_DEFAULT:g}, at least {WATCH_MINIMUM:g}) "
        "until every recipient is final. Exit status: 0 when every recipient was delivered, "
        "expanded, relayed or transferred; 1 when some is still pending or unknown; 2 when "
        "some failed; 64 for a usage error."
    )
    optFlags = (
        ("last", None, "Track the message last sent with `mtrkmta send` (secrets file)."),
        ("json", None, "Print the whole trace as JSON."),
        ("raw", None, "Print each server's answer (the message/tracking-status entity)."),
        ("utc", None, "Print times in UTC rather than the local time zone."),
        (
            "watch",
            None,
            "Ask again (every SECONDS, given after it) until every recipient is final.",
        ),
    )
    optParameters = (
        ("server", None, None, "Tracking server HOST[:PORT], with ENVID and SECRET."),
        ("tls", None, "may", "STARTTLS: require (verified), may (when offered), none."),
        ("ca-file", None, None, "PEM file of CAs that --tls require trusts [the system's]."),
        ("pick", None, None, "Track message N of `mtrkmta sent` (1, the newest, is --last)."),
        (
            "secrets",
            None,
            None,
            "Secrets file of --last, --pick [~/.local/share/mtrkmta/sent.jsonl].",
        ),
        ("max-hops", None, str(DEFAULT_MAX_HOPS), "Ask at most this many servers."),
        ("nameserver", None, None, "Resolve with this DNS server, ADDRESS[:PORT] [system]."),
    )

    def __init__(self) -> None:
        super().__init__()
        self["connect-to"] = {}

    def opt_connect_to(self, value: str) -> None:
        """HOST[:PORT]=ADDRESS:PORT: ask HOST's tracking server (asked without a port, or
        at PORT) at ADDRESS:PORT; repeatable."""
        host, equals, where = value.partition("=")
        if not equals or not host.strip():
            raise usage.UsageError(f"--connect-to wants HOST[:PORT]=ADDRESS:PORT, not {value!r}")
        try:
            name, asked_port = host_and_port(host)
            name = name[5:] if name[:5].lower() == "ipv6:" else name  # [IPv6:...] as written
            address, port = split_host_port(where, DEFAULT_PORT)
        except ValueError as error:
            raise usage.UsageError(f"--connect-to {value!r}: {error}") from None
        self["connect-to"][(host_key(name), asked_port)] = (address, port)

    def parseArgs(self, *args: str) -> None:
        self["args"] = args

    def _watch_interval(self) -> None:
        """``--watch [SECONDS]``: a number among the operands is its value (an ENVID has
        an ``@``, a URI a scheme, a secret at least 22 characters)."""
        interval = WATCH_DEFAULT
        numbers = [arg for arg in self["args"] if re.fullmatch(r"[0-9]{1,6}(?:\.[0-9]+)?", arg)]
        if len(numbers) > 1:
            raise usage.UsageError(f"--watch takes one SECONDS, not {' '.join(numbers)}")
        if numbers:
            interval = float(numbers[0])
            self["args"] = tuple(arg for arg in self["args"] if arg != numbers[0])
        if interval < WATCH_MINIMUM:
            raise usage.UsageError(
                f"--watch SECONDS is at least {WATCH_MINIMUM:g}, not {interval:g}"
            )
        self["interval"] = interval

    def postOptions(self) -> None:
        self["interval"] = None
        if self["watch"]:
            self._watch_interval()
        if self["tls"] not in TLS_MODES:
            raise usage.UsageError(f"--tls is one of {', '.join(TLS_MODES)}, not {self['tls']!r}")
        if self["json"] and self["raw"]:
            raise usage.UsageError("--json and --raw exclude each other")
        if self["watch"] and (self["json"] or self["raw"]):
            raise usage.UsageError("--watch prints the timeline: it excludes --json and --raw")
        if not self["max-hops"].isdigit() or int(self["max-hops"]) < 1:
            raise usage.UsageError(f"--max-hops is a number above 0, not {self['max-hops']!r}")
        self["max-hops"] = int(self["max-hops"])
        args = self["args"]
        pick = self["pick"]
        if pick is not None and (not pick.isdigit() or int(pick) < 1):
            raise usage.UsageError(f"--pick is a number above 0, not {pick!r}")
        if self["last"] and pick is not None:
            raise usage.UsageError("--last and --pick exclude each other (--last is --pick 1)")
        if self["last"] or pick is not None:
            given = "--last" if self["last"] else "--pick"
            if args or self["server"]:
                raise usage.UsageError(f"{given} takes no URI, --server, ENVID or SECRET")
            path = Path(self["secrets"]) if self["secrets"] else default_secrets_path()
            try:
                args = (load_secrets(path).pick(1 if pick is None else int(pick)).mtqp,)
            except SecretsFileError as error:
                raise usage.UsageError(str(error)) from None
        if self["server"]:
            if len(args) != 2:
                raise usage.UsageError("--server needs ENVID and SECRET")
            try:
                self["host"], port = host_and_port(self["server"])
                self["envid"] = decode_envid(args[0])
                decode_secret(args[1])
            except (ValueError, CommandError, SecretError) as error:
                raise usage.UsageError(str(error)) from None
            self["secret"] = args[1]
            self["port"] = port  # None: find the server by SRV, else port 1038
            return
        if len(args) != 1:
            raise usage.UsageError(
                "give an mtqp:// URI, --server HOST ENVID SECRET, --last or --pick N"
            )
        try:
            uri = parse_uri(args[0])
        except UriError as error:
            raise usage.UsageError(f"{args[0][:60]!r}... is not an mtqp URI: {error}") from None
        self["host"] = uri.host
        self["port"] = uri.port if uri.port != DEFAULT_PORT else None
        self["envid"] = uri.track().envid
        self["secret"] = uri.secret


async def run(
    options: TrackOptions, reactor: Any, resolver: IResolver, out: TextIO, **client: Any
) -> int:
    """Track as ``options`` say (parsed) and print the result; the exit status.

    ``client`` adds TrackingClient arguments (tests shorten ``reply_timeout``).
    """
    tls_context: TLSContextFactory = default_tls_context
    if options["ca-file"]:
        trust_root = trust_root_from_pem(Path(options["ca-file"]).read_bytes())
        tls_context = verifying_tls_context(trust_root)
    overrides: dict[tuple[str, int | None], tuple[str, int]] = dict(options["connect-to"])
    tracker = TrackingClient(
        reactor,
        resolver,
        tls=options["tls"],
        tls_context=tls_context,
        connect_to=lambda host, port: overrides.get((host, port)),
        max_hops=options["max-hops"],
        **client,
    )

    def follow() -> Deferred[Trace]:
        return tracker.follow(
            options["host"], options["envid"], options["secret"], port=options["port"]
        )

    zone = timezone.utc if options["utc"] else None
    if options["interval"] is not None:
        return await watch(follow, reactor, out, options["interval"], zone)
    trace = await follow()
    if options["json"]:
        print(json.dumps(trace_json(trace), indent=2), file=out)
    elif options["raw"]:
        render_raw(trace, out)
    else:
        render_timeline(trace, out, zone)
    return exit_status(trace)


def exit_status(trace: Trace) -> int:
    """2 when some recipient failed; else 0 when every one was delivered, expanded,
    relayed or transferred (RFC 3886 §3.3.3); else 1 (pending, unknown, nothing known)."""
    if any(path.outcome == "failed" for path in trace.recipients):
        return EXIT_FAILED
    if trace.recipients and all(path.outcome in SUCCESSES for path in trace.recipients):
        return EXIT_COMPLETE
    return EXIT_INCOMPLETE


async def watch(
    follow: Callable[[], Deferred[Trace]],
    clock: IReactorTime,
    out: TextIO,
    interval: float,
    zone: tzinfo | None = None,
) -> int:
    """Ask with ``follow`` every ``interval`` seconds of ``clock`` until every recipient
    is final; print each hop and each event once, as they become known, then the
    result. The exit status is :func:`exit_status`'s of the last trace."""
    shown: set[object] = set()
    first: datetime | None = None
    print_header = True
    while True:
        trace = await follow()
        if print_header:
            print(f"Envelope id {trace.envid}", file=out)
            print_header = False
        for line in _hop_lines(trace):
            if line not in shown:
                shown.add(line)
                print(line, file=out)
        entries = timeline(trace)
        if entries and (first is None or entries[0].time < first):
            first = entries[0].time
        for entry in entries:
            key = _key(entry)
            if key in shown or first is None:
                continue
            shown.add(key)
            print(_event_line(entry, first, zone), file=out)
        out.flush()
        if trace.complete:
            print(file=out)
            _render_result(trace, entries, out, zone)
            return exit_status(trace)
        await deferLater(clock, interval, lambda: None)


def _key(entry: Entry) -> object:
    if entry.kind == OMITTED:  # its count grows while the recipient waits: say it once
        return (entry.hop, entry.recipient, entry.kind)
    return (entry.hop, entry.recipient, entry.time, entry.kind, entry.detail, entry.status)


# -- output -------------------------------------------------------------------------------------


def _when(value: datetime | None, zone: tzinfo | None) -> str:
    """``value`` in ``zone`` (None: the local time zone) with its offset, or ``-``."""
    return "-" if value is None else value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %z")


def _clock(zone: tzinfo | None) -> Callable[[datetime, datetime], str]:
    """Times inside an event's text: the time of day when on the event's own day."""

    def when(value: datetime, reference: datetime) -> str:
        local = value.astimezone(zone)
        if local.date() == reference.astimezone(zone).date():
            return local.strftime("%H:%M:%S")
        return local.strftime("%Y-%m-%d %H:%M:%S")

    return when


def elapsed(seconds: float) -> str:
    """``+0s``, ``+2m14s``, ``+3h05m``, ``+2d04h``: time since the first event."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"+{days}d{hours:02d}h"
    if hours:
        return f"+{hours}h{minutes:02d}m"
    if minutes:
        return f"+{minutes}m{secs:02d}s"
    return f"+{secs}s"


def _event_line(entry: Entry, first: datetime, zone: tzinfo | None) -> str:
    since = elapsed((entry.time - first).total_seconds())
    who = f"{entry.recipient}: " if entry.recipient else ""
    text = entry_text(entry, _clock(zone))
    return f"  {_when(entry.time, zone)}  {since:>7}  hop {entry.hop}  {who}{text}"


def _where(hop: Hop) -> str:
    if hop.server is None:
        return hop.host
    tls = ", TLS" if hop.tls else ""
    return f"{hop.host} ({hop.server.address} port {hop.server.port}{tls})"


def _hop_lines(trace: Trace) -> list[str]:
    lines: list[str] = []
    for number, hop in enumerate(trace.hops, start=1):
        referred = f", referred by {hop.referred_by}" if hop.referred_by else ""
        lines.append(f"Hop {number}: {_where(hop)}{referred}")
        if not hop.reports:
            lines.append(f"  no answer: {hop.error or 'nothing said'}")
    return lines


def _next_attempt(path: RecipientPath, entries: Sequence[Entry]) -> datetime | None:
    """The next attempt the last hop announced for the recipient, if it said."""
    last = path.last
    if last is None:
        return None
    found = [
        entry.next_attempt
        for entry in entries
        if entry.hop == last.hop + 1
        and entry.recipient is not None
        and entry.recipient.lower() == last.status.original_recipient.value.lower()
        and entry.next_attempt is not None
    ]
    return found[-1] if found else None


def _deliver_by(status: RecipientStatus) -> datetime | None:
    """The deliver-by-time (RFC 2852) a hop reported for a queued recipient, if any: its
    ``X-Mtrkmta-Deliver-By`` extension field; a value that is not a date is ignored."""
    for name, value in status.extensions:
        if name.lower() == DELIVER_BY_FIELD.lower():
            with suppress(TypeError, ValueError, IndexError):
                found = parsedate_to_datetime(value)
                if found.tzinfo is not None:
                    return found
    return None


def _held(path: RecipientPath, entries: Sequence[Entry]) -> Entry | None:
    """The hold of the message at the recipient's last hop, unless a release followed."""
    last = path.last
    if last is None:
        return None
    marks = [
        entry
        for entry in entries
        if entry.hop == last.hop + 1
        and entry.recipient is None
        and entry.kind in (EventKind.HELD.value, EventKind.RELEASED.value)
    ]
    return marks[-1] if marks and marks[-1].kind == EventKind.HELD.value else None


def _outcome(path: RecipientPath, entries: Sequence[Entry], zone: tzinfo | None) -> str:
    last = path.last
    if last is None:
        return path.outcome
    status = last.status
    code = with_meaning(status.status)
    where = last.reporting_mta
    held = _held(path, entries) if path.outcome == "delayed" else None
    if held is not None:  # a held message is not tried at all: not "delayed" (RFC 3886)
        reason = held.get("reason")
        who = " by the administrator" if held.by_administrator else ""
        why = f" ({reason})" if reason and not held.by_administrator else ""
        return f"held at {where}{who}{why}: not tried until it is released"
    if path.outcome == "delayed":
        until = _when(status.will_retry_until, zone) if status.will_retry_until else "unknown"
        upcoming = _next_attempt(path, entries)
        then = f", next attempt {_when(upcoming, zone)}" if upcoming is not None else ""
        deadline = _deliver_by(status)
        by = f", to be delivered by {_when(deadline, zone)}" if deadline is not None else ""
        return f"still queued at {where} ({code}){then}, will retry until {until}{by}"
    if path.outcome in ("delivered", "expanded", "failed"):
        return f"{path.outcome} ({code}) at {where}"
    if path.outcome == "relayed":
        remote = f" to {status.remote_mta.value}" if status.remote_mta is not None else ""
        return f"relayed ({code}) by {where}{remote}, which does not track"
    if path.outcome == "opaque":
        return f"{where} has nothing to say (opaque)"
    return f"{path.outcome} after {where}: {path.reason or 'no more information'}"


def _render_result(
    trace: Trace, entries: Sequence[Entry], out: TextIO, zone: tzinfo | None
) -> None:
    if not trace.recipients:
        print("Result: nothing known about this message", file=out)
        return
    status = exit_status(trace)
    verdict = {
        EXIT_COMPLETE: "every recipient reached a final state",
        EXIT_FAILED: "some recipient failed",
    }.get(status, "not finished")
    print(f"Result: {verdict}", file=out)
    for path in trace.recipients:
        print(f"  {path.original_recipient}: {_outcome(path, entries, zone)}", file=out)


def render_timeline(trace: Trace, out: TextIO, zone: tzinfo | None = None) -> None:
    """The hops asked, then every event across them in time order with the time since
    the first (RFC 3463 meanings beside the codes), then one line per recipient with
    where it ended. Times in ``zone``, by default the local one."""
    print(f"Envelope id {trace.envid}", file=out)
    print(file=out)
    for line in _hop_lines(trace):
        print(line, file=out)
    entries = timeline(trace)
    if entries:
        print(file=out)
        print("Timeline", file=out)
        for entry in entries:
            print(_event_line(entry, entries[0].time, zone), file=out)
    print(file=out)
    _render_result(trace, entries, out, zone)


def render_raw(trace: Trace, out: TextIO) -> None:
    """Each server's answer as received: its multipart/related of message/tracking-status."""
    for number, hop in enumerate(trace.hops, start=1):
        print(f"# hop {number}: {_where(hop)}", file=out)
        if hop.response is not None:
            print(f"# {hop.response.status_line().decode('ascii', 'replace')}", file=out)
        if hop.reports:
            out.write(hop.entity.decode("utf-8", "replace").replace("\r\n", "\n"))
        else:
            print(f"# no answer: {hop.error or 'nothing said'}", file=out)


# -- the command ---------------------------------------------------------------------------------


def system_resolver(reactor: Any, nameserver: str | None) -> IResolver:
    """The resolver of the command: /etc/hosts and resolv.conf, or one given DNS server."""
    from twisted.names import client

    if nameserver:
        address, port = split_host_port(nameserver, 53)
        return client.Resolver(servers=[(address, port)], reactor=reactor)
    return client.createResolver()  # on the global reactor, which the command runs


def main(args: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run `mtrkmta track` on the global reactor; the exit status (0, 1, 2, or 64 for a
    usage error: :data:`EX_USAGE`)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    options = TrackOptions()
    status = parse(options, args, err, EX_USAGE)
    if status is not None:
        return status
    try:
        if options["nameserver"]:
            split_host_port(options["nameserver"], 53)
        if options["ca-file"]:
            trust_root_from_pem(Path(options["ca-file"]).read_bytes())
    except (OSError, ValueError) as error:
        return usage_error(options.program, str(error), err, EX_USAGE)
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    result: list[int] = []
    broken: list[BrokenPipeError] = []
    interrupted: list[int] = []

    async def track() -> None:
        # Printed once the trace is complete: after Ctrl-C the connections close while
        # the reactor stops, and the partial trace that makes is not worth showing.
        # --watch prints each answer as it comes (its progress), straight to ``out``.
        text = io.StringIO()
        watching = options["interval"] is not None
        try:
            resolver = system_resolver(reactor, options["nameserver"])
            result.append(await run(options, reactor, resolver, out if watching else text))
            if not interrupted and not watching:
                out.write(text.getvalue())
        except BrokenPipeError as error:  # `| head -1`: mtrkmta's main() ends quietly
            broken.append(error)
        except Exception as error:  # report, never leave the reactor running
            if not interrupted:
                print(f"mtrkmta: {error}", file=err)
            result.append(EXIT_INCOMPLETE)
        finally:
            with suppress(ReactorNotRunning):
                reactor.stop()

    def interrupt(number: int, frame: FrameType | None) -> None:
        # Ctrl-C ends the command as KeyboardInterrupt does everywhere else (status 130),
        # rather than as a run that found nothing (Twisted's own handler just stops).
        interrupted.append(number)
        reactor.callFromThread(reactor.stop)

    reactor.callWhenRunning(signal.signal, signal.SIGINT, interrupt)
    reactor.callWhenRunning(lambda: ensureDeferred(track()))
    reactor.run()
    if interrupted:
        raise KeyboardInterrupt
    if broken:
        raise broken[0]
    return result[0] if result else EXIT_INCOMPLETE
