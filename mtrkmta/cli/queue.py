"""`mtrkmta queue`: list, show, flush, hold, release, delete, bounce over the control socket."""

from __future__ import annotations

import difflib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from twisted.python import usage

from mtrkmta.cli.conventions import CommandOptions, parse
from mtrkmta.cli.options import ServeOptions
from mtrkmta.config import EXIT_CONFIG_ERROR, ConfigError
from mtrkmta.queue.control import COMMANDS, COMMANDS_WITH_ID, SOCKET_NAME, ControlError, request
from mtrkmta.workers import WORKERS_DIR


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(seconds))


def render_list(listing: Sequence[dict[str, Any]], out: TextIO) -> None:
    """A mailq-like listing: one block per message, ``!`` marks held messages (with the
    reason); then the quarantined messages, one line each, with the reason."""
    messages = [m for m in listing if not m.get("quarantined")]
    quarantined = [m for m in listing if m.get("quarantined")]
    if messages:
        render_queue(messages, out)
    else:
        print("Mail queue is empty", file=out)
    if quarantined:
        print(file=out)
        print(f"{'-Quarantined-':<22}{'--Size--':>9} -Reason-", file=out)
        for message in quarantined:
            print(
                f"{message['queue_id']:<22}{message['size']:>9} {message['quarantine_reason']}",
                file=out,
            )
        print(
            f"-- {len(quarantined)} message(s) in quarantine "
            "(mtrkmta queue show|release|delete QUEUEID)",
            file=out,
        )


def render_queue(messages: Sequence[dict[str, Any]], out: TextIO) -> None:
    """The queued messages, as mailq lists them."""
    print(
        f"{'-Queue ID-':<22}{'--Size--':>9} {'----Arrival Time----':<20}  -Sender/Recipient-",
        file=out,
    )
    for message in messages:
        mark = "!" if message["held"] else " "
        sender = message["sender"] or "MAILER-DAEMON"
        print(
            f"{message['queue_id'] + mark:<22}{message['size']:>9} "
            f"{_when(message['arrival']):<20}  {sender}",
            file=out,
        )
        if message["held"]:
            print(f"{'':<54}(held: {message['hold_reason'] or 'no reason given'})", file=out)
        for rcpt in message["recipients"]:
            if rcpt["state"] not in ("queued", "inflight", "deferred"):
                continue
            if rcpt["diagnostic"]:
                print(f"{'':<54}({rcpt['diagnostic']})", file=out)
            print(
                f"{'':<54}{rcpt['address']}  [{rcpt['state']}"
                f"{', next ' + _when(rcpt['next_attempt']) if rcpt['next_attempt'] else ''}]",
                file=out,
            )
        print(file=out)
    print(f"-- {len(messages)} message(s) in the queue", file=out)


def render_show(message: dict[str, Any], out: TextIO) -> None:
    if message["quarantined"]:
        print(f"{'Quarantined:':<20}{message['quarantine_reason']}", file=out)
        if message["sender"] is None:  # a file without a tracking record
            print(f"{'Queue-Id:':<20}{message['queue_id']}", file=out)
            print(f"{'Size:':<20}{message['size']}", file=out)
            return
    fields = [
        ("Queue-Id", message["queue_id"]),
        ("Held", "yes" if message["held"] else "no"),
        ("Sender", f"<{message['sender']}>"),
        ("Size", message["size"]),
        ("Arrival", _when(message["arrival"])),
        ("Envelope-Id", message["envid"] or "-"),
        ("Tracked", "yes (MTRK)" if message["certifier"] else "no"),
        (
            "Client",
            f"{message['client']['helo']} [{message['client']['address']}] "
            f"via {message['client']['listener']}",
        ),
    ]
    if message["held"]:
        fields.insert(2, ("Hold-Reason", message["hold_reason"] or "-"))
    for name, value in fields:
        print(f"{name + ':':<20}{value}", file=out)
    for rcpt in message["recipients"]:
        print(file=out)
        print(f"  {'Recipient:':<18}<{rcpt['address']}>", file=out)
        for key in ("state", "status", "remote_mta", "diagnostic", "attempts"):
            if rcpt[key] not in (None, ""):
                print(f"  {key.replace('_', '-').capitalize() + ':':<18}{rcpt[key]}", file=out)
        for key in ("last_attempt", "next_attempt", "will_retry_until"):
            if rcpt[key]:
                label = key.replace("_", "-").capitalize() + ":"
                print(f"  {label:<18}{_when(rcpt[key])}", file=out)
    render_events(message, out)


def render_events(message: dict[str, Any], out: TextIO) -> None:
    """The "Events:" section of ``queue show``: one line per event in time order, with
    its time, kind, recipient (``-`` for the whole message) and detail."""
    events = message.get("events") or []
    if not events:
        return
    addresses = {r["index"]: r["address"] for r in message.get("recipients") or []}
    print(file=out)
    print("Events:", file=out)
    for event in events:
        index = event["recipient"]
        who = "-" if index is None else f"<{addresses.get(index, index)}>"
        details = []
        for name, value in event["detail"].items():
            if name == "next_attempt" and value.isdigit():
                value = _when(int(value))
            shown = f'"{value}"' if " " in value else value
            details.append(f"{name.replace('_', '-')}={shown}")
        line = f"  {_when(event['time'])}  {event['kind']:<12} {who}  {' '.join(details)}"
        print(line.rstrip(), file=out)


class ControlOptions(CommandOptions):
    """The options that find a running server's control socket: its configuration file
    or its data directory."""

    optParameters = (
        ("config", None, None, "The server's configuration file (to find its data dir)."),
        ("data-dir", None, None, "The server's data directory [default: ./mtrkmta-data]."),
    )

    def socket_path(self) -> Path:
        serve = ServeOptions()
        args = []
        if self["config"]:
            args += ["--config", self["config"]]
        if self["data-dir"]:
            args += ["--data-dir", self["data-dir"]]
        serve.parseOptions(args)
        return serve.load_config().data_dir / SOCKET_NAME


class QueueOptions(ControlOptions):
    program = "mtrkmta queue"
    synopsis = "[options] COMMAND [QUEUEID]"
    longdesc = (
        "Ask the running server (over its control socket, <data dir>/control.sock) about its "
        "queue, or act on it. Exit status: 0 done, 1 refused or not reachable, 2 usage error."
    )
    commands: tuple[tuple[str, str], ...] = (
        ("list", "the queued messages (as mailq lists them), then the quarantined ones"),
        ("show QUEUEID", "everything known about one message and its recipients"),
        ("flush [QUEUEID]", "try one message, or every message, now"),
        ("hold QUEUEID", "stop trying a message until it is released"),
        ("release QUEUEID", "try a held message again; requeue a repaired quarantined one"),
        ("delete QUEUEID", "remove a message without telling anyone (asks first)"),
        ("bounce QUEUEID", "fail every recipient still queued, notify the sender (asks first)"),
    )
    optFlags: tuple[tuple[str, str | None, str], ...] = (
        ("json", None, "Print the raw JSON answer."),
        ("yes", "y", "Do not ask before deleting or bouncing."),
    )

    # Options.parseArgs is declared without arguments, but usage.Options passes the
    # positional arguments and checks their count against the override's signature.
    def parseArgs(self, command: str, queue_id: str | None = None) -> None:  # type: ignore[override]
        if command not in COMMANDS or command == "set-max-retention":
            close = difflib.get_close_matches(command, [c for c, _ in self.commands], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise usage.UsageError(f"unknown command {command!r}{hint}")
        if command in COMMANDS_WITH_ID and queue_id is None:
            raise usage.UsageError(f"{command} needs a QUEUEID")
        if command == "list" and queue_id is not None:
            raise usage.UsageError("list takes no QUEUEID")
        self["command"] = command
        self["queue_id"] = queue_id


def node_sockets(path: Path) -> list[Path]:
    """The control socket at ``path``, then those of its worker processes, by number."""
    try:
        found = [
            p
            for p in (path.parent / WORKERS_DIR).glob(f"*/{SOCKET_NAME}")
            if p.parent.name.isdigit()
        ]
    except PermissionError:  # the request to ``path`` says so in one line
        found = []
    return [path, *sorted(found, key=lambda p: int(p.parent.name))]


def request_every_node(path: Path, command: str, queue_id: str | None = None, **extra: Any) -> Any:
    """One request to a server with worker processes (``server.workers``): each process
    is a node with a queue of its own.

    ``list`` merges every queue by arrival; ``flush`` without an id and
    ``set-max-retention`` go to every process and add up; a command for one
    message goes to the process whose queue holds it.
    """
    sockets = node_sockets(path)
    if len(sockets) == 1:
        return request(path, command, queue_id, **extra)
    if command == "list":
        listing = [m for each in sockets for m in request(each, command)]
        return sorted(listing, key=lambda m: (m["arrival"], m["queue_id"]))
    if queue_id is None:
        return sum(request(each, command, **extra) for each in sockets)
    for each in sockets:
        try:
            request(each, "show", queue_id)
        except ControlError as error:
            if not str(error).startswith("no message"):
                raise  # that process did not answer: say so rather than guess
            continue
        return request(each, command, queue_id, **extra)
    raise ControlError(f"no message {queue_id} in the queue of any process")


def control_socket(options: ControlOptions, args: Sequence[str], err: TextIO) -> Path | int:
    """Parse ``args`` into ``options`` and find the server's control socket; or the exit
    status (0 after --help or --version; 2 after a mistake, printed on ``err``)."""
    status = parse(options, args, err)
    if status is not None:
        return status
    try:
        return options.socket_path()
    except ConfigError as error:
        print(f"mtrkmta: {error}", file=err)
        return EXIT_CONFIG_ERROR


def main(
    args: Sequence[str],
    out: TextIO | None = None,
    err: TextIO | None = None,
    ask: Callable[[str], str] = input,
) -> int:
    out = sys.stdout if out is None else out  # the current ones, as main() may replace them
    err = sys.stderr if err is None else err
    options = QueueOptions()
    path = control_socket(options, args, err)
    if isinstance(path, int):
        return path
    command, queue_id = options["command"], options["queue_id"]
    if command in ("delete", "bounce") and not options["yes"]:
        try:
            answer = ask(f"{command} message {queue_id}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing done", file=err)
            return 1
    try:
        result = request_every_node(path, command, queue_id)
    except ControlError as error:
        print(f"mtrkmta: {error}", file=err)
        return 1
    if options["json"]:
        print(json.dumps(result, indent=2), file=out)
    elif command == "list":
        render_list(result, out)
    elif command == "show":
        render_show(result, out)
    elif command == "flush":
        print(f"flushed {result} message(s)", file=out)
    else:
        print(f"{queue_id}: {command} done", file=out)
    return 0
