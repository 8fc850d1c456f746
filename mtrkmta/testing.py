"""Run whole mtrkmta nodes in-process on loopback ports chosen at run time (for tests)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred

from mtrkmta.config import Config, Override, load_config
from mtrkmta.service import MTAService

LOOPBACK_ANY_PORT = "tcp:0:interface=127.0.0.1"


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
    arguments replace whole sections (``limits=Limits(...)``).
    """
    overrides = [
        Override("test", "server.data_dir", str(data_dir)),
        Override("test", "server.hostname", hostname),
    ]
    for name in ("smtp", "submission", "lmtp", "mtqp"):
        value = LOOPBACK_ANY_PORT if name in listeners else "none"
        overrides.append(Override("test", f"listeners.{name}", value))
    overrides += [Override("test", key, value) for key, value in options]
    config = load_config(None, overrides, fqdn=lambda: hostname)
    return dataclasses.replace(config, **sections) if sections else config


async def start_node(
    config: Config, reactor: Any = None, *, resolver: Any = None, deliver: bool = True
) -> MTAService:
    """Start a node and wait until its listeners are open.

    ``resolver`` answers the node's MX lookups (tests pass one pointed at a DNS
    server on loopback); ``deliver=False`` leaves accepted mail in the queue.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    service = MTAService(config, reactor, resolver=resolver, deliver=deliver)
    service.startService()
    await service.ready
    return service


def stop_node(service: MTAService) -> Deferred[None]:
    """Stop a node: listeners closed, sessions gone, stores closed, threads joined."""
    return ensureDeferred(_stop(service))


async def _stop(service: MTAService) -> None:
    if service.running:
        await service.stopService()
