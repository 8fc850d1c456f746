"""Builds and runs one mtrkmta node from its configuration: stores, receiver and listeners."""

from __future__ import annotations

import errno
import os
import pwd
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IResolver
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.names import client
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import IResource

from mtrkmta.auth import PasswordFileChecker, PasswordFileError, parse_users
from mtrkmta.authlimits import AuthGuard, AuthLimits
from mtrkmta.config import Config, ConfigError, load_config, setting_names
from mtrkmta.delivery.interfaces import ITransport
from mtrkmta.delivery.maildir import MaildirTransport
from mtrkmta.delivery.smtp import LMTPTransport, SMTPTransport, SMTPTransportSettings
from mtrkmta.dsn.notifier import DsnNotifier
from mtrkmta.faults import IFaults, NoFaults
from mtrkmta.lmtp.server import LMTPServerFactory
from mtrkmta.metrics import (
    METRICS_FILE,
    METRICS_INTERVAL,
    PrometheusMetrics,
    merged_exposition,
    read_expositions,
    remove_files,
    write_exposition,
)
from mtrkmta.mtqp.chain import chain_from_config  # MTQP chaining (RFC 3887 §2.4)
from mtrkmta.mtqp.server import (  # MTQP listener
    MTQPServerFactory,
    MTQPSettings,
    settings_from_config,
)
from mtrkmta.notify import IServiceNotifier, keep_alive
from mtrkmta.queue.control import PICKUP, RELOAD_ALIASES, ControlFactory
from mtrkmta.queue.control import SOCKET_NAME as CONTROL_SOCKET
from mtrkmta.queue.policy import RetryPolicy
from mtrkmta.queue.service import QueueService
from mtrkmta.receive.acceptor import Acceptor
from mtrkmta.receive.pickup import Pickup
from mtrkmta.receive.policy import RelayPolicy
from mtrkmta.receive.receiver import Receiver
from mtrkmta.receive.recipients import RecipientChecks
from mtrkmta.routing.aliases import AliasBook, AliasError, AliasSource
from mtrkmta.routing.local import EMPTY_ALIASES, LocalAddresses
from mtrkmta.routing.router import Router
from mtrkmta.smtp.command import AddressLimits
from mtrkmta.smtp.server import ServerSettings, SMTPServerFactory
from mtrkmta.spool.filespool import FileSpool
from mtrkmta.spool.interfaces import SpoolError
from mtrkmta.spool.queueid import QueueIdGenerator
from mtrkmta.tls import TLSFileError, server_context
from mtrkmta.tracking.authfailures import SQLAuthFailures
from mtrkmta.tracking.damage import as_damage, check_database
from mtrkmta.tracking.migrate import upgrade
from mtrkmta.tracking.store import TRANSIENT_ERRORS, SQLTrackingStore
from mtrkmta.web.admin import MOUNT as ADMIN_MOUNT
from mtrkmta.web.admin import TokenFileError, admin_api, read_token
from mtrkmta.web.health import Health, Ready
from mtrkmta.web.metrics import metrics_resource
from mtrkmta.web.site import BoundedSite, HttpLimits, build_site
from mtrkmta.web.track import Tracker, TrackLimits, client_factory, track_resources
from mtrkmta.webhooks import WebhookSender, hook_files
from mtrkmta.workers import (
    ConfigOrigin,
    WorkerRole,
    WorkerSupervisor,
    draining_workers,
    metrics_files,
    shared_sockets,
    take_turns,
)

log = Logger()

ALIAS_CHECK_INTERVAL = 5.0  # seconds between checks whether the aliases file changed


def prepare_data_dir(data_dir: Path) -> None:
    """Create the data directory (mode 0700) if it does not exist yet, durably. Blocking.

    The parent of each directory created is fsync'd, so that the spool and the
    tracking database, which fsync only inside the data directory, cannot vanish
    with it after a power loss on a fresh installation.
    """
    missing: list[Path] = []
    path = data_dir
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for created in reversed(missing):
        fd = os.open(created.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# The options of `mtrkmta serve` that `mtrkmta db recover` needs too (where the data is,
# and the host name, the default node id).
_RECOVER_OPTIONS = ("--data-dir", "--database", "--hostname")


def recover_command(origin: ConfigOrigin | None) -> str:
    """The `mtrkmta db recover` command line for the configuration a node started with."""
    words = ["mtrkmta", "db", "recover"]
    if origin is None:
        return " ".join([*words, "--config", "FILE"])
    if origin.path is not None:
        words += ["--config", str(origin.path)]
    for override in origin.overrides:
        if override.source in _RECOVER_OPTIONS:
            words += [override.source, str(override.value)]
    return shlex.join(words)


# What a reload replaces; every other changed setting needs a restart.
RELOADABLE = ("routes", "tls.certificate", "tls.private_key", "auth.users_file", "local.aliases")
# Whether a users or aliases file is used at all is decided at start.
USED_AT_START = ("auth.users_file", "local.aliases")
STATUS_READY = "accepting mail"


class ReloadError(Exception):
    """A reload cannot take effect; ``str()`` names the file or setting and the problem."""


@dataclass(frozen=True)
class _ReloadPlan:
    """What a reload read and checked, before anything is replaced."""

    config: Config
    tls: Any  # the new server TLS context, or None
    aliases: AliasBook | None
    mtqp: MTQPSettings | None  # the MTQP listener's settings with the new certificate
    restart: tuple[str, ...]  # changed settings a reload does not apply


def _values(config: Config) -> Iterator[object]:
    """Every setting's value, in the order of :func:`setting_names`."""
    for outer in fields(Config):
        value = getattr(config, outer.name)
        if is_dataclass(value):
            yield from (getattr(value, inner.name) for inner in fields(value))
        else:
            yield value


def restart_needed(old: Config, new: Config) -> tuple[str, ...]:
    """The settings that differ between ``old`` and ``new`` and that a reload cannot apply."""
    changed = []
    for name, before, after in zip(setting_names(), _values(old), _values(new), strict=True):
        if before == after:
            continue
        if name not in RELOADABLE or (name in USED_AT_START and None in (before, after)):
            changed.append(name)
    return tuple(changed)


class StartError(Exception):
    """A start-up failure the operator can fix; ``str()`` is the one line that says how."""


def _server_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def listening_address(address: object) -> str:
    """A listener's address as the log names it: ``127.0.0.1:2525``, ``[::1]:2525``, or
    a unix socket's path."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        return name.decode("utf-8", "backslashreplace")
    return str(name) if name is not None else str(address)


def listen_error(name: str, description: str, error: CannotListenError) -> StartError:
    """The one line for a listener that cannot bind."""
    cause = error.socketError
    number = getattr(cause, "errno", None)
    if number == errno.EADDRINUSE:
        reason = "address already in use; stop the other server or choose another port"
    elif number == errno.EACCES:
        reason = "permission denied; a port below 1024 needs root or CAP_NET_BIND_SERVICE"
    elif number == errno.EADDRNOTAVAIL:
        reason = "no such address on this host; choose an address of one of its interfaces"
    else:
        reason = f"{cause}; check the endpoint"
    where = f"{error.interface or '*'}:{error.port}"
    return StartError(
        f"cannot listen for {name} on {where} (listeners.{name} = {description!r}): {reason}"
    )


def storage_error(error: BaseException, data_dir: Path, database: str) -> StartError | None:
    """The one line for a data directory or database that cannot be opened, or None."""
    user = _server_user()
    if isinstance(error, OSError) and error.errno in (
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EROFS,
        errno.EEXIST,
    ):
        path = error.filename if error.filename is not None else data_dir
        return StartError(
            f"cannot use the data directory {data_dir} (server.data_dir): {path}: "
            f"{error.strerror}; the server runs as user {user}: make the directory "
            "writable for that user or choose another server.data_dir"
        )
    if "unable to open database file" in str(error):
        return StartError(
            f"cannot open the tracking database {database} (server.database): unable to open "
            f"the file; the server runs as user {user}: check that the file and its directory "
            "exist and are writable for that user"
        )
    return None


class MTAService(Service):
    """One mtrkmta node: the spool, the tracking store and every listener.

    Start-up is asynchronous: the data directory and database schema are
    prepared, the spool is recovered and reconciled with the tracking store
    (spool files without a tracking record were never acknowledged and are
    quarantined), the queue resumes, and only then do the listeners open.
    ``ready`` fires at that point; ``port(name)`` then tells where each listener
    is bound.
    """

    name = "mtrkmta"

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        resolver: IResolver | None = None,
        deliver: bool = True,
        shutdown_grace: float = 5.0,
        origin: ConfigOrigin | None = None,
        worker: WorkerRole | None = None,
        faults: IFaults = NoFaults(),
        debug: bool = True,
        notifier: IServiceNotifier | None = None,
        tracker_factory: Callable[[], Tracker] | None = None,
        cpus: Sequence[int] = (),
    ) -> None:
        """``resolver`` answers MX lookups (default: the system's, from /etc/resolv.conf);
        ``deliver=False`` runs the receive path only (accepted mail stays queued), for
        tests of the receive path. ``origin`` (where ``config`` came from) lets the
        node start ``config.workers - 1`` worker processes; ``worker`` makes this node
        one of them (see :mod:`mtrkmta.workers`). ``faults`` is told every named step
        of the accept and delivery paths (:mod:`mtrkmta.faults`; for tests only). With
        ``debug`` false, a failed start logs no traceback (``mtrkmta serve --debug``).
        ``notifier`` tells the service manager (systemd) when the node is ready, reloads and
        stops, and keeps its watchdog fed (:mod:`mtrkmta.notify`). ``tracker_factory`` makes
        the MTQP clients of the tracking page (default: TrackingClient on ``resolver``, as
        `mtrkmta track` has them; tests of nodes sharing one address redirect its
        connections). ``cpus``: the CPUs the process could run on before it pinned
        itself (``server.cpu_affinity``), handed to the workers it starts."""
        self.cpus = tuple(cpus)
        self.faults = faults
        self._tracker_factory = tracker_factory
        self.notifier = notifier
        self._reloads: Deferred[None] = succeed(None)  # one reload at a time
        self._watchdog: LoopingCall | None = None
        self.debug = debug
        self.mail_root = config.data_dir / "mail"  # a worker delivers to its master's
        self.origin = origin
        self.worker = worker
        self.supervisor: WorkerSupervisor | None = None
        if worker is not None:
            config = worker.node_config(config)
        self.config = config
        self.reactor = reactor
        self.deliver = deliver
        self.shutdown_grace = shutdown_grace  # seconds deliveries in flight get at stop
        self._resolver = resolver
        self._system_resolver: client.Resolver | None = None
        self.queue: QueueService | None = None
        self.router: Router | None = None
        self.transports: dict[str, ITransport] = {}
        self._control: IListeningPort | None = None
        self.aliases: AliasSource | None = None
        self._alias_watch: LoopingCall | None = None
        self._purge: LoopingCall | None = None
        self.threadpool = ThreadPool(minthreads=1, maxthreads=4, name="mtrkmta-io")
        # Every group commit (spool stores and removals, tracking writes) runs in one
        # thread of its own: each runs one batch at a time anyway, and one thread instead
        # of three competing with the reactor thread for the GIL costs a quarter less CPU
        # per message (doc/architecture.rst, "Threading").
        self.commit_pool = ThreadPool(minthreads=1, maxthreads=1, name="mtrkmta-commit")
        # Password checks (deliberately slow hashing that any client can ask for) and the
        # AUTH failure counts get threads of their own: they never hold up delivery.
        self.auth_pool = ThreadPool(
            minthreads=0, maxthreads=config.auth.threads, name="mtrkmta-auth"
        )
        self.auth: AuthGuard | None = None
        self.auth_failures: SQLAuthFailures | None = None
        self.ready: Deferred[MTAService] = Deferred()
        self.spool: FileSpool | None = None
        self.tracking: SQLTrackingStore | None = None
        self.receiver: Receiver | None = None
        self.factories: dict[str, SMTPServerFactory] = {}
        self.ports: dict[str, IListeningPort] = {}
        self._starting: Deferred[None] | None = None
        self.mtqp: MTQPServerFactory | None = None  # the MTQP listener's sessions (RFC 3887)
        self.pickup: Pickup | None = None  # sendmail's pickup directory (the master's only)
        # The node's one metrics registry (mtrkmta.metrics); a worker writes it to a file.
        self.metrics = PrometheusMetrics()
        self._metrics_writer: LoopingCall | None = None
        if worker is None:
            self.metrics.watch_workers(self._processes_up)
        self.webhooks: WebhookSender | None = None  # with [webhooks.NAME], the master's only
        self.http: BoundedSite | None = None  # the HTTP service (mtrkmta.web; the master's only)

    # -- start ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._starting = ensureDeferred(self._start())
        self._starting.addCallbacks(self._started, self._start_failed)
        if self.notifier is not None:
            self._watchdog = keep_alive(self.notifier, self.reactor)

    def _started(self, _: object) -> None:
        if self.notifier is not None:  # every listener is bound (and the workers started)
            self.notifier.ready(STATUS_READY)
        self.ready.callback(self)

    def _start_failed(self, failure: Failure) -> None:
        assert failure.value is not None  # a Failure always holds its exception
        damage = as_damage(failure.value, self.config.database)
        if damage is not None:  # one line that says what to do, no traceback
            log.critical("{advice}", advice=damage.advice(recover_command(self.origin)))
            self.ready.errback(damage)
            return
        known: StartError | None = (
            failure.value
            if isinstance(failure.value, StartError)
            else storage_error(failure.value, self.config.data_dir, self.config.database)
        )
        if known is not None:  # tap.exit_when_start_fails prints it: one line on stderr
            self.ready.errback(known)
            return
        if self.debug:
            log.failure("mtrkmta could not start", failure)
        self.ready.errback(failure)

    def _blocking(self, fn: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.threadpool, fn, *args)

    async def _start(self) -> None:
        config = self.config
        self.threadpool.start()
        self.commit_pool.start()
        self.auth_pool.start()
        await self._blocking(prepare_data_dir, config.data_dir)
        if self.worker is None:  # PRAGMA quick_check, once: the master's start-up did it
            await self._blocking(check_database, config.database)
        await self._blocking(upgrade, config.database)
        self.auth = self._build_auth()
        self.tracking = SQLTrackingStore(
            self.reactor,
            self.threadpool,
            config.database,
            default_retention=config.tracking.default_retention,
            max_retention=config.tracking.max_retention,
            commit_pool=self.commit_pool,
            faults=self.faults,
            webhooks=config.webhooks,
        )
        self.spool = FileSpool(
            self.reactor,
            self.threadpool,
            config.data_dir / "spool",
            fsync=config.durability.fsync,
            commit_pool=self.commit_pool,
            memory_limit=config.limits.data_buffer,
            faults=self.faults,
        )
        leftovers = await self.spool.recover()
        if leftovers:
            log.info("spool recovery removed {n} incomplete message(s)", n=leftovers)
        await self._reconcile()
        resolver = self._resolver
        if resolver is None:
            resolver = self._system_resolver = client.Resolver(
                resolv="/etc/resolv.conf", reactor=self.reactor
            )
        if self._tracker_factory is None:
            self._tracker_factory = client_factory(self.reactor, resolver)
        # One router for the queue and for RCPT (what it already knows fails is refused).
        self.router = Router.from_config(
            config, resolver, clock=self.reactor, reactor=self.reactor, threadpool=self.threadpool
        )
        # Every message enters through one acceptor: the listeners' (via the
        # receiver), the DSNs and the expansion copies (via the queue).
        acceptor = Acceptor(
            spool=self.spool,
            tracking=self.tracking,
            new_queue_id=QueueIdGenerator(),
            reporting_mta=config.hostname,
            node_id=config.node_id,
            clock=self.reactor,
            max_tracked_per_hour=config.tracking.max_tracked_per_hour,
            metrics=self.metrics,
            max_accepting=config.limits.max_accepting,
        )
        if config.local.aliases is not None:
            self.aliases = AliasSource(config.local.aliases, self.reactor, self.threadpool)
            await self._blocking(self.aliases.load)
            self._alias_watch = LoopingCall(self.aliases.refresh)
            self._alias_watch.clock = self.reactor
            self._alias_watch.start(ALIAS_CHECK_INTERVAL, now=False)
        aliases = self.aliases
        self.addresses = LocalAddresses(
            local_domains=config.local_domains,
            delimiter=config.local.recipient_delimiter,
            book=(lambda: aliases.book) if aliases is not None else (lambda: EMPTY_ALIASES),
        )
        self.queue = self._build_queue(acceptor)
        maildir = self.transports["maildir"]
        assert isinstance(maildir, MaildirTransport)
        checks = RecipientChecks(
            addresses=self.addresses,
            users=config.local.users,
            known_route=self.router.known,
            mailbox_problem=maildir.unusable,
        )
        self.receiver = Receiver(
            acceptor=acceptor,
            policy=RelayPolicy.build(
                config.local_domains,
                (route.domain for route in config.routes),
                config.relay.trusted_networks,
            ),
            min_free_space=config.limits.min_free_space,
            clock=self.reactor,
            enqueue=self.queue.admit if self.deliver else None,
            check_local=checks.check_local if config.local.users else None,
            check_route=checks.check_route,
            check_binary=checks.check_binary,
        )
        await self.receiver.start()
        self._purge = LoopingCall(self._purge_tracking)
        self._purge.clock = self.reactor
        self._purge.start(config.tracking.purge_interval, now=False)
        if self.deliver:
            await self.queue.start()
        hooks: dict[str, Any] = {RELOAD_ALIASES: self.reload}
        if self.worker is None and config.webhooks:  # the master alone sends (doc/tracking.rst)
            secrets, policies = await self._blocking(hook_files, config.webhooks)
            self.webhooks = WebhookSender(
                self.reactor,
                self.tracking,
                config.webhooks,
                secrets,
                owner=f"{config.node_id}/{os.getpid()}",
                max_entries=config.tracking.webhook_outbox_limit,
                policies=policies,
                metrics=self.metrics,
            )
            self.webhooks.start()
        if self.worker is None:
            self.pickup = Pickup(
                data_dir=config.data_dir,
                acceptor=acceptor,
                hostname=config.hostname,
                domain=config.local_domains[0] if config.local_domains else config.hostname,
                message_size=config.limits.message_size,
                poll_interval=config.pickup.poll_interval,
                clock=self.reactor,
                blocking=self._blocking,
                enqueue=self.queue.admit if self.deliver else None,
                faults=self.faults,
            )
            await self.pickup.start()
            hooks[PICKUP] = self.pickup.scan
        self._control = self.reactor.listenUNIX(
            str(config.data_dir / CONTROL_SOCKET),
            ControlFactory(self.queue, hooks),
            mode=0o600,
            wantPID=True,
        )
        if self.worker is not None:
            self._listen_as_worker(self.worker)
            self._metrics_writer = LoopingCall(self._write_metrics)
            self._metrics_writer.clock = self.reactor
            self._metrics_writer.start(METRICS_INTERVAL, now=True)
        else:
            await self._listen()

    # -- metrics (mtrkmta.metrics): a worker writes its own to a file the master sums in -----

    def _processes_up(self) -> int:
        return 1 + (self.supervisor.running if self.supervisor is not None else 0)

    def _write_metrics(self) -> Deferred[None]:
        path = self.config.data_dir / METRICS_FILE
        d = self._blocking(write_exposition, path, self.metrics.exposition())
        return d.addErrback(lambda f: log.error("cannot write {path}: {e}", path=path, e=f.value))

    def exposition(self) -> Deferred[bytes]:
        """The node's metrics in the Prometheus text format: this process's, plus those
        its worker processes wrote last (read and summed in a pool thread)."""
        registry, data_dir = self.metrics.registry, self.config.data_dir

        def merge() -> bytes:
            return merged_exposition(registry, read_expositions(metrics_files(data_dir)))

        return self._blocking(merge)

    def _build_auth(self) -> AuthGuard | None:
        """The password checker with its limits, on the auth pool; None without a users file.

        Failures per client address are counted in the tracking database, so that
        every worker process and every node on that database sees them.
        """
        auth = self.config.auth
        if auth.users_file is None:
            return None
        self.auth_failures = SQLAuthFailures(
            self.config.database, self.reactor, self.auth_pool, window=auth.failure_window
        )
        checker = PasswordFileChecker(
            auth.users_file, self.reactor, self.auth_pool, max_pending=auth.max_pending
        )
        limits = AuthLimits(
            max_failures=auth.max_failures,
            max_address_failures=auth.max_address_failures,
            failure_delay=auth.failure_delay,
            max_failure_delay=auth.max_failure_delay,
        )
        return AuthGuard(checker, limits, self.auth_failures)

    def _purge_tracking(self) -> Deferred[None]:
        """Drop expired tracking records (never those of queued messages, RFC 3885 §3.1)."""
        assert self.tracking is not None

        def purged(count: int) -> None:
            if count:
                log.info("tracking: purged {n} expired record(s)", n=count)

        def failed(failure: Failure) -> None:
            log.failure("tracking purge failed", failure)

        return self.tracking.expire().addCallbacks(purged, failed)

    def reload(self) -> Deferred[bool]:
        """Re-read the configuration file and the files it names (SIGHUP, ``newaliases``).

        All or nothing: the new TLS certificate and key, users file, aliases file
        and routes are each read and checked first; only when all of them are good
        do they replace the old ones, and new connections use them while open
        sessions keep what they started with. Any failure keeps the whole old
        configuration and logs one line naming the file and the problem. Other
        changed settings are logged as needing a restart. Reloads run one at a
        time; a master passes the signal on to its worker processes. The result
        is whether the reload took effect.
        """
        if self.supervisor is not None:
            self.supervisor.signal("HUP")
        if self.notifier is not None:
            self.notifier.reloading()
        done: Deferred[bool] = Deferred()

        def run(_: object) -> Deferred[None]:
            reloaded = ensureDeferred(self._reload())
            reloaded.chainDeferred(done)
            return reloaded.addBoth(lambda _: None)

        def unexpected(failure: Failure) -> bool:
            log.failure("reload failed, the previous configuration may be partly replaced", failure)
            return False

        def told(result: bool) -> bool:
            if self.notifier is not None:
                self.notifier.ready(STATUS_READY)
            return result

        self._reloads.addBoth(run)  # after the reload before this one
        return done.addErrback(unexpected).addCallback(told)

    async def _reload(self) -> bool:
        if not self.ready.called:  # a reload asked for during start-up runs after it
            started: Deferred[None] = Deferred()

            def passed(result: object) -> object:
                started.callback(None)
                return result

            self.ready.addBoth(passed)
            await started
        if self.receiver is None or self.router is None or not self.running:
            log.warn("reload: the node is not running, nothing reloaded")
            return False
        try:
            plan = await self._blocking(self._read_reload)
            self._apply_reload(plan)
        except ReloadError as error:
            log.error("reload failed, the previous configuration stays: {error}", error=error)
            return False
        except ValueError as error:  # the routes, checked before anything changed
            log.error(
                "reload failed, the previous configuration stays: routes: {error}", error=error
            )
            return False
        return True

    def _read_reload(self) -> _ReloadPlan:
        """Read and check everything a reload replaces (blocking; raises ReloadError)."""
        old = self.config
        new = old
        if self.origin is not None:
            try:
                new = load_config(self.origin.path, self.origin.overrides)
            except ConfigError as error:  # it names the file, the key and the problem
                raise ReloadError(str(error)) from None
            if self.worker is not None:
                new = self.worker.node_config(new)
        restart = restart_needed(old, new)
        if old.auth.users_file is None or new.auth.users_file is None:
            new = replace(new, auth=replace(new.auth, users_file=old.auth.users_file))
        if old.local.aliases is None or new.local.aliases is None:
            new = replace(new, local=replace(new.local, aliases=old.local.aliases))
        tls = None
        if new.tls.certificate is not None and new.tls.private_key is not None:
            try:
                tls = server_context(new.tls.certificate, new.tls.private_key)
            except (TLSFileError, OSError) as error:
                raise ReloadError(str(error)) from None
        if new.auth.users_file is not None:
            path = new.auth.users_file
            try:
                parse_users(path.read_text("utf-8"), str(path))
            except OSError as error:
                raise ReloadError(f"auth.users_file {path}: {error.strerror}") from None
            except (PasswordFileError, UnicodeDecodeError) as error:
                raise ReloadError(f"auth.users_file {error}") from None
        aliases = None
        if new.local.aliases is not None:
            path = new.local.aliases
            try:
                aliases = AliasBook.parse(path.read_text("utf-8"), str(path))
            except OSError as error:
                raise ReloadError(f"local.aliases {path}: {error.strerror}") from None
            except (AliasError, UnicodeDecodeError) as error:
                raise ReloadError(f"local.aliases {error}") from None
        mtqp = None
        if self.mtqp is not None:
            fresh = settings_from_config(new, tls)
            try:
                mtqp = replace(self.mtqp.settings, tls=tls, tls_names=fresh.tls_names)
            except ValueError as error:
                raise ReloadError(f"mtqp: {error}; restart instead") from None
        return _ReloadPlan(new, tls, aliases, mtqp, restart)

    def _apply_reload(self, plan: _ReloadPlan) -> None:
        new = plan.config
        assert self.receiver is not None and self.router is not None
        self.router.replace_routes(new.routes)  # raises ValueError before anything changed
        for factory in self.factories.values():
            factory.settings = replace(factory.settings, tls=plan.tls)
        if self.mtqp is not None and plan.mtqp is not None:
            self.mtqp.settings = plan.mtqp
        if isinstance(self.auth, AuthGuard) and new.auth.users_file is not None:
            checker = self.auth.checker
            if isinstance(checker, PasswordFileChecker):
                checker.path = new.auth.users_file
        if self.aliases is not None and plan.aliases is not None and new.local.aliases is not None:
            self.aliases.replace(new.local.aliases, plan.aliases)
        self.receiver.policy = RelayPolicy.build(
            self.config.local_domains,
            (route.domain for route in new.routes),
            self.config.relay.trusted_networks,
        )
        self.config = replace(
            self.config,
            routes=new.routes,
            tls=replace(
                self.config.tls,
                certificate=new.tls.certificate,
                private_key=new.tls.private_key,
            ),
            auth=replace(self.config.auth, users_file=new.auth.users_file),
            local=replace(self.config.local, aliases=new.local.aliases),
        )
        parts = []
        if plan.tls is not None:
            parts.append(f"TLS certificate {new.tls.certificate}")
        if new.auth.users_file is not None:
            parts.append(f"users file {new.auth.users_file}")
        if plan.aliases is not None:
            parts.append(f"aliases file {new.local.aliases}")
        parts.append(f"{len(new.routes)} route(s)")
        log.info("reloaded: {what}", what=", ".join(parts))
        if plan.restart:
            log.warn(
                "reload: changed settings need a restart to take effect: {keys}",
                keys=", ".join(plan.restart),
            )

    def _build_queue(self, acceptor: Acceptor) -> QueueService:
        config = self.config
        assert self.spool is not None and self.tracking is not None and self.router is not None
        settings = SMTPTransportSettings(
            hostname=config.hostname,
            default_retention=config.tracking.default_retention,
            metrics=self.metrics,
            chunking=config.delivery.chunking,
        )
        self.transports = {
            "smtp": SMTPTransport(self.reactor, settings, faults=self.faults),
            "lmtp": LMTPTransport(self.reactor, settings, faults=self.faults),
            "maildir": MaildirTransport(
                self.reactor,
                self.threadpool,
                self.mail_root,
                hostname=config.hostname,
                fsync=config.durability.fsync,
                delimiter=config.local.recipient_delimiter,
                template=config.local.mailbox,
                faults=self.faults,
            ),
        }
        notifier = DsnNotifier(
            spool=self.spool,
            new_queue_id=acceptor.new_queue_id,
            reporting_mta=config.hostname,
            delay_warning=config.queue.delay_warning,
            clock=self.reactor,
            metrics=self.metrics,
        )
        return QueueService(
            notifier=notifier,
            expander=self.addresses.resolve,
            acceptor=acceptor,
            hostname=config.hostname,
            default_retention=config.tracking.default_retention,
            spool=self.spool,
            tracking=self.tracking,
            router=self.router,
            transports=self.transports,
            clock=self.reactor,
            node_id=config.node_id,
            retry=RetryPolicy(
                first_retry=config.queue.first_retry,
                max_interval=config.queue.max_retry_interval,
                max_lifetime=config.queue.max_lifetime,
            ),
            destination_concurrency=config.delivery.destination_concurrency,
            content_cache_bytes=config.queue.content_cache,
            transient_errors=(OSError, SpoolError, *TRANSIENT_ERRORS),
            faults=self.faults,
            metrics=self.metrics,
        )

    async def _reconcile(self) -> None:
        """Move spool files that have no tracking record (never acknowledged) aside, and
        remove those whose message is finished (a crash came before their removal)."""
        assert self.spool is not None and self.tracking is not None
        on_disk = await self.spool.queue_ids()
        known = await self.tracking.known(on_disk)
        orphans = [queue_id for queue_id in on_disk if queue_id not in known]
        unfinished = set(await self.tracking.queued_messages(self.config.node_id))
        finished = []
        for queue_id in on_disk:
            if queue_id not in known or queue_id in unfinished:
                continue
            record = await self.tracking.message(queue_id)
            if record is None or record.unfinished:
                continue
            if record.node_id != self.config.node_id:
                # Never touch mail queued under another node id (server.node_id changed?).
                log.warn(
                    "{queue_id}: spool file belongs to node {owner}, not {me}: left alone",
                    queue_id=queue_id,
                    owner=record.node_id,
                    me=self.config.node_id,
                )
                continue
            finished.append(queue_id)
        if finished:
            # Every recipient final and every DSN queued: a crash came before the removal.
            await self.spool.remove(finished)
            log.info("spool recovery removed {n} finished message(s)", n=len(finished))
            for queue_id in finished:
                log.info(
                    "{queue_id}: removed by spool recovery (every recipient final)",
                    queue_id=queue_id,
                )
        if orphans:
            where = await self.spool.quarantine(orphans)
            log.warn(
                "spool recovery: {n} message file(s) without a tracking record were never "
                "acknowledged (crash before the commit), and were moved to {where}: {ids}",
                n=len(orphans),
                where=where,
                ids=" ".join(orphans),
            )
            for queue_id in orphans:
                log.warn(
                    "{queue_id}: no tracking record: moved to {where}",
                    queue_id=queue_id,
                    where=where,
                )

    def settings(self, listener: str) -> ServerSettings:
        """The server settings of one listener, from the configuration."""
        config = self.config
        limits = config.limits
        tls = None
        if config.tls.certificate is not None and config.tls.private_key is not None:
            tls = server_context(config.tls.certificate, config.tls.private_key)
        checker = self.auth if listener != "lmtp" else None
        return ServerSettings(
            hostname=config.hostname,
            listener=listener,
            message_size=limits.message_size,
            max_recipients=limits.recipients,
            command_line=limits.command_line,
            idle_timeout=limits.idle_timeout,
            data_timeout=limits.data_timeout,
            data_min_rate=limits.data_min_rate,
            session_time=limits.session_time,
            bare_line_ends=limits.bare_line_ends,
            max_connections=limits.max_connections,
            max_connections_per_ip=limits.max_connections_per_ip,
            max_received_headers=limits.max_received_headers,
            address_limits=AddressLimits(
                local_part=limits.local_part_length,
                domain=limits.domain_length,
                path=limits.path_length,
                helo=limits.helo_length,
            ),
            lenient_xtext=config.tracking.lenient_xtext,
            deliverby_min=limits.deliverby_min,
            require_auth=listener == "submission",
            tls=tls,
            checker=checker,
        )

    async def _bind(self, name: str, description: str, factory: IProtocolFactory) -> None:
        """Listen for ``name`` on ``description`` (an endpoint string) with ``factory``; a
        port that cannot be bound is a StartError naming the listener and its key."""
        try:
            self.ports[name] = await serverFromString(self.reactor, description).listen(factory)
        except CannotListenError as error:
            raise listen_error(name, description, error) from error
        log.info(
            "{name} listening on {address}",
            name=name,
            address=listening_address(self.ports[name].getHost()),
        )

    async def _listen(self) -> None:
        listeners = self.config.listeners
        for name, description in (
            ("smtp", listeners.smtp),
            ("submission", listeners.submission),
            ("lmtp", listeners.lmtp),
        ):
            if description is None:
                continue
            factory_class = LMTPServerFactory if name == "lmtp" else SMTPServerFactory
            factory = factory_class(
                self.settings(name), self.receiver, self.reactor, self.faults, self.metrics
            )
            await self._bind(name, description, factory)
            self.factories[name] = factory
        await self._listen_mtqp()
        await self._listen_http()
        await self._start_workers()

    # -- worker processes (mtrkmta.workers) ------------------------------------------------

    def _listen_as_worker(self, worker: WorkerRole) -> None:
        """Accept on the master's sockets, inherited as file descriptors."""
        for name, (fd, family) in sorted(worker.listen_fds.items()):
            factory = SMTPServerFactory(
                self.settings(name), self.receiver, self.reactor, self.faults, self.metrics
            )
            self.ports[name] = self.reactor.adoptStreamPort(fd, family, factory)
            os.close(fd)  # adoptStreamPort took a duplicate
            take_turns(self.ports[name])
            self.factories[name] = factory
            log.info(
                "worker {index}: {name} accepting on {address}",
                index=worker.index,
                name=name,
                address=self.ports[name].getHost(),
            )

    async def _start_workers(self) -> None:
        # Counts an earlier run's workers wrote are gone with that run's master's.
        await self._blocking(remove_files, metrics_files(self.config.data_dir))
        if self.origin is None:
            return
        draining = await self._blocking(draining_workers, self.config.data_dir, self.config.workers)
        if self.config.workers < 2 and not draining:
            return
        shared = shared_sockets(self.ports)
        if self.config.workers >= 2:  # with draining workers only, the master alone accepts
            for name in shared:
                take_turns(self.ports[name])
        self.supervisor = WorkerSupervisor(
            self.reactor,
            self.origin,
            shared,
            count=self.config.workers,
            draining=draining,
            cpus=self.cpus,
        )
        self.supervisor.start()

    # -- MTQP listener (message tracking, RFC 3887): opens after the mail listeners --------

    async def _listen_mtqp(self) -> None:
        description = self.config.listeners.mtqp
        if description is None:
            return
        tls = None
        if self.config.tls.certificate is not None and self.config.tls.private_key is not None:
            tls = server_context(self.config.tls.certificate, self.config.tls.private_key)
        try:
            chain = chain_from_config(
                self.config, self.reactor, self._resolver or self._system_resolver
            )
        except ValueError as error:
            raise StartError(str(error)) from None
        factory = MTQPServerFactory(
            settings_from_config(self.config, tls),
            self.tracking,
            self.reactor,
            self.metrics,
            chain=chain,
        )
        await self._bind("mtqp", description, factory)
        self.mtqp = factory

    # -- end of the MTQP listener -------------------------------------------------------------

    # -- HTTP service (mtrkmta.web): the master's only, opens after MTQP ----------------------

    def http_children(self, admin_token: bytes | None) -> dict[bytes, IResource]:
        """What the HTTP service serves, by path; each part mounts itself here in one line."""
        assert self.tracking is not None and self.spool is not None
        children: dict[bytes, IResource] = {
            b"healthz": Health(),
            b"readyz": Ready(
                unbound=self._unbound, store=self.tracking, spool=self.spool, clock=self.reactor
            ),
        }
        if admin_token is not None:  # no token configured: the admin API does not exist
            children[ADMIN_MOUNT] = admin_api(admin_token, lambda: self.queue)
        children[b"metrics"] = metrics_resource(self.exposition)
        assert self._tracker_factory is not None
        limits = TrackLimits.from_config(self.config)
        children.update(track_resources(self._tracker_factory, limits, self.reactor, self.metrics))
        return children

    def _unbound(self) -> list[str]:
        """The configured listeners that are not bound (now, or any more)."""
        listeners = self.config.listeners
        return [
            key.name
            for key in fields(listeners)
            if getattr(listeners, key.name) is not None and key.name not in self.ports
        ]

    async def _listen_http(self) -> None:
        description = self.config.listeners.http
        if description is None:
            return
        token = None
        if self.config.http.admin_token_file is not None:
            try:
                token = await self._blocking(read_token, self.config.http.admin_token_file)
            except TokenFileError as error:
                raise StartError(str(error)) from None
        limits = HttpLimits.from_config(self.config.http)
        site = build_site(self.http_children(token), limits, self.reactor)
        await self._bind("http", description, site)
        self.http = site

    def port(self, name: str) -> int:
        """The TCP port a listener is bound to (useful with port 0 in tests)."""
        address = self.ports[name].getHost()
        assert isinstance(address, IPv4Address | IPv6Address), address
        return address.port

    # -- stop ------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.notifier is not None:
            self.notifier.stopping()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            await self._starting
        if self.supervisor is not None:
            supervisor, self.supervisor = self.supervisor, None
            await supervisor.stop(self.shutdown_grace + 5.0)
        ports, self.ports = self.ports, {}
        await DeferredList(
            [d for d in (port.stopListening() for port in ports.values()) if d is not None]
        )
        if self.auth is not None:
            self.auth.stop()  # replies held after AUTH failures go now: sessions can close
        factories, self.factories = self.factories, {}
        await DeferredList([factory.shutdown() for factory in factories.values()])
        if self.auth_failures is not None:
            failures, self.auth_failures = self.auth_failures, None
            await failures.close()
        if self.mtqp is not None:  # MTQP sessions close with the mail listeners' ones
            mtqp, self.mtqp = self.mtqp, None
            await mtqp.shutdown()
        if self.http is not None:  # and the HTTP connections
            site, self.http = self.http, None
            await site.connections.drain()
        if self._control is not None:
            stopped = self._control.stopListening()
            if stopped is not None:
                await stopped
            self._control = None
        if self.pickup is not None:
            await self.pickup.stop()
        if self.webhooks is not None:
            webhooks, self.webhooks = self.webhooks, None
            await webhooks.stop()
        if self.queue is not None:
            await self.queue.stop(grace=self.shutdown_grace)
        transports, self.transports = self.transports, {}
        await DeferredList([transport.close() for transport in transports.values()])
        if self._metrics_writer is not None and self._metrics_writer.running:
            self._metrics_writer.stop()
            await self._write_metrics()  # a worker's last counts reach the master's sum
        if self._system_resolver is not None:
            parse_call = getattr(self._system_resolver, "_parseCall", None)
            if parse_call is not None and parse_call.active():
                parse_call.cancel()  # its re-reading of resolv.conf
            self._system_resolver = None
        for timer in (self._alias_watch, self._purge, self._watchdog):
            if timer is not None and timer.running:
                timer.stop()
        if self.receiver is not None:
            self.receiver.stop()
        if self.spool is not None:
            await self.spool.close()
        if self.tracking is not None:
            await self.tracking.close()
        self.commit_pool.stop()
        self.auth_pool.stop()
        self.threadpool.stop()


def make_service(
    config: Config,
    reactor: Any = None,
    origin: ConfigOrigin | None = None,
    faults: IFaults = NoFaults(),
    debug: bool = True,
    notifier: IServiceNotifier | None = None,
    cpus: Sequence[int] = (),
) -> MTAService:
    """The service twistd and ``mtrkmta serve`` run (``origin``, ``faults``, ``debug``,
    ``notifier``, ``cpus``: see MTAService)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return MTAService(
        config, reactor, origin=origin, faults=faults, debug=debug, notifier=notifier, cpus=cpus
    )
