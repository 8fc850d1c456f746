"""mtrkmta.workers without processes: the config hand-off, shared sockets, draining directories."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

from twisted.internet.protocol import ServerFactory
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory

from mtrkmta.config import Override, load_config
from mtrkmta.workers import ConfigOrigin, WorkerRole, decode, draining_workers, shared_sockets


def test_a_worker_loads_the_masters_configuration_and_becomes_its_own_node(tmp_path):
    toml = tmp_path / "mtrkmta.toml"
    toml.write_text('[server]\nhostname = "mx.example.org"\nworkers = 3\n')
    overrides = (
        Override("--data-dir", "server.data_dir", str(tmp_path / "data")),
        Override("--local-domain", "domains.local", ("example.org", "example.net")),
        Override("--workers", "server.workers", 2),
    )
    master = load_config(toml, overrides)
    origin = ConfigOrigin(toml, overrides)
    config, role, again = decode(origin.encode(1, {"smtp": (3, socket.AF_INET)}))
    assert config == master
    assert again == origin  # what the worker's reload loads again
    assert role == WorkerRole(1, {"smtp": (3, int(socket.AF_INET))})
    worker = role.node_config(config)
    assert worker.data_dir == tmp_path / "data" / "workers" / "1"
    assert worker.node_id == "mx.example.org.w1"
    assert worker.database == master.database  # the master's tracking database
    assert (worker.workers, worker.local_domains) == (2, ("example.org", "example.net"))


def test_plain_tcp_listeners_are_shared_tls_ones_are_not():
    with socket.socket() as plain, socket.socket(socket.AF_INET6) as tls:
        ports = {
            "smtp": SimpleNamespace(socket=plain, factory=ServerFactory()),
            "submission": SimpleNamespace(
                socket=tls,
                factory=TLSMemoryBIOFactory(CertificateOptions(), False, ServerFactory()),
            ),
            "lmtp": SimpleNamespace(socket=socket.socket(), factory=ServerFactory()),
        }
        try:
            assert shared_sockets(ports) == {"smtp": (plain.fileno(), int(socket.AF_INET))}
        finally:
            ports["lmtp"].socket.close()


def test_worker_directories_beyond_the_count_are_drained_while_they_hold_mail(tmp_path: Path):
    assert draining_workers(tmp_path, 2) == []
    for number, holds_mail in ((1, True), (2, False), (3, True), (4, True)):
        bucket = tmp_path / "workers" / str(number) / "spool" / "queue" / "ab"
        bucket.mkdir(parents=True)
        if holds_mail:
            (bucket / f"message{number}").write_bytes(b"x")
    (tmp_path / "workers" / "notes").mkdir()
    assert draining_workers(tmp_path, 2) == [3, 4]
    assert draining_workers(tmp_path, 4) == [4]
