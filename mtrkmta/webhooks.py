"""Webhook delivery: POST the tracking store's outbox entries, signed, with retries and backoff."""

from __future__ import annotations

import hashlib
import hmac
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.error import TimeoutError as TwistedTimeoutError
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from mtrkmta import __version__
from mtrkmta.config import Webhook
from mtrkmta.metrics import IMetrics, NoMetrics
from mtrkmta.reportfields import safe_human
from mtrkmta.tracking.interfaces import ITrackingStore, OutboxEntry

log = Logger()

POLL_INTERVAL = 1.0
"""Seconds between looks at the outbox for due entries."""
EXPIRE_INTERVAL = 60.0
"""Seconds between drops of expired entries and of entries beyond the outbox's bound."""
LEASE_MARGIN = 10.0
"""Seconds a claim lasts beyond the hook's ``timeout``: no other sender takes the entry
while a request for it may still be under way."""
MAX_REASON = 300
"""Characters of a failure's reason logged."""
SIGNATURE_HEADER = b"Mtrkmta-Signature"
EVENT_ID_HEADER = b"Mtrkmta-Event-Id"
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``Mtrkmta-Signature`` value: ``t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``
    (the scheme of Stripe's ``Stripe-Signature``)."""
    mac = hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def backoff(attempts: int, first: float, maximum: float, draw: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1 for the first):
    ``first`` doubled per attempt up to ``maximum``, then "equal jitter": between half
    of that and all of it, by ``draw`` in [0, 1), so that many retries spread out."""
    base = min(maximum, first * 2.0 ** min(max(attempts - 1, 0), 64))
    return base / 2 + base / 2 * draw


def failure_reason(error: BaseException) -> str:
    """A failed request's error as one bounded, escaped line for the log."""
    reasons = getattr(error, "reasons", None)  # ResponseNeverReceived, ResponseFailed
    if reasons:
        text = "; ".join(reason.getErrorMessage() for reason in reasons)
    else:
        text = str(error)
    text = text or type(error).__name__
    return safe_human(text if len(text) <= MAX_REASON else text[:MAX_REASON] + "...")


def read_secret(path: Path) -> bytes:
    """A hook's signing secret: its file's content without surrounding white space.
    Blocking (start-up)."""
    return path.read_bytes().strip()


def tls_policy(ca_file: Path | None) -> BrowserLikePolicyForHTTPS:
    """How an https hook's certificate is verified: against the system's CAs, or the
    certificates of ``ca_file`` (PEM) alone. Blocking (reads the file)."""
    if ca_file is None:
        return BrowserLikePolicyForHTTPS()
    pems = _PEM_CERTIFICATE.findall(ca_file.read_bytes())
    if not pems:
        raise ValueError(f"{ca_file}: no PEM certificate in it")
    certificates = [ssl.Certificate.loadPEM(pem) for pem in pems]
    return BrowserLikePolicyForHTTPS(ssl.trustRootFromCertificates(certificates))


def hook_files(
    hooks: Sequence[Webhook],
) -> tuple[dict[str, bytes], dict[str, BrowserLikePolicyForHTTPS]]:
    """Each hook's signing secret and TLS policy, by name. Blocking (reads the files)."""
    secrets = {hook.name: read_secret(hook.secret_file) for hook in hooks}
    return secrets, {hook.name: tls_policy(hook.ca_file) for hook in hooks}


@implementer(IBodyProducer)
class _Body:
    """A request body that is already in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Everything was written at once: nothing to pause."""

    def resumeProducing(self) -> None:
        """Everything was written at once: nothing to resume."""

    def stopProducing(self) -> None:
        """Everything was written at once: nothing to stop."""


class _BoundedRead(Protocol):
    """Reads at most ``limit`` bytes of a response body into ``done``, then stops reading;
    cancelling ``done`` stops it too."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.done: Deferred[bytes] = Deferred(lambda _: self._stop())
        self._done = self.done
        self._parts: list[bytes] = []
        self._size = 0

    def _stop(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._parts.append(data[: self._limit - self._size])
        self._size += len(data)
        if self._size >= self._limit:
            self._done.callback(b"".join(self._parts))
            self._stop()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self._done.called:
            self._done.callback(b"".join(self._parts))


class DeliveryFailed(Exception):
    """The receiver answered with a status other than 2xx."""


@dataclass
class _Hook:
    """One configured hook as the sender uses it."""

    config: Webhook
    secret: bytes
    agent: Agent
    in_flight: dict[int, Deferred[None]] = field(default_factory=dict)


class WebhookSender:
    """Delivers the outbox: claims due entries of each hook (at most ``concurrency`` in
    flight per hook), POSTs each, then deletes it (2xx), makes it due again after a
    backoff, or drops it once older than the hook's ``max_age``.

    ``owner`` names this sender in the leases; ``draw`` gives the jitter's random numbers;
    ``clock`` (default: ``reactor``) the time: of the polls, the signatures, the timeouts.
    """

    def __init__(
        self,
        reactor: Any,
        store: ITrackingStore,
        hooks: Sequence[Webhook],
        secrets: Mapping[str, bytes],
        *,
        owner: str,
        max_entries: int,
        policies: Mapping[str, BrowserLikePolicyForHTTPS] | None = None,
        draw: Callable[[], float] = random.random,
        clock: IReactorTime | None = None,
        metrics: IMetrics | None = None,
    ) -> None:
        self._reactor = reactor
        self._metrics: IMetrics = NoMetrics() if metrics is None else metrics
        self._clock: IReactorTime = reactor if clock is None else clock
        self._store = store
        self._owner = owner
        self._max_entries = max_entries
        self._draw = draw
        policies = policies or {}
        self._hooks = [
            _Hook(
                config=hook,
                secret=secrets[hook.name],
                agent=Agent(
                    reactor,
                    contextFactory=policies.get(hook.name, BrowserLikePolicyForHTTPS()),
                    connectTimeout=hook.timeout,
                    pool=HTTPConnectionPool(reactor, persistent=False),
                ),
            )
            for hook in hooks
        ]
        self._looking: Deferred[None] | None = None  # a look at the outbox under way
        self._stopping = False
        self._poll = LoopingCall(self._look)
        self._poll.clock = self._clock
        self._expire = LoopingCall(self._expire_entries)
        self._expire.clock = self._clock

    def start(self) -> None:
        """Expire now and every EXPIRE_INTERVAL; look at the outbox now and every
        POLL_INTERVAL."""
        self._expire.start(EXPIRE_INTERVAL, now=True)
        self._poll.start(POLL_INTERVAL, now=True)

    async def stop(self) -> None:
        """Stop looking; cancel the requests in flight (their entries are retried)."""
        self._stopping = True
        for timer in (self._poll, self._expire):
            if timer.running:
                timer.stop()
        if self._looking is not None:
            await self._looking
        pending = [d for hook in self._hooks for d in hook.in_flight.values()]
        for d in pending:
            d.cancel()
        for d in pending:
            await d

    # -- the loop ---------------------------------------------------------------

    def _look(self) -> None:
        if self._looking is not None:
            return
        d = ensureDeferred(self._claim_due())
        d.addErrback(self._store_failed, "claiming due webhook events")
        self._looking = d
        d.addBoth(self._looked)

    def _looked(self, _: object) -> None:
        self._looking = None

    async def _claim_due(self) -> None:
        for hook in self._hooks:
            room = hook.config.concurrency - len(hook.in_flight)
            if room <= 0 or self._stopping:
                continue
            lease = hook.config.timeout + LEASE_MARGIN
            entries = await self._store.claim_webhooks(hook.config.name, self._owner, room, lease)
            for entry in entries:
                d = ensureDeferred(self._deliver(hook, entry))
                d.addErrback(self._store_failed, f"recording webhook event {entry.event_id}")
                hook.in_flight[entry.id] = d
                d.addBoth(self._finished, hook, entry.id)

    @staticmethod
    def _finished(_: object, hook: _Hook, entry_id: int) -> None:
        hook.in_flight.pop(entry_id, None)

    @staticmethod
    def _store_failed(failure: Failure, doing: str) -> None:
        log.error("webhooks: {doing} failed: {error}", doing=doing, error=failure.getErrorMessage())

    def _expire_entries(self) -> Deferred[None]:
        now = self._clock.seconds()
        cutoffs = {hook.config.name: now - hook.config.max_age for hook in self._hooks}
        d = self._store.expire_webhooks(cutoffs, self._max_entries)

        def dropped(count: int) -> None:
            if count:
                log.warn(
                    "webhooks: dropped {count} undelivered event(s): older than their hook's "
                    "max_age, of a hook no longer configured, or beyond "
                    "tracking.webhook_outbox_limit ({limit})",
                    count=count,
                    limit=self._max_entries,
                )

        done = d.addCallback(dropped)
        done.addErrback(self._store_failed, "expiring webhook events")
        return done

    # -- one delivery -----------------------------------------------------------

    async def _deliver(self, hook: _Hook, entry: OutboxEntry) -> None:
        name = hook.config.name
        try:
            status = await self._post(hook, entry)
        except DeliveryFailed as error:
            await self._failed(hook, entry, str(error))
            return
        except CancelledError:
            await self._failed(hook, entry, "cancelled at shutdown")
            return
        except TwistedTimeoutError:
            await self._failed(hook, entry, f"no answer within {hook.config.timeout:g}s")
            return
        except Exception as error:  # a refused connection, a TLS failure, a DNS error...
            await self._failed(hook, entry, failure_reason(error))
            return
        await self._store.webhook_delivered(entry.id, self._owner)
        self._metrics.webhook_delivery("delivered")
        log.info(
            "webhook {hook}: delivered event {event_id} ({queue_id}), HTTP {status}",
            hook=name,
            event_id=entry.event_id,
            queue_id=entry.queue_id,
            status=status,
        )

    async def _post(self, hook: _Hook, entry: OutboxEntry) -> int:
        body = entry.body.encode("utf-8")
        timestamp = int(self._clock.seconds())
        headers = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"User-Agent": [f"mtrkmta/{__version__}".encode()],
                SIGNATURE_HEADER: [sign(hook.secret, timestamp, body).encode("ascii")],
                EVENT_ID_HEADER: [entry.event_id.encode("ascii")],
            }
        )
        request = hook.agent.request(b"POST", hook.config.url.encode("utf-8"), headers, _Body(body))
        exchange = ensureDeferred(self._exchange(request, hook.config.max_response))
        exchange.addTimeout(hook.config.timeout, self._clock)
        status, answer = await exchange
        if not 200 <= status < 300:
            shown = safe_human(answer[:200].decode("utf-8", "replace"))
            raise DeliveryFailed(f"HTTP {status}" + (f": {shown}" if shown.strip() else ""))
        return status

    @staticmethod
    async def _exchange(request: Deferred[IResponse], limit: int) -> tuple[int, bytes]:
        response = await request
        reader = _BoundedRead(limit)
        response.deliverBody(reader)
        return response.code, await reader.done

    async def _failed(self, hook: _Hook, entry: OutboxEntry, reason: str) -> None:
        config = hook.config
        now = self._clock.seconds()
        delay = backoff(
            entry.attempts + 1, config.first_retry, config.max_retry_interval, self._draw()
        )
        said = {
            "hook": config.name,
            "event_id": entry.event_id,
            "queue_id": entry.queue_id,
            "attempts": entry.attempts + 1,
            "reason": reason,
        }
        if now + delay >= entry.created + config.max_age:
            await self._store.webhook_delivered(entry.id, self._owner)
            self._metrics.webhook_delivery("dropped")
            log.warn(
                "webhook {hook}: dropped event {event_id} ({queue_id}) after {attempts} "
                "attempt(s) over {max_age:g}s (max_age): {reason}",
                max_age=config.max_age,
                **said,
            )
            return
        await self._store.retry_webhook(entry.id, self._owner, now + delay)
        self._metrics.webhook_delivery("retried")
        log.info(
            "webhook {hook}: event {event_id} ({queue_id}) not delivered: {reason}; "
            "attempt {attempts}, next in {delay:.0f}s",
            delay=delay,
            **said,
        )
