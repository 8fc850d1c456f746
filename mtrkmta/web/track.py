"""The tracking page (``/track``) and the JSON tracking API (``/api/v1/track``, its OpenAPI)."""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import pages
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from mtrkmta.metrics import IMetrics, NoMetrics
from mtrkmta.mtqp.client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_HOPS,
    MIN_REPLY_TIMEOUT,
    HostMap,
    TLSMode,
    Trace,
    TrackingClient,
)
from mtrkmta.mtqp.protocol import DEFAULT_PORT
from mtrkmta.mtqp.server import RATE_WINDOW, RateLimiter
from mtrkmta.mtqp.timeline import trace_json
from mtrkmta.mtqp.uri import MtqpUri, UriError, parse_uri
from mtrkmta.web.site import SECURITY_HEADERS

if TYPE_CHECKING:
    from mtrkmta.config import Config

log = Logger()

DEFAULT_DEADLINE = 300.0
"""How long one HTTP query may follow a message before it is answered 504 (seconds)."""
MAX_BODY = 8192
"""The largest request body read (octets): a URI, or envid, secret and server, fit easily."""
SECRET_MASK = "[secret]"
QUERY_RESULT = {"trace": "found", "not_found": "not_found", "rate_limited": "rate_limited"}
"""The metrics' result of an answer (mtrkmta.metrics.QUERY_RESULTS), by its code; any other
(the next hops failed or took too long) is ``unavailable``."""

#: Every error code of the API and the page, with its HTTP status.
ERRORS: dict[str, int] = {
    "bad_request": 400,
    "not_found": 404,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_query": 422,
    "rate_limited": 429,
    "upstream_error": 502,
    "timeout": 504,
}


# -- the query (sans-IO) ------------------------------------------------------------------------


class QueryError(Exception):
    """A request that cannot be answered: a stable ``code`` (a key of ERRORS) and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return ERRORS[self.code]


@dataclass(frozen=True, slots=True)
class TrackQuery:
    """Whom to ask first and about what: as ``mtrkmta track`` reads a URI or ``--server``.

    ``port`` None lets the client find the server by SRV, else port 1038; ``envid``
    is decoded (not xtext); ``secret`` is the base64 mtrk-secret, kept out of ``repr``.
    """

    host: str
    port: int | None
    envid: str
    secret: str = field(repr=False)


def _text(fields: Mapping[str, object], name: str) -> str:
    value = fields.get(name, "")
    if not isinstance(value, str):
        raise QueryError("invalid_query", f"{name} must be a string")
    return value.strip()


def split_server(text: str) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT``, ``[IPv6]``, ``[IPv6]:PORT`` or a bare IPv6 address: (host, port)."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise UriError("unclosed [ in the server")
        host, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise UriError("the server has text after its ]")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UriError("the server's port is a number from 1 to 65535")
    return host, int(port_text)


def parse_query(fields: Mapping[str, object]) -> TrackQuery:
    """The query of a form or JSON object: ``uri``, or ``envid`` + ``secret`` + ``server``.

    The same rules as ``mtrkmta track``: an mtqp URI (RFC 3887 §9) whose port, when
    1038, lets SRV decide; or a server HOST[:PORT] with the xtext envid and the
    base64 secret. Messages never quote the secret.
    """
    uri_text = _text(fields, "uri")
    envid, secret, server = (_text(fields, name) for name in ("envid", "secret", "server"))
    if uri_text:
        if envid or secret or server:
            raise QueryError("invalid_query", "give either uri, or envid, secret and server")
        try:
            uri = parse_uri(uri_text)
        except UriError as error:
            raise QueryError("invalid_query", f"not an mtqp URI: {error}") from None
        port = None if uri.port == DEFAULT_PORT else uri.port
        return TrackQuery(uri.host, port, uri.track().envid, uri.secret)
    given = {"envid": envid, "secret": secret, "server": server}
    missing = [name for name, value in given.items() if not value]
    if missing:
        message = f"give a uri, or envid, secret and server ({missing[0]} is missing)"
        raise QueryError("invalid_query", message)
    try:
        host, port = split_server(server)
        uri = MtqpUri(host=host, envid=envid, secret=secret, port=port or DEFAULT_PORT)
    except UriError as error:
        raise QueryError("invalid_query", str(error)) from None
    return TrackQuery(uri.host, port, uri.track().envid, uri.secret)


def form_fields(body: bytes) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (the last of repeated names wins)."""
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        raise QueryError("bad_request", "the form is not URL-encoded UTF-8 text") from None
    return dict(pairs)


def json_fields(body: bytes) -> dict[str, object]:
    """A JSON object body."""
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise QueryError("bad_request", "the body is not JSON") from None
    if not isinstance(value, dict):
        raise QueryError("bad_request", "the body is not a JSON object")
    unknown = sorted(set(value) - {"uri", "envid", "secret", "server"})
    if unknown:
        raise QueryError("bad_request", f"unknown member {unknown[0][:40]!r}")
    return value


def scrub(value: Any, secret: str) -> Any:
    """``value`` with every occurrence of ``secret`` in its strings replaced by [secret]:
    a hostile server could echo it in a diagnostic or a reply."""
    if isinstance(value, str):
        return value.replace(secret, SECRET_MASK) if secret else value
    if isinstance(value, list):
        return [scrub(item, secret) for item in value]
    if isinstance(value, dict):
        return {key: scrub(item, secret) for key, item in value.items()}
    return value


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP status and a JSON-able body: the trace, or ``{"error": {...}}``."""

    status: int
    body: dict[str, Any]
    retry_after: int | None = None

    @property
    def error(self) -> dict[str, str] | None:
        found = self.body.get("error")
        return found if isinstance(found, dict) else None


def error_answer(code: str, message: str, retry_after: int | None = None) -> Answer:
    return Answer(ERRORS[code], {"error": {"code": code, "message": message}}, retry_after)


def trace_answer(trace: Trace, query: TrackQuery) -> Answer:
    """200 with the trace when the first server answered; 404 when it knows nothing
    (``noinfo``, RFC 3887 §4), 502 when it could not be asked."""
    first = trace.hops[0] if trace.hops else None
    if first is not None and first.answered:
        return Answer(200, scrub(trace_json(trace), query.secret))
    if first is not None and first.refused and first.response is not None:
        if "noinfo" in (code.lower() for code in first.response.codes):
            message = f"{first.host} has no tracking information for this envelope id and secret"
            return error_answer("not_found", scrub(message, query.secret))
    reason = "no answer" if first is None else (first.error or "no answer")
    host = query.host if first is None else first.host
    message = f"the tracking server of {host} could not be asked: {reason}"
    return error_answer("upstream_error", scrub(message, query.secret))


# -- following (the node asks) ------------------------------------------------------------------


class Tracker(Protocol):
    """What follows a message across hops: :class:`mtrkmta.mtqp.client.TrackingClient`."""

    def follow(
        self, host: str, envid: str, secret: str, *, port: int | None = None
    ) -> Deferred[Trace]: ...


def client_factory(
    reactor: Any,
    resolver: IResolver,
    *,
    tls: TLSMode = "may",
    max_hops: int = DEFAULT_MAX_HOPS,
    reply_timeout: float = MIN_REPLY_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    connect_to: HostMap | None = None,
) -> Callable[[], Tracker]:
    """A fresh TrackingClient per query with `mtrkmta track`'s defaults (TLS ``may``,
    16 hops, RFC 3887 §2.5's 2-minute reply timeout)."""

    def make() -> Tracker:
        return TrackingClient(
            reactor,
            resolver,
            tls=tls,
            max_hops=max_hops,
            reply_timeout=reply_timeout,
            connect_timeout=connect_timeout,
            connect_to=connect_to,
        )

    return make


@dataclass(frozen=True, slots=True)
class TrackLimits:
    """Per client address and minute, queries and queries answered ``not_found``
    (``mtqp.track_rate``, ``mtqp.failure_rate``: the MTQP listener's limits; 0 is
    no limit); ``deadline`` bounds one query's following (504 after)."""

    track_rate: int = 60
    failure_rate: int = 10
    deadline: float = DEFAULT_DEADLINE

    @classmethod
    def from_config(cls, config: Config) -> TrackLimits:
        return cls(track_rate=config.mtqp.track_rate, failure_rate=config.mtqp.failure_rate)


class TrackService:
    """Answers queries for one node: rate limits per client address, as MTQP's TRACK
    counts them (RFC 3887 §11: guessing secrets is rate_limited), then follows."""

    def __init__(
        self,
        tracker_factory: Callable[[], Tracker],
        limits: TrackLimits,
        clock: IReactorTime,
        metrics: IMetrics | None = None,
    ) -> None:
        self.tracker_factory = tracker_factory
        self.metrics: IMetrics = NoMetrics() if metrics is None else metrics
        self.limits = limits
        self.clock = clock
        self.tracks = RateLimiter(limits.track_rate, clock)
        self.failures = RateLimiter(limits.failure_rate, clock)

    def answer(self, address: str, query: TrackQuery) -> Deferred[Answer]:
        """Follow ``query`` for the client at ``address``; never fails."""
        if not self.failures.allowed(address) or not self.tracks.allowed(address):
            log.info("HTTP track from {address} refused: rate limit", address=address)
            self.metrics.http_track_query("rate_limited")
            message = "too many tracking queries from your address; try again in a minute"
            return succeed(error_answer("rate_limited", message, int(RATE_WINDOW)))
        self.tracks.record(address)
        # Counted as a failure before following, taken back unless the answer is
        # not_found: concurrent guesses cannot all pass the check (as MTQP's TRACK).
        reserved = self.failures.record(address)
        return ensureDeferred(self._follow(address, query, reserved))

    async def _follow(self, address: str, query: TrackQuery, reserved: float) -> Answer:
        try:
            followed = self.tracker_factory().follow(
                query.host, query.envid, query.secret, port=query.port
            )
        except Exception:
            log.failure("HTTP track from {address}: the tracker failed", address=address)
            followed = Deferred()
            followed.callback(Trace(envid=query.envid, hops=()))
        answer = await _within(followed, self.limits.deadline, self.clock, query)
        if answer.status != ERRORS["not_found"]:
            self.failures.forget(address, reserved)
        error = answer.error
        result = "trace" if error is None else error["code"]
        self.metrics.http_track_query(QUERY_RESULT.get(result, "unavailable"))
        log.info(
            "HTTP track from {address} for {host}: {result}",
            address=address,
            host=query.host,
            result=result,
        )
        return answer


def _within(
    followed: Deferred[Trace], deadline: float, clock: IReactorTime, query: TrackQuery
) -> Deferred[Answer]:
    """The answer of ``followed``, or 504 when it takes more than ``deadline`` seconds."""
    result: Deferred[Answer] = Deferred()

    def expired() -> None:
        message = f"following the message took more than {deadline:g} s"
        result.callback(error_answer("timeout", message))

    timer = clock.callLater(deadline, expired)

    def done(trace: Trace) -> None:
        if not result.called:
            timer.cancel()
            result.callback(trace_answer(trace, query))

    def failed(failure: Failure) -> None:
        log.failure("following a message failed", failure)
        if not result.called:
            timer.cancel()
            result.callback(error_answer("upstream_error", "following the message failed"))

    followed.addCallbacks(done, failed)
    return result


# -- the page (sans-IO) -------------------------------------------------------------------------


def _e(value: object) -> str:
    """Text for HTML, quotes included: every value from a tracking server is hostile."""
    return html.escape("" if value is None else str(value), quote=True)


def _shown_time(value: object) -> str:
    """An ISO 8601 time as ``2026-12-04 16:37:01 UTC``; anything else as it is."""
    if not isinstance(value, str):
        return ""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return value
    if when.tzinfo is None:
        return value
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _time(value: object) -> str:
    return f'<time datetime="{_e(value)}">{_e(_shown_time(value))}</time>'


def _status(status: object, meaning: object) -> str:
    if not status:
        return ""
    if not meaning:
        return f"<code>{_e(status)}</code>"
    return f"<code>{_e(status)}</code> ({_e(meaning)})"


def html_page(title: str, body: str) -> bytes:
    """A whole page: ``title`` and ``body`` are HTML already escaped."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n"
        '<link rel="stylesheet" href="/track/track.css">\n</head>\n<body>\n<main>\n'
        f"{body}\n</main>\n</body>\n</html>\n"
    ).encode()


def form_html() -> str:
    """The query form; it never holds a value sent before (the secret stays out of pages)."""
    return (
        '<form method="post" action="/track" class="query">\n'
        '<p><label for="uri">Tracking URI</label>\n'
        '<textarea id="uri" name="uri" rows="3" autocomplete="off" spellcheck="false" '
        'aria-describedby="uri-help"></textarea>\n'
        '<span id="uri-help" class="help">The <code>mtqp://</code> URI '
        "<code>mtrkmta send</code> printed.</span></p>\n"
        "<fieldset>\n<legend>Or the envelope id, secret and server</legend>\n"
        '<p><label for="envid">Envelope id</label>\n'
        '<input id="envid" name="envid" type="text" autocomplete="off" spellcheck="false"></p>\n'
        '<p><label for="secret">Secret</label>\n'
        '<input id="secret" name="secret" type="password" autocomplete="off"></p>\n'
        '<p><label for="server">Tracking server</label>\n'
        '<input id="server" name="server" type="text" autocomplete="off" spellcheck="false" '
        'placeholder="host[:port]"></p>\n'
        "</fieldset>\n"
        '<p><button type="submit">Track</button></p>\n'
        "</form>"
    )


def form_page() -> bytes:
    return html_page(
        "Track a message",
        "<h1>Track a message</h1>\n<p>Paste the tracking URI of a message sent with a "
        "tracking secret. This server asks the tracking server of every mail server the "
        "message passed, in turn.</p>\n" + form_html(),
    )


def result_line(data: Mapping[str, Any]) -> str:
    """One sentence: how the message fared, from each recipient's outcome."""
    outcomes = [str(path.get("outcome")) for path in data.get("recipients") or []]
    if not outcomes:
        return "No recipient is known."
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    told = ", ".join(f"{count} {outcome}" for outcome, count in counts.items())
    noun = "recipient" if len(outcomes) == 1 else "recipients"
    if "failed" in counts:
        headline = "Failed"
    elif set(counts) <= {"delivered", "expanded"}:
        headline = "Delivered"
    elif data.get("complete"):
        headline = "Done"
    else:
        headline = "In progress"
    return f"{headline}: {len(outcomes)} {noun}, {told}."


def _hops_html(hops: list[Any]) -> str:
    rows = []
    for number, hop in enumerate(hops, start=1):
        server = hop.get("server") or {}
        where = _e(hop.get("host"))
        if server:
            where += f" ({_e(server.get('address'))} port {_e(server.get('port'))})"
        answer = _e(hop.get("outcome"))
        detail = hop.get("error") or hop.get("reply")
        if detail:
            answer += f": {_e(detail)}"
        reporting = [report.get("reporting_mta") for report in hop.get("reports") or []]
        rows.append(
            f'<tr><th scope="row"><span class="label">Hop </span>{number}</th>'
            f'<td data-label="Server">{where}</td>'
            f'<td data-label="Reporting MTA">'
            f"{_e(', '.join(str(mta) for mta in reporting)) or '-'}</td>"
            f'<td data-label="Referred by">{_e(hop.get("referred_by") or "-")}</td>'
            f'<td data-label="TLS">{"yes" if hop.get("tls") else "no"}</td>'
            f'<td data-label="Answer">{answer}</td></tr>'
        )
    return (
        '<h2>Tracking servers asked</h2>\n<div class="scroll"><table>\n'
        "<caption>One per hop, in the order asked</caption>\n"
        '<thead><tr><th scope="col">Hop</th><th scope="col">Server</th>'
        '<th scope="col">Reporting MTA</th><th scope="col">Referred by</th>'
        '<th scope="col">TLS</th><th scope="col">Answer</th></tr></thead>\n'
        "<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table></div>"
    )


def _value(typed: object) -> str:
    """``bob@example.org`` of ``rfc822; bob@example.org``."""
    return str(typed).split(";", 1)[-1].strip().lower()


def _step_diagnostic(hops: list[Any], step: Mapping[str, Any], original: object) -> str | None:
    """The diagnostic the hop of ``step`` reported for the recipient, if any."""
    number = step.get("hop")
    if not isinstance(number, int) or not 1 <= number <= len(hops):
        return None
    for report in hops[number - 1].get("reports") or []:
        if _value(report.get("reporting_mta")) != _value(step.get("reporting_mta")):
            continue
        for status in report.get("recipients") or []:
            if _value(status.get("original_recipient")) != _value(original):
                continue
            if status.get("diagnostic"):
                return str(status["diagnostic"])
            for name, *value in status.get("extensions") or []:
                if str(name).lower() == "diagnostic-code" and value:
                    return str(value[0])
    return None


def _recipients_html(recipients: list[Any], hops: list[Any]) -> str:
    parts = ["<h2>Recipients</h2>"]
    for path in recipients:
        outcome = _e(path.get("outcome"))
        reason = f" ({_e(path['reason'])})" if path.get("reason") else ""
        diagnostic = path.get("diagnostic")
        said = f"<p>Diagnostic: {_e(diagnostic)}</p>\n" if diagnostic else ""
        steps = []
        for step in path.get("path") or []:
            found = _step_diagnostic(hops, step, path.get("original_recipient"))
            note = f'<br><span class="diagnostic">{_e(found)}</span>' if found else ""
            steps.append(
                f"<li>Hop {_e(step.get('hop'))}, {_e(step.get('reporting_mta'))}: "
                f'<strong class="action">{_e(step.get("action"))}</strong> '
                f"{_status(step.get('status'), step.get('meaning'))}{note}</li>"
            )
        parts.append(
            f'<section class="recipient">\n<h3>{_e(path.get("original_recipient"))}</h3>\n'
            f'<p>Outcome: <strong class="outcome">{outcome}</strong>{reason}</p>\n{said}'
            "<ol>\n" + "\n".join(steps) + "\n</ol>\n</section>"
        )
    return "\n".join(parts)


def _events_html(events: list[Any]) -> str:
    items = []
    for event in events:
        lines = [
            f"{_time(event.get('time'))} "
            f'<span class="elapsed">+{_e(event.get("elapsed"))} s</span>',
            f'<span class="where">hop {_e(event.get("hop"))}, {_e(event.get("reporting_mta"))}'
            + (f", {_e(event['recipient'])}" if event.get("recipient") else "")
            + "</span>",
            f'<span class="what">{_e(event.get("text") or event.get("kind"))}</span>',
        ]
        if event.get("by_administrator"):
            lines.append('<span class="admin">by the administrator</span>')
        if event.get("status"):
            lines.append(f"<span>{_status(event['status'], event.get('meaning'))}</span>")
        if event.get("diagnostic"):
            lines.append(f'<span class="diagnostic">{_e(event["diagnostic"])}</span>')
        if event.get("relay"):
            lines.append(f"<span>next hop {_e(event['relay'])}</span>")
        if event.get("next_attempt"):
            lines.append(f"<span>next attempt {_time(event['next_attempt'])}</span>")
        items.append("<li>" + "\n".join(lines) + "</li>")
    return '<h2>Timeline</h2>\n<ol class="timeline">\n' + "\n".join(items) + "\n</ol>"


def trace_html(data: Mapping[str, Any]) -> str:
    """The result part of the page for a trace's JSON (:func:`trace_json`)."""
    parts = [
        '<section aria-labelledby="result">',
        f'<h2 id="result">Result</h2>\n<p class="result" role="status">{_e(result_line(data))}</p>',
        f"<p>Envelope id: <code>{_e(data.get('envid'))}</code></p>",
    ]
    if data.get("events"):
        parts.append(_events_html(list(data["events"])))
    hops = [hop for hop in data.get("hops") or [] if isinstance(hop, dict)]
    parts.append(_recipients_html(list(data.get("recipients") or []), hops))
    parts.append(_hops_html(list(data.get("hops") or [])))
    parts.append("</section>")
    return "\n".join(parts)


def answer_page(answer: Answer) -> bytes:
    """The page of an answer: the trace, or the error; then the form, empty, again."""
    error = answer.error
    if error is None:
        body = "<h1>Tracking result</h1>\n" + trace_html(answer.body)
        title = "Tracking result"
    else:
        body = (
            "<h1>Tracking failed</h1>\n"
            f'<p class="error" role="alert">{_e(error["message"])} '
            f"<code>({_e(error['code'])})</code></p>"
        )
        title = "Tracking failed"
    body += "\n<h2>Track a message</h2>\n" + form_html()
    return html_page(title, body)


# -- the OpenAPI description ----------------------------------------------------------------------


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "additionalProperties": False,
                "properties": {
                    "code": {"type": "string", "enum": sorted(ERRORS)},
                    "message": {"type": "string"},
                },
            }
        },
    }


def _trace_schema() -> dict[str, Any]:
    text = {"type": "string"}
    maybe_text = {"type": ["string", "null"]}
    status = {
        "type": "object",
        "required": ["original_recipient", "final_recipient", "action", "status", "meaning"],
        "properties": {
            "original_recipient": text,
            "final_recipient": text,
            "action": text,
            "status": text,
            "meaning": maybe_text,
            "remote_mta": maybe_text,
            "last_attempt_date": maybe_text,
            "will_retry_until": maybe_text,
            "diagnostic": maybe_text,
            "extensions": {"type": "array", "items": {"type": "array", "items": text}},
        },
    }
    hop = {
        "type": "object",
        "required": ["host", "referred_by", "server", "tls", "outcome", "reply", "error"],
        "properties": {
            "host": text,
            "referred_by": maybe_text,
            "server": {
                "type": ["object", "null"],
                "required": ["address", "port", "name"],
                "properties": {"address": text, "port": {"type": "integer"}, "name": text},
            },
            "tls": {"type": "boolean"},
            "outcome": {"type": "string", "enum": ["answered", "refused", "error"]},
            "reply": maybe_text,
            "error": maybe_text,
            "reports": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["original_envelope_id", "reporting_mta", "recipients"],
                    "properties": {
                        "original_envelope_id": text,
                        "reporting_mta": text,
                        "arrival_date": maybe_text,
                        "recipients": {"type": "array", "items": status},
                    },
                },
            },
        },
    }
    step = {
        "type": "object",
        "required": ["hop", "reporting_mta", "action", "status", "meaning"],
        "properties": {
            "hop": {"type": "integer"},
            "reporting_mta": text,
            "action": text,
            "status": text,
            "meaning": maybe_text,
        },
    }
    recipient = {
        "type": "object",
        "required": ["original_recipient", "outcome", "final", "reason", "path"],
        "properties": {
            "original_recipient": text,
            "outcome": text,
            "final": {"type": "boolean"},
            "reason": maybe_text,
            "diagnostic": maybe_text,
            "path": {"type": "array", "items": step},
        },
    }
    event = {
        "type": "object",
        "required": ["time", "elapsed", "hop", "reporting_mta", "kind", "text"],
        "properties": {
            "time": {"type": "string", "format": "date-time"},
            "elapsed": {"type": "number"},
            "hop": {"type": "integer"},
            "reporting_mta": text,
            "recipient": maybe_text,
            "kind": text,
            "status": maybe_text,
            "meaning": maybe_text,
            "diagnostic": maybe_text,
            "relay": maybe_text,
            "next_attempt": maybe_text,
            "by_administrator": {"type": "boolean"},
            "text": text,
        },
    }
    return {
        "type": "object",
        "required": ["envid", "complete", "hops", "recipients"],
        "properties": {
            "envid": text,
            "complete": {"type": "boolean"},
            "hops": {"type": "array", "items": hop},
            "recipients": {"type": "array", "items": recipient},
            "events": {"type": "array", "items": event},
        },
    }


def _error_example(code: str, message: str) -> dict[str, Any]:
    return {"value": {"error": {"code": code, "message": message}}}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of ``POST /api/v1/track``."""
    error_ref = {"$ref": "#/components/schemas/Error"}

    def error_response(description: str, code: str, message: str) -> dict[str, Any]:
        return {
            "description": description,
            "content": {
                "application/json": {
                    "schema": error_ref,
                    "examples": {code: _error_example(code, message)},
                }
            },
        }

    too_many = error_response(
        "Too many queries from this address in the last minute (the MTQP limits)",
        "rate_limited",
        "too many tracking queries from your address; try again in a minute",
    )
    too_many["headers"] = {
        "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mtrkmta tracking API",
            "version": "1",
            "description": (
                "Follow a message across the MTQP tracking servers (RFC 3887) of every hop "
                "it passed. The node asks the servers itself, as `mtrkmta track` does."
            ),
        },
        "paths": {
            "/api/v1/track": {
                "post": {
                    "operationId": "track",
                    "summary": "Follow a message hop by hop",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/TrackRequest"},
                                "examples": {
                                    "uri": {
                                        "value": {
                                            "uri": "mtqp://mx.example.org/track/"
                                            "id1@mx.example.org/c2VjcmV0c2VjcmV0c2VjcmV0"
                                        }
                                    },
                                    "fields": {
                                        "value": {
                                            "envid": "id1@mx.example.org",
                                            "secret": "c2VjcmV0c2VjcmV0c2VjcmV0",
                                            "server": "mx.example.org:1038",
                                        }
                                    },
                                },
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "The first server answered: the trace",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Trace"}
                                }
                            },
                        },
                        "400": error_response(
                            "The body is no JSON object of the request's members",
                            "bad_request",
                            "the body is not JSON",
                        ),
                        "404": error_response(
                            "The first server knows no message with this envid and secret",
                            "not_found",
                            "mx.example.org has no tracking information for this envelope "
                            "id and secret",
                        ),
                        "413": error_response(
                            "The body is larger than 8192 octets",
                            "body_too_large",
                            "the body is larger than 8192 octets",
                        ),
                        "415": error_response(
                            "The body is not application/json",
                            "unsupported_media_type",
                            "send the query as application/json",
                        ),
                        "422": error_response(
                            "The URI, envid, secret or server is malformed or missing",
                            "invalid_query",
                            "not an mtqp URI: not an mtqp:// URI",
                        ),
                        "429": too_many,
                        "502": error_response(
                            "The first server could not be asked",
                            "upstream_error",
                            "the tracking server of mx.example.org could not be asked: "
                            "cannot connect to 192.0.2.1 port 1038: Connection refused.",
                        ),
                        "504": error_response(
                            "Following the message took longer than the deadline",
                            "timeout",
                            "following the message took more than 300 s",
                        ),
                    },
                }
            }
        },
        "components": {
            "schemas": {
                "TrackRequest": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["uri"],
                            "additionalProperties": False,
                            "properties": {"uri": {"type": "string"}},
                        },
                        {
                            "type": "object",
                            "required": ["envid", "secret", "server"],
                            "additionalProperties": False,
                            "properties": {
                                "envid": {"type": "string"},
                                "secret": {"type": "string"},
                                "server": {"type": "string"},
                            },
                        },
                    ]
                },
                "Trace": _trace_schema(),
                "Error": _error_schema(),
            }
        },
    }


# -- twisted.web resources ----------------------------------------------------------------------


def _client_address(request: Request) -> str:
    return str(getattr(request.getClientAddress(), "host", ""))


def _body(request: Request) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body: bytes = content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise QueryError("body_too_large", f"the body is larger than {MAX_BODY} octets")
    return body


def _media_type(request: Request) -> str:
    value = request.getHeader(b"content-type") or b""
    return value.split(b";")[0].strip().lower().decode("latin-1")


def _headers(request: Request, content_type: bytes) -> None:
    request.setHeader(b"content-type", content_type)
    for name, value in SECURITY_HEADERS:
        request.setHeader(name, value)


def _finish(request: Request, gone: list[bool], status: int, body: bytes) -> None:
    if gone:
        return
    request.setResponseCode(status)
    request.setHeader(b"content-length", str(len(body)).encode("ascii"))
    request.write(body)
    request.finish()


def _answer_later(
    request: Request,
    service: TrackService,
    query: TrackQuery,
    render: Callable[[Answer], bytes],
) -> None:
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def send(answer: Answer) -> None:
        if answer.retry_after is not None and not gone:
            request.setHeader(b"retry-after", str(answer.retry_after).encode("ascii"))
        _finish(request, gone, answer.status, render(answer))

    service.answer(_client_address(request), query).addCallback(send)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=2).encode("utf-8") + b"\n"


class TrackPage(Resource):
    """``GET /track``: the form; ``POST /track``: the timeline (or the error) as a page."""

    def __init__(self, service: TrackService, stylesheet: bytes) -> None:
        super().__init__()
        self.service = service
        self.putChild(b"track.css", Stylesheet(stylesheet))

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            return self
        return pages.notFound()

    def render_GET(self, request: Request) -> bytes:
        _headers(request, b"text/html; charset=utf-8")
        return form_page()

    def render_POST(self, request: Request) -> bytes | int:
        _headers(request, b"text/html; charset=utf-8")
        try:
            if _media_type(request) != "application/x-www-form-urlencoded":
                message = "send the form as application/x-www-form-urlencoded"
                raise QueryError("unsupported_media_type", message)
            query = parse_query(form_fields(_body(request)))
        except QueryError as error:
            request.setResponseCode(error.status)
            return answer_page(error_answer(error.code, error.message))
        _answer_later(request, self.service, query, answer_page)
        return NOT_DONE_YET


class Stylesheet(Resource):
    """The page's CSS (``mtrkmta/web/static/track.css``)."""

    isLeaf = True

    def __init__(self, css: bytes) -> None:
        super().__init__()
        self.css = css

    def render_GET(self, request: Request) -> bytes:
        _headers(request, b"text/css; charset=utf-8")
        request.setHeader(b"cache-control", b"max-age=3600")
        return self.css


class TrackAPI(Resource):
    """``POST /api/v1/track``: JSON in, the trace's JSON (or ``{"error": ...}``) out."""

    isLeaf = True

    def __init__(self, service: TrackService) -> None:
        super().__init__()
        self.service = service

    def render_POST(self, request: Request) -> bytes | int:
        _headers(request, b"application/json")
        try:
            if _media_type(request) != "application/json":
                raise QueryError("unsupported_media_type", "send the query as application/json")
            query = parse_query(json_fields(_body(request)))
        except QueryError as error:
            request.setResponseCode(error.status)
            return _json_bytes(error_answer(error.code, error.message).body)
        _answer_later(request, self.service, query, lambda answer: _json_bytes(answer.body))
        return NOT_DONE_YET


class OpenAPIDocument(Resource):
    """``GET /api/v1/openapi.json``."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        _headers(request, b"application/json")
        return _json_bytes(openapi_document())


def stylesheet() -> bytes:
    """The page's CSS, from the package data."""
    return resources.files("mtrkmta.web").joinpath("static/track.css").read_bytes()


def track_resources(
    tracker_factory: Callable[[], Tracker],
    limits: TrackLimits,
    clock: IReactorTime,
    metrics: IMetrics | None = None,
) -> dict[bytes, IResource]:
    """What the site (mtrkmta.web.site.build_site) mounts, by path: the page with its CSS,
    the API and its OpenAPI document."""
    service = TrackService(tracker_factory, limits, clock, metrics)
    return {
        b"track": TrackPage(service, stylesheet()),
        b"api/v1/track": TrackAPI(service),
        b"api/v1/openapi.json": OpenAPIDocument(),
    }
