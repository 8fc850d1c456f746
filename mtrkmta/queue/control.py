"""The admin control channel: JSON lines over a UNIX socket (mode 0600) in the data dir."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from mtrkmta.config import MIN_RETENTION
from mtrkmta.queue.service import QueueActionRefused, QueueService
from mtrkmta.spool.interfaces import QuarantinedFile
from mtrkmta.tracking.interfaces import Event, StoredMessage

log = Logger()

SOCKET_NAME = "control.sock"
COMMANDS_WITH_ID = ("show", "hold", "release", "delete", "bounce")
COMMANDS = ("list", "flush", "set-max-retention", *COMMANDS_WITH_ID)
# Asked by sendmail and newaliases, not by `mtrkmta queue`: scan the pickup directory now,
# re-read the aliases file now.
PICKUP = "pickup"
RELOAD_ALIASES = "reload-aliases"
NODE_COMMANDS = (PICKUP, RELOAD_ALIASES)
MAX_REQUEST = 4096


class ControlError(Exception):
    """A control request failed; the message is meant for the administrator."""


ORPHAN_REASON = "no tracking record: never acknowledged (a crash before the commit)"


def message_record(message: StoredMessage, *, quarantined: bool = False) -> dict[str, Any]:
    """A JSON-ready view of a message of the queue (or of quarantine)."""
    record = asdict(message)
    record["quarantined"] = quarantined
    record["certifier"] = None if message.certifier is None else "(set)"
    for recipient in record["recipients"]:
        recipient["state"] = recipient["state"].value
        notify = recipient["notify"]
        recipient["notify"] = None if notify is None else sorted(notify)
        orcpt = recipient["orcpt"]
        recipient["orcpt"] = None if orcpt is None else f"{orcpt['addr_type']};{orcpt['address']}"
    return record


def event_record(event: Event) -> dict[str, Any]:
    """A JSON-ready view of one event of a message (``queue show``)."""
    return {
        "time": event.time,
        "kind": event.kind.value,
        "recipient": event.recipient,
        "detail": dict(event.detail),
    }


def quarantine_record(entry: QuarantinedFile, message: StoredMessage | None) -> dict[str, Any]:
    """A JSON-ready view of a quarantined file: its message's record, or what the file
    itself tells when there is no record."""
    if message is not None:
        record = message_record(message, quarantined=True)
        record["quarantine_reason"] = message.quarantine_reason or ORPHAN_REASON
        return record
    return {
        "queue_id": entry.queue_id,
        "quarantined": True,
        "quarantine_reason": ORPHAN_REASON,
        "held": False,
        "hold_reason": None,
        "size": entry.size,
        "arrival": int(entry.changed),
        "sender": None,
        "recipients": [],
    }


async def queue_list(queue: QueueService) -> list[dict[str, Any]]:
    """``queue list``: the node's queued messages, then its quarantined ones (also the
    HTTP admin API's ``/api/v1/queue``)."""
    listing = await queue.tracking.queue_listing(queue.node_id)
    quarantined = await queue.quarantined()
    return [message_record(m) for m in listing] + [
        quarantine_record(entry, m) for entry, m in quarantined
    ]


async def queue_show(queue: QueueService, queue_id: str) -> dict[str, Any]:
    """``queue show``: one message of the node's queue or quarantine with its events;
    ControlError when there is none (also ``/api/v1/queue/<queue id>``)."""
    events = [event_record(e) for e in await queue.tracking.events(queue_id)]
    for entry, record in await queue.quarantined():
        if entry.queue_id == queue_id:
            return {**quarantine_record(entry, record), "events": events}
    message = await queue.tracking.message(queue_id)
    if message is None or message.node_id != queue.node_id:
        raise ControlError(f"no message {queue_id} in this node's queue")
    return {**message_record(message), "events": events}


class ControlProtocol(LineOnlyReceiver):
    """One admin connection: one JSON request per line, one JSON answer per line."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def __init__(
        self, queue: QueueService, hooks: dict[str, Callable[[], object]] | None = None
    ) -> None:
        self.queue = queue
        self.hooks = hooks or {}  # NODE_COMMANDS this node answers
        self._chain: Deferred[None] = succeed(None)  # answers go out in request order
        self._lost = False  # the client went away: its answers have nowhere to go

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True

    def lineReceived(self, line: bytes) -> None:
        self._chain.addCallback(lambda _: self._answer(line))

    def _answer(self, line: bytes) -> Deferred[None]:
        d = ensureDeferred(self._handle(line))
        d.addCallback(lambda result: {"ok": True, "result": result})
        d.addErrback(self._error)
        return d.addCallback(self._reply)

    def _error(self, failure: Any) -> dict[str, Any]:
        if failure.check(ControlError, QueueActionRefused):
            return {"ok": False, "error": str(failure.value)}
        log.failure("control request failed", failure)
        return {"ok": False, "error": f"internal error: {failure.getErrorMessage()}"}

    def _reply(self, answer: dict[str, Any]) -> None:
        if self.transport is None or self._lost:
            return
        self.sendLine(json.dumps(answer, separators=(",", ":")).encode())

    async def _handle(self, line: bytes) -> Any:
        try:
            request = json.loads(line)
        except ValueError:
            raise ControlError("request is not JSON") from None
        if isinstance(request, dict) and request.get("command") in self.hooks:
            self.hooks[request["command"]]()
            return True
        if not isinstance(request, dict) or request.get("command") not in COMMANDS:
            raise ControlError(f"unknown command; expected one of {', '.join(COMMANDS)}")
        command = request["command"]
        queue_id = request.get("queue_id")
        if command in COMMANDS_WITH_ID and not isinstance(queue_id, str):
            raise ControlError(f"{command} needs a queue id")
        queue = self.queue
        if command == "list":
            return await queue_list(queue)
        if command == "flush":
            return await queue.flush(queue_id if isinstance(queue_id, str) else None)
        if command == "set-max-retention":
            seconds = request.get("seconds")
            if not isinstance(seconds, int | float) or isinstance(seconds, bool):
                raise ControlError("set-max-retention needs seconds")
            if seconds < MIN_RETENTION:
                raise ControlError("the retention cap must be at least one day (RFC 3885)")
            changed = await queue.tracking.lower_retention(float(seconds))
            log.info(
                "tracking retention capped at {s}s; {n} record(s) expire earlier",
                s=seconds,
                n=changed,
            )
            return changed
        assert isinstance(queue_id, str)  # every command left is in COMMANDS_WITH_ID
        if command == "show":
            return await queue_show(queue, queue_id)
        action = {
            "hold": queue.hold,
            "release": queue.release,
            "delete": queue.delete,
            "bounce": queue.bounce,
        }[command]
        if not await action(queue_id):
            raise ControlError(f"no message {queue_id} in this node's queue")
        return queue_id


class ControlFactory(Factory):
    noisy = False  # no "Starting factory" line in the log

    def __init__(
        self, queue: QueueService, hooks: dict[str, Callable[[], object]] | None = None
    ) -> None:
        self.queue = queue
        self.hooks = hooks  # see ControlProtocol

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.queue, self.hooks)


def request(
    socket_path: Path,
    command: str,
    queue_id: str | None = None,
    timeout: float = 60.0,
    **fields: Any,
) -> Any:
    """Blocking client for the CLI: send one request, return the result or raise ControlError."""
    payload: dict[str, Any] = {"command": command, **fields}
    if queue_id is not None:
        payload["queue_id"] = queue_id
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(timeout)
            client.connect(str(socket_path))
            client.sendall(json.dumps(payload).encode() + b"\n")
            buffer = b""
            while not buffer.endswith(b"\n"):
                chunk = client.recv(65536)
                if not chunk:
                    raise ControlError("the server closed the control connection")
                buffer += chunk
    except FileNotFoundError:
        raise ControlError(f"no control socket at {socket_path}: is mtrkmta running?") from None
    except ConnectionRefusedError:
        raise ControlError(f"nothing listens on {socket_path}: is mtrkmta running?") from None
    except PermissionError:
        raise ControlError(
            f"permission denied on {socket_path}: run as root or as the server's user"
        ) from None
    except OSError as error:
        raise ControlError(f"control socket {socket_path}: {error}") from None
    answer = json.loads(buffer)
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "request failed"))
    return answer["result"]
