"""Server options shared by ``twistd mtrkmta`` and ``mtrkmta serve``: a file plus overrides."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from mtrkmta.cli.conventions import CommandOptions
from mtrkmta.config import Config, Override, load_config
from mtrkmta.workers import ConfigOrigin

# Options that override one setting each: (option, setting, help).
_SIMPLE_OVERRIDES = (
    (
        "data-dir",
        "server.data_dir",
        "Directory for the spool, the SQLite tracking store and the Maildirs "
        "[default: ./mtrkmta-data].",
    ),
    (
        "hostname",
        "server.hostname",
        "Fully-qualified name of this node [default: the machine's name].",
    ),
    (
        "smtp",
        "listeners.smtp",
        "Server endpoint for SMTP, or 'none' [default: tcp:2525:interface=127.0.0.1].",
    ),
    (
        "submission",
        "listeners.submission",
        "Server endpoint for message submission, or 'none' [default: none].",
    ),
    (
        "lmtp",
        "listeners.lmtp",
        "Server endpoint for LMTP, or 'none' [default: tcp:2424:interface=127.0.0.1].",
    ),
    (
        "mtqp",
        "listeners.mtqp",
        "Server endpoint for MTQP, or 'none' [default: tcp:1038:interface=127.0.0.1].",
    ),
    (
        "http",
        "listeners.http",
        "Server endpoint for HTTP (health, admin), or 'none' "
        "[default: tcp:8025:interface=127.0.0.1].",
    ),
    (
        "database",
        "server.database",
        "SQLAlchemy URL of the tracking store [default: sqlite:///<data dir>/tracking.sqlite].",
    ),
    (
        "log-format",
        "logging.format",
        "The log as 'text' lines or 'json' objects, one per event [default: text].",
    ),
    ("prefix", "logging.prefix", "The syslog tag with --syslog [default: mtrkmta]."),
)


class ServeOptions(CommandOptions):
    """Options of the mtrkmta server; ``load_config()`` turns them into a Config.

    Settings come from embedded defaults, then ``--config FILE``, then the other
    options, which win over the file.
    """

    program = "mtrkmta serve"
    synopsis = "[options]"
    longdesc = (
        "Run the mtrkmta mail transfer agent. Without options it listens on localhost only, "
        "keeps its data in ./mtrkmta-data, delivers mail for 'localhost' to Maildirs and "
        "everything else by MX lookup. Options win over the --config file. --route "
        "DOMAIN=TARGET replaces the file's route for DOMAIN ('*' is the default route); its "
        "ENDPOINT is a Twisted client endpoint such as tcp:host=127.0.0.1:port=2526 or "
        "unix:path=/run/dovecot/lmtp. --local-domain replaces the file's list."
    )
    optFlags: tuple[tuple[str, str | None, str], ...] = (
        ("debug", None, "On a failed start, also log the traceback (it is one line without)."),
        ("syslog", None, "Log to syslog (facility mail) instead of standard output."),
    )
    optParameters = (
        ("config", None, None, "TOML configuration file (see doc/configuration.rst)."),
        *((option, None, None, help_text) for option, _, help_text in _SIMPLE_OVERRIDES),
    )

    def __init__(self) -> None:
        super().__init__()
        self["local-domain"] = []
        self["route"] = []
        self["workers"] = None

    def opt_workers(self, count: str) -> None:
        """Processes that accept and deliver mail, sharing the SMTP and submission ports
        [default: 1]."""
        self["workers"] = int(count) if count.strip().isdigit() else count

    def opt_local_domain(self, domain: str) -> None:
        """Domain this node is the final destination for; repeatable, replaces [domains] local."""
        self["local-domain"].append(domain)

    def opt_route(self, route: str) -> None:
        """Route DOMAIN=TARGET (maildir, mx, lmtp:ENDPOINT, smtp:ENDPOINT); repeatable."""
        self["route"].append(route)

    def overrides(self) -> tuple[Override, ...]:
        """The settings given on the command line, in the form ``load_config`` takes."""
        result = [
            Override(f"--{option}", key, self[option])
            for option, key, _ in _SIMPLE_OVERRIDES
            if self[option] is not None
        ]
        if self["local-domain"]:
            result.append(Override("--local-domain", "domains.local", tuple(self["local-domain"])))
        result.extend(Override("--route", "routes", route) for route in self["route"])
        if self["workers"] is not None:
            result.append(Override("--workers", "server.workers", self["workers"]))
        if self["syslog"]:
            result.append(Override("--syslog", "logging.syslog", True))
        return tuple(result)

    def origin(self) -> ConfigOrigin:
        """Where the configuration comes from: what a worker process loads again."""
        path = None if self["config"] is None else Path(self["config"]).absolute()
        return ConfigOrigin(path, self.overrides())

    def load_config(self, *, fqdn: Callable[[], str] = socket.getfqdn) -> Config:
        """The final configuration: defaults, then --config, then the other options.

        Raises ConfigError, whose str() is the one-line message to print before
        exiting with status 2 (``mtrkmta.config.EXIT_CONFIG_ERROR``).
        """
        path = None if self["config"] is None else Path(self["config"])
        return load_config(path, self.overrides(), fqdn=fqdn)
