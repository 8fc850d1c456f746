"""`mtrkmta track`: ask MTQP servers where a message is, following referrals hop by hop."""

from __future__ import annotations

import io
import json
import signal
import sys
from collections.abc import Sequence
from contextlib import suppress
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IResolver
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
    remote_host,
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
from mtrkmta.mtqp.timeline import trace_json
from mtrkmta.mtqp.uri import UriError, parse_uri
from mtrkmta.originator import SecretsFileError, default_secrets_path, load_secrets
from mtrkmta.smtp.statuscodes import with_meaning
from mtrkmta.tracking.status import RecipientStatus, TrackingReport

EXIT_COMPLETE = 0
EXIT_INCOMPLETE = 1
# The labels of the timeline, by indent; values start two columns after the longest.
LABELS = {
    2: ("Reporting MTA", "Arrived"),
    4: (
        "Final recipient",
        "Action",
        "Still queued",
        "Remote MTA",
        "Last attempt",
        "Diagnostic",
        "Next hop",
    ),
}
VALUE_COLUMN = max(indent + len(label) for indent, labels in LABELS.items() for label in labels) + 2


class TrackOptions(CommandOptions):
    program = "mtrkmta track"
    synopsis = (
        "[options] mtqp://HOST[:PORT]/track/ENVID/SECRET | --server HOST E S | --last | --pick N"
    )
    longdesc = (
        "Ask the tracking (MTQP) server where a message is, then the server of every next hop "
        "it was transferred to. Exit status: 0 when every recipient reached a final state "
        "(delivered, expanded, relayed, failed), 1 when not, 2 for a usage error."
    )
    optFlags = (
        ("last", None, "Track the message last sent with `mtrkmta send` (secrets file)."),
        ("json", None, "Print the whole trace as JSON."),
        ("raw", None, "Print each server's answer (the message/tracking-status entity)."),
        ("utc", None, "Print times in UTC rather than the local time zone."),
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

    def postOptions(self) -> None:
        if self["tls"] not in TLS_MODES:
            raise usage.UsageError(f"--tls is one of {', '.join(TLS_MODES)}, not {self['tls']!r}")
        if self["json"] and self["raw"]:
            raise usage.UsageError("--json and --raw exclude each other")
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
    trace = await tracker.follow(
        options["host"], options["envid"], options["secret"], port=options["port"]
    )
    if options["json"]:
        print(json.dumps(trace_json(trace), indent=2), file=out)
    elif options["raw"]:
        render_raw(trace, out)
    else:
        render_timeline(trace, out, timezone.utc if options["utc"] else None)
    return EXIT_COMPLETE if trace.complete else EXIT_INCOMPLETE


# -- output -------------------------------------------------------------------------------------


def _when(value: datetime | None, zone: tzinfo | None) -> str:
    """``value`` in ``zone`` (None: the local time zone) with its offset, or ``-``."""
    return "-" if value is None else value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %z")


def _where(hop: Hop) -> str:
    if hop.server is None:
        return hop.host
    tls = ", TLS" if hop.tls else ""
    return f"{hop.host} ({hop.server.address} port {hop.server.port}{tls})"


def _diagnostic(status: RecipientStatus) -> str | None:
    found = (value for name, value in status.extensions if name.lower() == "diagnostic-code")
    return next(found, None)


def _line(indent: int, label: str, value: str) -> str:
    """One ``label value`` line; values line up at VALUE_COLUMN whatever the indent, at
    least two spaces after the label."""
    return " " * indent + f"{label:<{max(VALUE_COLUMN - indent, len(label) + 2)}}{value}"


def _recipient_lines(
    report: TrackingReport, status: RecipientStatus, zone: tzinfo | None
) -> list[str]:
    action = status.action.lower()
    lines = [f"  {status.original_recipient.value}"]
    if status.final_recipient.value.lower() != status.original_recipient.value.lower():
        lines.append(_line(4, "Final recipient", status.final_recipient.value))
    lines.append(_line(4, "Action", f"{action} ({with_meaning(status.status)})"))
    if action == "delayed":
        until = _when(status.will_retry_until, zone) if status.will_retry_until else "unknown"
        where = report.reporting_mta.value
        lines.append(_line(4, "Still queued", f"at {where}, will retry until {until}"))
    if status.remote_mta is not None:
        lines.append(_line(4, "Remote MTA", status.remote_mta.value))
    if status.last_attempt_date is not None:
        lines.append(_line(4, "Last attempt", _when(status.last_attempt_date, zone)))
    diagnostic = _diagnostic(status)
    if diagnostic:
        lines.append(_line(4, "Diagnostic", diagnostic))
    if action == "transferred":
        lines.append(_line(4, "Next hop", remote_host(status) or "not named"))
    elif action == "relayed":
        lines.append(_line(4, "Next hop", "does not track; tracking ends here"))
    return lines


def _outcome(path: RecipientPath, zone: tzinfo | None) -> str:
    last = path.last
    if last is None:
        return path.outcome
    status = last.status
    code = with_meaning(status.status)
    where = last.reporting_mta
    if path.outcome == "delayed":
        until = _when(status.will_retry_until, zone) if status.will_retry_until else "unknown"
        return f"still queued at {where} ({code}), will retry until {until}"
    if path.outcome in ("delivered", "expanded", "failed"):
        return f"{path.outcome} ({code}) at {where}"
    if path.outcome == "relayed":
        remote = f" to {status.remote_mta.value}" if status.remote_mta is not None else ""
        return f"relayed ({code}) by {where}{remote}, which does not track"
    if path.outcome == "opaque":
        return f"{where} has nothing to say (opaque)"
    return f"{path.outcome} after {where}: {path.reason or 'no more information'}"


def render_timeline(trace: Trace, out: TextIO, zone: tzinfo | None = None) -> None:
    """One block per hop (server, per recipient: action, status, times, next hop), then one
    line per recipient with where it ended. Times in ``zone``, by default the local one."""
    print(f"Envelope id {trace.envid}", file=out)
    for number, hop in enumerate(trace.hops, start=1):
        print(file=out)
        referred = f", referred by {hop.referred_by}" if hop.referred_by else ""
        print(f"Hop {number}: {_where(hop)}{referred}", file=out)
        if not hop.reports:
            print(f"  no answer: {hop.error or 'nothing said'}", file=out)
            continue
        for report in hop.reports:
            print(_line(2, "Reporting MTA", report.reporting_mta.value), file=out)
            print(_line(2, "Arrived", _when(report.arrival_date, zone)), file=out)
            for status in report.recipients:
                for line in _recipient_lines(report, status, zone):
                    print(line, file=out)
    print(file=out)
    if not trace.recipients:
        print("Result: nothing known about this message", file=out)
        return
    verdict = "every recipient reached a final state" if trace.complete else "not finished"
    print(f"Result: {verdict}", file=out)
    for path in trace.recipients:
        print(f"  {path.original_recipient}: {_outcome(path, zone)}", file=out)


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
    """Run `mtrkmta track` on the global reactor; the exit status (0, 1 or 2)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    options = TrackOptions()
    status = parse(options, args, err)
    if status is not None:
        return status
    try:
        if options["nameserver"]:
            split_host_port(options["nameserver"], 53)
        if options["ca-file"]:
            trust_root_from_pem(Path(options["ca-file"]).read_bytes())
    except (OSError, ValueError) as error:
        return usage_error(options.program, str(error), err)
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    result: list[int] = []
    broken: list[BrokenPipeError] = []
    interrupted: list[int] = []

    async def track() -> None:
        # Printed once the trace is complete: after Ctrl-C the connections close while
        # the reactor stops, and the partial trace that makes is not worth showing.
        text = io.StringIO()
        try:
            resolver = system_resolver(reactor, options["nameserver"])
            result.append(await run(options, reactor, resolver, text))
            if not interrupted:
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
