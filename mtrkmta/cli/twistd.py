"""twistd as `mtrkmta serve` runs it: with the log observer the ``[logging]`` settings ask for."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from twisted.application import app
from twisted.logger import ILogObserver
from twisted.scripts._twistd_unix import ServerOptions, UnixApplicationRunner, UnixAppLogger

from mtrkmta.logfile import configured_observer


class _AppLogger(UnixAppLogger):
    """twistd's logger, its observer made from the server's configuration (text or JSON
    lines on standard output, or syslog) rather than from twistd's own options."""

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        settings = options.subOptions.config.logging

        def observer() -> ILogObserver:
            # Called when logging starts, after the application was made: the reactor
            # twistd runs is installed by then.
            from twisted.internet import reactor

            return configured_observer(settings, reactor=reactor)

        self._observerFactory = observer


class _Runner(UnixApplicationRunner):
    loggerFactory = _AppLogger


def _run_app(config: ServerOptions) -> None:
    """twistd's ``runApp`` with :class:`_Runner`."""
    runner = _Runner(config)
    runner.run()
    if runner._exitSignal is not None:
        app._exitWithSignal(runner._exitSignal)


def run(args: Sequence[str]) -> None:
    """``twistd --nodaemon --pidfile= mtrkmta ARGS``, logging as configured."""
    sys.argv = ["mtrkmta serve", "--nodaemon", "--pidfile=", "mtrkmta", *args]
    app.run(_run_app, ServerOptions)
