"""What the twistd plugin runs: option parsing with config validation, then the service."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtrkmta.affinity import allowed_cpus, pin_process
from mtrkmta.cli.options import ServeOptions
from mtrkmta.collector import tune_collector
from mtrkmta.config import EXIT_CONFIG_ERROR, Config, ConfigError
from mtrkmta.faults import FaultSpecError, IFaults, from_environment
from mtrkmta.notify import SystemdNotifier
from mtrkmta.service import MTAService, StartError, make_service
from mtrkmta.tracking.damage import DatabaseDamage

log = Logger()

EXIT_START_FAILED = 1


class Options(ServeOptions):
    """``twistd mtrkmta`` options; a bad configuration stops here with status 2."""

    config: Config
    faults: IFaults

    def postOptions(self) -> None:
        try:
            self.config = self.load_config()
            # Fault injection for tests (doc/development.rst); read here and nowhere else.
            self.faults = from_environment(os.environ)
        except (ConfigError, FaultSpecError) as error:
            print(f"mtrkmta: {error}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG_ERROR) from None


def exit_when_start_fails(service: MTAService, reactor: Any) -> None:
    """If start-up fails (port in use, database unreachable or damaged), stop the process
    with status 1.

    twistd itself would exit 0 after the reactor stops, so the exit status is
    forced once the shutdown (services stopped, logs flushed) has run.
    """

    def failed(failure: Failure) -> None:
        if failure.check(StartError):  # one line naming the setting and the fix
            _say(f"mtrkmta: {failure.getErrorMessage()}")
        elif not failure.check(DatabaseDamage):  # that one was logged as one line already
            first = (failure.getErrorMessage().strip().splitlines() or ["unknown error"])[0]
            _say(f"mtrkmta: could not start: {first}")
        reactor.addSystemEventTrigger("after", "shutdown", _exit, EXIT_START_FAILED)
        reactor.stop()

    service.ready.addErrback(failed)


def _say(line: str) -> None:
    """One line on the process's own stderr (twistd turns ``sys.stderr`` into the log)."""
    stderr = sys.__stderr__ if sys.__stderr__ is not None else sys.stderr
    print(line, file=stderr, flush=True)


def _exit(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def makeService(options: Options) -> MTAService:
    from twisted.internet import reactor

    cpus = allowed_cpus()  # before pinning: the workers choose from the whole set
    service = make_service(
        options.config,
        reactor,
        options.origin(),
        options.faults,
        debug=bool(options["debug"]),
        notifier=SystemdNotifier.from_environment(os.environ),  # systemd's Type=notify
        cpus=cpus,
    )
    if options.config.cpu_affinity:  # before any thread starts: they inherit the CPU
        pin_process(0, cpus)
    tune_collector(service.ready)  # first: a failed start must freeze nothing
    exit_when_start_fails(service, reactor)
    # SIGHUP reloads certificates, users, aliases and routes (twistd uses SIGUSR1, for its log).
    threads = IReactorThreads(reactor)
    signal.signal(signal.SIGHUP, lambda *_: threads.callFromThread(service.reload))
    return service
