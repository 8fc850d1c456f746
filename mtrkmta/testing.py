"""Run whole mtrkmta nodes in-process on loopback ports chosen at run time (for tests)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred

from mtrkmta.config import Config, Override, load_config
from mtrkmta.service import MTAService
from mtrkmta.spool.memory import MemorySpool
from mtrkmta.tracking.memory import MemoryTrackingStore

__all__ = [
    "DATABASE_SERVER_ENV",
    "LOOPBACK_ANY_PORT",
    "MemorySpool",
    "MemoryTrackingStore",
    "database_url",
    "node_config",
    "start_node",
    "stop_node",
]

LOOPBACK_ANY_PORT = "tcp:0:interface=127.0.0.1"

DATABASE_SERVER_ENV = "MTRKMTA_TEST_DATABASE_SERVER"
"""Environment variable naming a PostgreSQL server for test nodes' tracking stores.

Its value is an SQLAlchemy URL of a maintenance database on that server, whose user
may create databases (``postgresql+psycopg://user:secret@127.0.0.1:5433/postgres``).
The ``--postgres`` pytest option of this project's test suite starts a throw-away
server and sets it; unset, test nodes keep SQLite in their data directory.
"""


def database_url(data_dir: Path) -> str:
    """The tracking database of a test node whose data directory is ``data_dir``. Blocking.

    SQLite in ``data_dir`` by default. With :data:`DATABASE_SERVER_ENV` set, a
    PostgreSQL database of that server named after ``data_dir``, created empty on
    first use: the same directory (a restarted node) gets the same database back,
    another directory a fresh one. The schema is left to the node (start-up migrates).
    """
    server = os.environ.get(DATABASE_SERVER_ENV)
    if not server:
        return f"sqlite:///{Path(os.path.abspath(data_dir)) / 'tracking.sqlite'}"
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    digest = hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:24]
    name = f"mtrkmta_test_{digest}"
    admin = make_url(server)
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            found = conn.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            )
            if found is None:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return admin.set(database=name).render_as_string(hide_password=False)


def node_config(
    data_dir: Path,
    *,
    hostname: str = "mx.example.test",
    listeners: tuple[str, ...] = ("smtp", "lmtp"),
    options: tuple[tuple[str, object], ...] = (),
    **sections: Any,
) -> Config:
    """A validated configuration for a test node.

    Every listener named in ``listeners`` binds 127.0.0.1 on a free port; the
    others are disabled. ``options`` are further ``(setting, value)`` overrides
    as on the command line (``("domains.local", ("a.test",))``); keyword
    arguments replace whole sections (``limits=Limits(...)``). The tracking
    database is :func:`database_url` unless ``options`` set ``server.database``.
    """
    overrides = [
        Override("test", "server.data_dir", str(data_dir)),
        Override("test", "server.hostname", hostname),
    ]
    if os.environ.get(DATABASE_SERVER_ENV) and all(k != "server.database" for k, _ in options):
        overrides.append(Override("test", "server.database", database_url(data_dir)))
    for name in ("smtp", "submission", "lmtp", "mtqp", "http"):
        value = LOOPBACK_ANY_PORT if name in listeners else "none"
        overrides.append(Override("test", f"listeners.{name}", value))
    overrides += [Override("test", key, value) for key, value in options]
    config = load_config(None, overrides, fqdn=lambda: hostname)
    return dataclasses.replace(config, **sections) if sections else config


async def start_node(
    config: Config,
    reactor: Any = None,
    *,
    resolver: Any = None,
    deliver: bool = True,
    tracker_factory: Any = None,
) -> MTAService:
    """Start a node and wait until its listeners are open.

    ``resolver`` answers the node's MX lookups (tests pass one pointed at a DNS
    server on loopback); ``deliver=False`` leaves accepted mail in the queue;
    ``tracker_factory`` makes the tracking page's MTQP clients (MTAService).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    service = MTAService(
        config, reactor, resolver=resolver, deliver=deliver, tracker_factory=tracker_factory
    )
    service.startService()
    await service.ready
    return service


def stop_node(service: MTAService) -> Deferred[None]:
    """Stop a node: listeners closed, sessions gone, stores closed, threads joined."""
    return ensureDeferred(_stop(service))


async def _stop(service: MTAService) -> None:
    if service.running:
        await service.stopService()
