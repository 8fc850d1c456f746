"""Which changed settings a reload applies and which need a restart (service.restart_needed)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mtrkmta.config import Route, load_config
from mtrkmta.service import restart_needed


def config():
    return load_config(None, (), fqdn=lambda: "mx.example.test")


def test_routes_and_file_paths_are_reloaded_the_rest_needs_a_restart() -> None:
    old = config()
    new = replace(
        old,
        routes=(Route("partner.example", "smtp", "tcp:host=127.0.0.1:port=25"), *old.routes),
        tls=replace(old.tls, certificate=Path("/b/cert.pem"), private_key=Path("/b/key.pem")),
        limits=replace(old.limits, message_size=1000),
        workers=3,
    )
    assert restart_needed(old, new) == ("server.workers", "limits.message_size")
    assert restart_needed(old, old) == ()


def test_turning_the_users_or_aliases_file_on_needs_a_restart() -> None:
    old = config()
    users = replace(old, auth=replace(old.auth, users_file=Path("/etc/mtrkmta/users")))
    assert restart_needed(old, users) == ("auth.users_file",)
    moved = replace(users, auth=replace(users.auth, users_file=Path("/srv/users")))
    assert restart_needed(users, moved) == ()
    aliases = replace(old, local=replace(old.local, aliases=Path("/etc/mtrkmta/aliases.toml")))
    assert restart_needed(aliases, old) == ("local.aliases",)
