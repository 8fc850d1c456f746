"""Tests for mtrkmta.config: defaults, the TOML file, overrides and every kind of mistake."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrkmta.config import (
    DAY,
    DEFAULT_ROUTE,
    HOUR,
    MINUTE,
    WEEK,
    ConfigError,
    MiB,
    Override,
    Route,
    check_config_file,
    load_config,
    setting_names,
)
from mtrkmta.config.convert import _format_duration, _format_size, _parse_duration, _parse_size

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "mtrkmta" / "config" / "example.toml"
DOC = REPO / "doc" / "configuration.rst"


def fqdn() -> str:
    return "mx.example.org"


def write(tmp_path: Path, text: str, name: str = "mtrkmta.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_for(path: Path | None, overrides: tuple[Override, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, fqdn=fqdn)
    return str(info.value)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(root.rglob("*"))
    }


# ---------------------------------------------------------------------------
# Defaults


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(fqdn=fqdn)
    assert config.hostname == "mx.example.org"
    assert config.node_id == "mx.example.org"
    assert config.data_dir == tmp_path / "mtrkmta-data"
    assert config.data_dir.is_absolute()
    assert config.database == f"sqlite:///{tmp_path}/mtrkmta-data/tracking.sqlite"
    assert config.database.startswith("sqlite:////")
    assert config.listeners.smtp == "tcp:2525:interface=127.0.0.1"
    assert config.listeners.submission is None
    assert config.listeners.lmtp == "tcp:2424:interface=127.0.0.1"
    assert config.listeners.mtqp == "tcp:1038:interface=127.0.0.1"
    assert config.local_domains == ("localhost",)
    assert config.routes == (Route("*", "mx", None),)
    assert config.relay.trusted_networks == ()
    assert config.limits.message_size == 35 * MiB
    assert config.limits.recipients == 1000
    assert config.limits.command_line == 2048
    assert config.limits.idle_timeout == 300.0
    assert config.limits.max_connections == 1000
    assert config.limits.max_connections_per_ip == 50
    assert config.limits.min_free_space == 100 * MiB
    assert config.limits.max_received_headers == 100
    # RFC 5321 §4.5.3.1: local part, domain, path; the HELO name is a domain.
    assert (
        config.limits.local_part_length,
        config.limits.domain_length,
        config.limits.path_length,
        config.limits.helo_length,
    ) == (64, 255, 256, 255)
    assert config.tls.certificate is None and config.tls.private_key is None
    assert not config.tls.enabled
    assert config.auth.users_file is None
    assert config.auth.max_failures == 3
    assert config.auth.max_address_failures == 10
    assert config.auth.failure_window == 15 * MINUTE
    assert config.auth.failure_delay == 1.0
    assert config.auth.max_failure_delay == 30.0
    assert config.auth.threads == 2
    assert config.auth.max_pending == 16
    assert config.tracking.default_retention == 9 * DAY
    assert config.tracking.max_retention == 30 * DAY
    assert config.tracking.lenient_xtext is False
    assert config.queue.first_retry == 5 * MINUTE
    assert config.queue.max_retry_interval == HOUR
    assert config.queue.max_lifetime == 5 * DAY
    assert config.queue.delay_warning == 4 * HOUR
    assert config.durability.fsync is True


def test_loading_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_config(fqdn=fqdn)
    assert list(tmp_path.iterdir()) == []


def test_loading_a_file_touches_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cert.pem").write_text("cert")
    (tmp_path / "key.pem").write_text("key")
    (tmp_path / "users").write_text("")
    path = write(
        tmp_path,
        '[server]\ndata_dir = "spool"\n'
        '[tls]\ncertificate = "cert.pem"\nprivate_key = "key.pem"\n'
        '[auth]\nusers_file = "users"\n'
        '[listeners]\nlmtp = "unix:lmtp.sock"\n',
    )
    before = snapshot(tmp_path)
    config = load_config(path, fqdn=fqdn)
    assert snapshot(tmp_path) == before
    assert not config.data_dir.exists()


def test_machine_name_is_used_even_when_not_fully_qualified():
    config = load_config(fqdn=lambda: "localhost")
    assert config.hostname == "localhost"
    assert config.node_id == "localhost"


def test_machine_name_that_is_not_a_host_name():
    with pytest.raises(ConfigError) as info:
        load_config(fqdn=lambda: "build_box")
    assert str(info.value) == (
        "config error: server.hostname: this machine's name 'build_box' is not a valid "
        "host name; set server.hostname or --hostname"
    )


def test_config_is_frozen():
    config = load_config(fqdn=fqdn)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hostname = "other.example.org"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits.recipients = 1  # type: ignore[misc]


def test_setting_names_cover_every_section():
    names = setting_names()
    assert names[0] == "server.hostname"
    assert {name.partition(".")[0] for name in names} == {
        "server",
        "listeners",
        "domains",
        "routes",
        "relay",
        "limits",
        "tls",
        "auth",
        "tracking",
        "mtqp",
        "http",
        "queue",
        "delivery",
        "local",
        "durability",
        "pickup",
        "logging",
        "webhooks",
    }
    assert len(names) == len(set(names)) == 93


# ---------------------------------------------------------------------------
# The file


def test_file_values(tmp_path):
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "cert.pem").write_text("cert")
    (tmp_path / "tls" / "key.pem").write_text("key")
    (tmp_path / "users").write_text("")
    path = write(
        tmp_path,
        """
[server]
hostname = "MX.Example.ORG."
data_dir = "data"
database = "postgresql://mtrkmta@db.example.org/mtrkmta"
node_id = "mx1"

[listeners]
smtp = "tcp:25"
submission = "tcp:587"
lmtp = false
mtqp = "none"

[domains]
local = ["Example.ORG", "example.net", "example.org"]

[routes]
"*" = "smtp:tcp:host=smarthost.example.net:port=25"
"example.net" = "lmtp:unix:path=/run/dovecot/lmtp"
"example.org" = "maildir"

[relay]
trusted_networks = ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7", "192.0.2.0/24"]

[limits]
message_size = "10M"
recipients = 100
command_line = 512
idle_timeout = "1m30s"
max_connections = 10
max_connections_per_ip = 10
min_free_space = 0
max_received_headers = 30

[tls]
certificate = "tls/cert.pem"
private_key = "tls/key.pem"

[auth]
users_file = "users"
max_failures = 5
max_address_failures = 20
failure_window = "1h"
failure_delay = "0.5s"
max_failure_delay = "1m"
threads = 4
max_pending = 64

[tracking]
default_retention = "1d"
max_retention = "2w"
lenient_xtext = true

[queue]
first_retry = 60
max_retry_interval = "30m"
max_lifetime = "3d"
delay_warning = "2h"

[durability]
fsync = false
""",
    )
    config = load_config(path, fqdn=fqdn)
    assert config.hostname == "mx.example.org"
    assert config.data_dir == tmp_path / "data"
    assert config.database == "postgresql://mtrkmta@db.example.org/mtrkmta"
    assert config.node_id == "mx1"
    assert config.listeners.smtp == "tcp:25"
    assert config.listeners.submission == "tcp:587"
    assert config.listeners.lmtp is None
    assert config.listeners.mtqp is None
    assert config.local_domains == ("example.org", "example.net")
    assert config.routes == (
        Route("example.net", "lmtp", "unix:path=/run/dovecot/lmtp"),
        Route("example.org", "maildir", None),
        Route("*", "smtp", "tcp:host=smarthost.example.net:port=25"),
    )
    assert config.relay.trusted_networks == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("198.51.100.7/32"),
    )
    assert config.limits.message_size == 10 * MiB
    assert config.limits.recipients == 100
    assert config.limits.command_line == 512
    assert config.limits.idle_timeout == 90.0
    assert config.limits.max_connections == 10
    assert config.limits.max_connections_per_ip == 10
    assert config.limits.min_free_space == 0
    assert config.limits.max_received_headers == 30
    assert config.tls.certificate == tmp_path / "tls" / "cert.pem"
    assert config.tls.private_key == tmp_path / "tls" / "key.pem"
    assert config.tls.enabled
    assert config.auth.users_file == tmp_path / "users"
    assert config.auth.max_failures == 5
    assert config.auth.max_address_failures == 20
    assert config.auth.failure_window == HOUR
    assert config.auth.failure_delay == 0.5
    assert config.auth.max_failure_delay == MINUTE
    assert config.auth.threads == 4
    assert config.auth.max_pending == 64
    assert config.tracking.default_retention == DAY
    assert config.tracking.max_retention == 2 * WEEK
    assert config.tracking.lenient_xtext is True
    assert config.queue.first_retry == 60.0
    assert config.queue.max_retry_interval == 30 * MINUTE
    assert config.queue.max_lifetime == 3 * DAY
    assert config.queue.delay_warning == 2 * HOUR
    assert config.durability.fsync is False


def test_empty_file_gives_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(write(tmp_path, ""), fqdn=fqdn) == load_config(fqdn=fqdn)


def test_relative_paths_in_the_file_start_at_its_directory(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    path = write(tmp_path / "etc", '[server]\ndata_dir = "../var/mtrkmta"\n')
    config = load_config(Path(os.path.relpath(path)), fqdn=fqdn)
    assert config.data_dir == tmp_path / "var" / "mtrkmta"
    assert config.database == f"sqlite:///{tmp_path}/var/mtrkmta/tracking.sqlite"


def test_routes_end_with_default_route(tmp_path):
    path = write(tmp_path, '[routes]\n"*" = "mx"\n"example.org" = "maildir"\n')
    config = load_config(path, fqdn=fqdn)
    assert config.routes == (Route("example.org", "maildir"), DEFAULT_ROUTE)


def test_route_for_and_is_local(tmp_path):
    path = write(
        tmp_path,
        '[domains]\nlocal = ["example.org", "example.net"]\n'
        '[routes]\n"example.net" = "lmtp:tcp:host=127.0.0.1:port=24"\n'
        '"partner.example" = "smtp:tcp:host=gw.partner.example:port=25"\n',
    )
    config = load_config(path, fqdn=fqdn)
    assert config.is_local("Example.ORG.")
    assert not config.is_local("partner.example")
    assert config.route_for("EXAMPLE.org") == Route("example.org", "maildir")
    assert config.route_for("example.net") == Route(
        "example.net", "lmtp", "tcp:host=127.0.0.1:port=24"
    )
    assert config.route_for("partner.example").transport == "smtp"
    assert config.route_for("elsewhere.example") == DEFAULT_ROUTE


def test_subdomain_routes(tmp_path):
    path = write(
        tmp_path,
        '[domains]\nlocal = ["local.example.org"]\n'
        '[routes]\n".example.org" = "lmtp:tcp:host=127.0.0.1:port=24"\n'
        '".b.example.org" = "smtp:tcp:host=gw.example.org:port=25"\n'
        '"c.b.example.org" = "mx"\n'
        '"*" = "smtp:tcp:host=relay.example.net:port=25"\n',
    )
    config = load_config(path, fqdn=fqdn)
    assert config.route_for("a.example.org").transport == "lmtp"
    assert config.route_for("x.a.example.org").transport == "lmtp"
    assert config.route_for("x.b.example.org").transport == "smtp"
    assert config.route_for("c.b.example.org").transport == "mx"
    assert config.route_for("local.example.org") == Route("local.example.org", "maildir")
    assert config.route_for("example.org").endpoint == "tcp:host=relay.example.net:port=25"


def test_bad_subdomain_route(tmp_path):
    path = write(tmp_path, '[routes]\n"..example.org" = "mx"\n')
    assert error_for(path) == (
        f'config error: {path}: routes."..example.org": '
        "expected .DOMAIN such as .example.org, got '..example.org'"
    )


# ---------------------------------------------------------------------------
# Overrides


def test_overrides_win_over_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(
        tmp_path,
        '[server]\nhostname = "file.example.org"\ndata_dir = "/srv/file"\n'
        '[listeners]\nsmtp = "tcp:25"\nlmtp = "tcp:24"\n'
        '[domains]\nlocal = ["a.example", "b.example"]\n'
        '[routes]\n"a.example" = "maildir"\n"b.example" = "maildir"\n',
    )
    overrides = (
        Override("--hostname", "server.hostname", "option.example.org"),
        Override("--data-dir", "server.data_dir", "spool"),
        Override("--smtp", "listeners.smtp", "none"),
        Override("--local-domain", "domains.local", ("C.example",)),
        Override("--route", "routes", "b.example=lmtp:unix:path=/run/lmtp"),
        Override("--route", "routes", "*=smtp:tcp:host=relay.example:port=25"),
        Override("--route", "routes", "d.example = mx"),
    )
    config = load_config(path, overrides, fqdn=fqdn)
    assert config.hostname == "option.example.org"
    assert config.node_id == "option.example.org"
    assert config.data_dir == tmp_path / "spool"
    assert config.database == f"sqlite:///{tmp_path}/spool/tracking.sqlite"
    assert config.listeners.smtp is None
    assert config.listeners.lmtp == "tcp:24"
    assert config.local_domains == ("c.example",)
    assert config.routes == (
        Route("a.example", "maildir"),
        Route("b.example", "lmtp", "unix:path=/run/lmtp"),
        Route("d.example", "mx"),
        Route("*", "smtp", "tcp:host=relay.example:port=25"),
    )


def test_route_option_splits_at_the_first_equals_sign(tmp_path):
    override = Override("--route", "routes", "example.org=lmtp:unix:path=/run/a=b")
    config = load_config(None, (override,), fqdn=fqdn)
    assert config.routes[0] == Route("example.org", "lmtp", "unix:path=/run/a=b")


def test_explicit_database_is_kept_when_data_dir_changes(tmp_path):
    path = write(tmp_path, '[server]\ndatabase = "sqlite:////srv/db.sqlite"\n')
    overrides = (Override("--data-dir", "server.data_dir", str(tmp_path / "x")),)
    assert load_config(path, overrides, fqdn=fqdn).database == "sqlite:////srv/db.sqlite"


def test_unknown_override_key_is_a_programming_error():
    with pytest.raises(ValueError, match=r"no setting named 'limits\.nope'"):
        load_config(None, (Override("--nope", "limits.nope", "1"),), fqdn=fqdn)


# ---------------------------------------------------------------------------
# Value syntax


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("9d", 9 * DAY),
        ("1h30m", 5400.0),
        ("2w", 2 * WEEK),
        ("1d12h", 1.5 * DAY),
        ("1w2d3h4m5s", WEEK + 2 * DAY + 3 * HOUR + 4 * MINUTE + 5),
        ("0.5s", 0.5),
        ("1.5h", 5400.0),
        ("300", 300.0),
        (" 1H 30M ", 5400.0),
        (45, 45.0),
        (2.5, 2.5),
    ],
)
def test_durations(text, seconds):
    assert _parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["9x", "", "m", "30m1h", "1h1h", "-5m", "5 ms", "1e3s", True])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="expected a duration such as 90s"):
        _parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512K", 512 * 1024),
        ("10M", 10 * MiB),
        ("1G", 1024 * MiB),
        ("2T", 2 * 1024 * 1024 * MiB),
        ("10m", 10 * MiB),
        ("10MB", 10 * MiB),
        ("10MiB", 10 * MiB),
        ("4096", 4096),
        ("4096B", 4096),
        (4096, 4096),
    ],
)
def test_sizes(text, size):
    assert _parse_size(text) == size


@pytest.mark.parametrize("text", ["9x", "", "1.5M", "M", "10 M", "-1M", 1.5, False])
def test_bad_sizes(text):
    with pytest.raises(ValueError, match="expected a size such as 10M"):
        _parse_size(text)


@given(st.integers(min_value=1, max_value=10**9))
def test_duration_format_round_trips(seconds):
    assert _parse_duration(_format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=2**50))
def test_size_format_round_trips(size):
    assert _parse_size(_format_size(size)) == size


# ---------------------------------------------------------------------------
# Mistakes: one message naming the file or option and the key


def test_error_message_format(tmp_path):
    path = write(tmp_path, '[limits]\nmessage_size = "9x"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, fqdn=fqdn)
    assert str(info.value) == (
        f"config error: {path}: limits.message_size: expected a size such as 10M, got '9x'"
    )
    assert info.value.where == str(path)
    assert info.value.key == "limits.message_size"


def test_unknown_section(tmp_path):
    path = write(tmp_path, "[limit]\nrecipients = 5\n")
    assert (
        error_for(path) == f"config error: {path}: limit: unknown section; did you mean [limits]?"
    )


def test_unknown_section_without_close_match_lists_sections(tmp_path):
    path = write(tmp_path, "[zzz]\n")
    assert error_for(path).startswith(
        f"config error: {path}: zzz: unknown section; sections are [server], [listeners]"
    )


def test_key_outside_any_section(tmp_path):
    path = write(tmp_path, 'hostname = "mx.example.org"\n')
    assert error_for(path) == (
        f"config error: {path}: hostname: unknown section; did you mean hostname under [server]?"
    )


def test_unknown_key_suggests_close_match(tmp_path):
    path = write(tmp_path, "[limits]\nmesage_size = 5\n")
    assert error_for(path) == (
        f"config error: {path}: limits.mesage_size: unknown key; did you mean limits.message_size?"
    )


def test_unknown_key_suggests_the_section_it_belongs_to(tmp_path):
    path = write(tmp_path, '[server]\nsmtp = "tcp:25"\n')
    assert error_for(path) == (
        f"config error: {path}: server.smtp: unknown key; "
        "did you mean listeners.smtp (under [listeners])?"
    )


def test_unknown_key_without_close_match_lists_keys(tmp_path):
    path = write(tmp_path, "[durability]\nzzz = 1\n")
    assert error_for(path) == (
        f"config error: {path}: durability.zzz: unknown key; [durability] has fsync"
    )


def test_wrong_type(tmp_path):
    path = write(tmp_path, '[limits]\nrecipients = "10"\n')
    assert error_for(path) == (
        f"config error: {path}: limits.recipients: "
        "expected an integer (written without quotes), got '10'"
    )


def test_wrong_type_boolean(tmp_path):
    path = write(tmp_path, '[durability]\nfsync = "no"\n')
    assert error_for(path) == (
        f"config error: {path}: durability.fsync: expected true or false, got 'no'"
    )


def test_wrong_type_for_integer(tmp_path):
    path = write(tmp_path, "[limits]\nrecipients = true\n")
    assert error_for(path) == (
        f"config error: {path}: limits.recipients: expected an integer, got true (a boolean)"
    )


def test_not_a_table(tmp_path):
    path = write(tmp_path, "limits = 5\n")
    assert error_for(path) == (
        f"config error: {path}: limits: expected a table ([limits]), got 5 (an integer)"
    )


def test_bad_server_endpoint_in_file(tmp_path):
    path = write(tmp_path, '[listeners]\nsmtp = "tcp:25x"\n')
    message = error_for(path)
    assert message.startswith(
        f"config error: {path}: listeners.smtp: expected a server endpoint description "
        "such as tcp:2525:interface=127.0.0.1, or none, got 'tcp:25x' ("
    )


def test_bad_server_endpoint_option():
    message = error_for(None, (Override("--mtqp", "listeners.mtqp", "tcp:port=x"),))
    assert message.startswith("config error: --mtqp: expected a server endpoint description")


def test_listener_true_is_not_an_endpoint(tmp_path):
    path = write(tmp_path, "[listeners]\nsubmission = true\n")
    assert error_for(path).endswith(
        "listeners.submission: expected a server endpoint "
        "description such as tcp:2525:interface=127.0.0.1, or none, "
        "got true (a boolean)"
    )


def test_two_listeners_on_one_endpoint(tmp_path):
    path = write(tmp_path, '[listeners]\nsmtp = "tcp:2424:interface=127.0.0.1"\n')
    assert error_for(path) == (
        f"config error: {path}: listeners.smtp: same endpoint as listeners.lmtp "
        "('tcp:2424:interface=127.0.0.1')"
    )


def test_two_listeners_on_one_endpoint_both_set(tmp_path):
    path = write(tmp_path, '[listeners]\nsmtp = "tcp:25"\nsubmission = "tcp:25"\n')
    assert error_for(path) == (
        f"config error: {path}: listeners.submission: same endpoint as listeners.smtp ('tcp:25')"
    )


def test_option_listener_clashing_with_a_default():
    overrides = (Override("--smtp", "listeners.smtp", "tcp:1038:interface=127.0.0.1"),)
    assert error_for(None, overrides) == (
        "config error: --smtp: same endpoint as listeners.mtqp ('tcp:1038:interface=127.0.0.1')"
    )


def test_bad_duration(tmp_path):
    path = write(tmp_path, '[limits]\nidle_timeout = "9x"\n')
    assert error_for(path) == (
        f"config error: {path}: limits.idle_timeout: "
        "expected a duration such as 90s, 5m, 1h30m or 9d, got '9x'"
    )


def test_infinite_duration(tmp_path):
    path = write(tmp_path, "[queue]\nmax_lifetime = inf\n")
    assert error_for(path) == (
        f"config error: {path}: queue.max_lifetime: expected a finite duration, got inf (a float)"
    )


def test_overflowing_durations(tmp_path):
    # 400 nines: an integer too large for a float, and a string that reads as infinity.
    nines = "9" * 400
    path = write(tmp_path, f"[queue]\nmax_lifetime = {nines}\n")
    assert error_for(path) == (
        f"config error: {path}: queue.max_lifetime: must be at most 36500d, got {nines[:40]}..."
        " (an integer)"
    )
    path = write(tmp_path, f'[queue]\nmax_lifetime = "{nines}w"\n')
    assert error_for(path) == (
        f"config error: {path}: queue.max_lifetime: must be at most 36500d, got '{nines[:40]}...'"
    )


def test_too_long_duration(tmp_path):
    path = write(tmp_path, "[limits]\nidle_timeout = 1e300\n")
    assert error_for(path) == (
        f"config error: {path}: limits.idle_timeout: must be at most 36500d, got 1e+300 (a float)"
    )
    assert load_config(write(tmp_path, '[queue]\nmax_lifetime = "36500d"\n'), fqdn=fqdn)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            f"[limits]\nrecipients = {10**30}",
            f"limits.recipients: must be at most {2**63 - 1}, got {10**30}",
        ),
        (
            f'[limits]\nmessage_size = "{10**30}T"',
            f"limits.message_size: must be at most {2**63 - 1}, got '{10**30}T'",
        ),
        (
            f"[limits]\nmin_free_space = {-(10**30)}",
            f"limits.min_free_space: must not be negative, got {-(10**30)}",
        ),
        ("[delivery]\nsmtp_port = 65536", "delivery.smtp_port: must be at most 65535, got 65536"),
        (
            "[limits]\nmessage_size = nan",
            "limits.message_size: expected a size such as 10M, got nan (a float)",
        ),
        (
            "[queue]\nfirst_retry = nan",
            "queue.first_retry: expected a finite duration, got nan (a float)",
        ),
    ],
)
def test_huge_and_not_a_number_values(tmp_path, line, message):
    path = write(tmp_path, line + "\n")
    assert error_for(path) == f"config error: {path}: {message}"


def test_bad_size(tmp_path):
    path = write(tmp_path, '[limits]\nmin_free_space = "1.5G"\n')
    assert error_for(path) == (
        f"config error: {path}: limits.min_free_space: expected a size such as 10M, got '1.5G'"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[limits]\nmessage_size = 0", "limits.message_size: must be greater than zero, got 0"),
        ("[limits]\nmin_free_space = -1", "limits.min_free_space: must not be negative, got -1"),
        ("[limits]\nrecipients = 0", "limits.recipients: must be greater than zero, got 0"),
        (
            "[limits]\nmax_connections = -3",
            "limits.max_connections: must be greater than zero, got -3",
        ),
        ("[limits]\ncommand_line = 100", "limits.command_line: must be at least 512, got 100"),
        (
            "[limits]\nlocal_part_length = 63",
            "limits.local_part_length: must be at least 64, got 63",
        ),
        ("[limits]\ndomain_length = 254", "limits.domain_length: must be at least 255, got 254"),
        ("[limits]\npath_length = 255", "limits.path_length: must be at least 256, got 255"),
        ("[limits]\nhelo_length = 64", "limits.helo_length: must be at least 255, got 64"),
        ('[limits]\nidle_timeout = "0s"', "limits.idle_timeout: must be greater than zero, got 0s"),
        ("[queue]\nfirst_retry = -5", "queue.first_retry: must be greater than zero, got -5s"),
    ],
)
def test_negative_or_zero(tmp_path, line, message):
    path = write(tmp_path, line + "\n")
    assert error_for(path) == f"config error: {path}: {message}"


def test_per_ip_limit_above_total(tmp_path):
    path = write(tmp_path, "[limits]\nmax_connections = 10\nmax_connections_per_ip = 11\n")
    assert error_for(path) == (
        f"config error: {path}: limits.max_connections_per_ip: "
        "must not exceed limits.max_connections (10), got 11"
    )


def test_first_retry_above_max_retry_interval(tmp_path):
    path = write(tmp_path, '[queue]\nfirst_retry = "2h"\n')
    assert error_for(path) == (
        f"config error: {path}: queue.first_retry: "
        "must not exceed queue.max_retry_interval (1h), got 2h"
    )


def test_bad_route_target(tmp_path):
    path = write(tmp_path, '[routes]\n"example.org" = "lmtp"\n')
    assert error_for(path) == (
        f'config error: {path}: routes."example.org": '
        "expected maildir, mx, lmtp:ENDPOINT or smtp:ENDPOINT, got 'lmtp'"
    )


def test_bad_route_client_endpoint(tmp_path):
    path = write(tmp_path, '[routes]\n"example.org" = "smtp:tcp:host=gw.example.org"\n')
    assert error_for(path).startswith(
        f'config error: {path}: routes."example.org": expected a client endpoint '
        "description such as tcp:host=127.0.0.1:port=2526 or unix:path=/run/dovecot/lmtp "
        "after smtp:, got 'tcp:host=gw.example.org' ("
    )


def test_unquoted_dotted_route_domain(tmp_path):
    path = write(tmp_path, '[routes]\nexample.org = "mx"\n')
    assert error_for(path) == (
        f"config error: {path}: routes.example: expected maildir, mx, lmtp:ENDPOINT or "
        "smtp:ENDPOINT or { target = ..., tls = ... }, got a table without 'target'; "
        'quote domain names that contain dots, as in "example.org" = "mx"'
    )


def test_route_table_with_tls_policy(tmp_path):
    path = write(
        tmp_path,
        '[routes]\n"a.example" = { target = "smtp:tcp:host=192.0.2.1:port=25", tls = "encrypt" }\n',
    )
    route = load_config(path, fqdn=lambda: "mx.example.org").route_for("a.example")
    assert (route.transport, route.endpoint, route.tls) == (
        "smtp",
        "tcp:host=192.0.2.1:port=25",
        "encrypt",
    )


def test_route_tls_policy_must_be_known(tmp_path):
    path = write(tmp_path, '[routes]\n"a.example" = { target = "mx", tls = "always" }\n')
    assert error_for(path) == (
        f'config error: {path}: routes."a.example": expected one of none, may, encrypt, verify, '
        "got 'always'"
    )


def test_route_option_with_tls_suffix():
    config = load_config(
        None,
        (Override("--route", "routes", "b.example=smtp:tcp:host=192.0.2.2:port=25;tls=none"),),
        fqdn=lambda: "mx.example.org",
    )
    assert config.route_for("b.example").tls == "none"


def test_route_option_without_equals_sign():
    assert error_for(None, (Override("--route", "routes", "example.org"),)) == (
        "config error: --route: expected DOMAIN=TARGET such as example.org=mx, got 'example.org'"
    )


def test_bad_route_option_target():
    assert error_for(None, (Override("--route", "routes", "example.org=pigeon"),)) == (
        "config error: --route: 'example.org=pigeon': "
        "expected maildir, mx, lmtp:ENDPOINT or smtp:ENDPOINT, got 'pigeon'"
    )


def test_bad_domain_name_in_local_domains(tmp_path):
    path = write(tmp_path, '[domains]\nlocal = ["example.org", "bad_name.example"]\n')
    assert error_for(path) == (
        f"config error: {path}: domains.local[1]: "
        "expected a domain name such as example.org, got 'bad_name.example'"
    )


def test_bad_domain_name_in_routes(tmp_path):
    path = write(tmp_path, '[routes]\n"-bad.example" = "mx"\n')
    assert error_for(path) == (
        f'config error: {path}: routes."-bad.example": '
        "expected a domain name such as example.org, got '-bad.example'"
    )


def test_non_ascii_domain_name():
    assert error_for(None, (Override("--local-domain", "domains.local", ("bücher.example",)),)) == (
        "config error: --local-domain: expected a domain name such as example.org "
        "(internationalised names in xn-- form), got 'bücher.example'"
    )


def test_local_domains_must_be_an_array(tmp_path):
    path = write(tmp_path, '[domains]\nlocal = "example.org"\n')
    assert error_for(path) == (
        f"config error: {path}: domains.local: expected an array of domain names, got 'example.org'"
    )


@pytest.mark.parametrize(
    ("network", "detail"),
    [
        ("192.0.2.1/24", "192.0.2.1/24 has host bits set"),
        ("300.0.0.0/8", "'300.0.0.0/8' does not appear to be an IPv4 or IPv6 network"),
    ],
)
def test_bad_trusted_network(tmp_path, network, detail):
    path = write(tmp_path, f'[relay]\ntrusted_networks = ["127.0.0.0/8", "{network}"]\n')
    assert error_for(path) == (
        f"config error: {path}: relay.trusted_networks[1]: expected an IP network such as "
        f"192.0.2.0/24 or 2001:db8::/32, got '{network}' ({detail})"
    )


def test_tls_certificate_without_key(tmp_path):
    (tmp_path / "cert.pem").write_text("cert")
    path = write(tmp_path, '[tls]\ncertificate = "cert.pem"\n')
    assert error_for(path) == (
        f"config error: {path}: tls.private_key: required when tls.certificate is set"
    )


def test_tls_key_without_certificate(tmp_path):
    (tmp_path / "key.pem").write_text("key")
    path = write(tmp_path, '[tls]\nprivate_key = "key.pem"\n')
    assert error_for(path) == (
        f"config error: {path}: tls.certificate: required when tls.private_key is set"
    )


def test_tls_missing_file(tmp_path):
    (tmp_path / "key.pem").write_text("key")
    path = write(tmp_path, '[tls]\ncertificate = "missing.pem"\nprivate_key = "key.pem"\n')
    assert error_for(path) == (
        f"config error: {path}: tls.certificate: no such file: {tmp_path / 'missing.pem'}"
    )


def test_auth_users_file_missing(tmp_path):
    path = write(tmp_path, '[auth]\nusers_file = "/nonexistent/users"\n')
    assert error_for(path) == (
        f"config error: {path}: auth.users_file: no such file: /nonexistent/users"
    )


def test_default_retention_above_max(tmp_path):
    path = write(tmp_path, '[tracking]\ndefault_retention = "40d"\n')
    assert error_for(path) == (
        f"config error: {path}: tracking.default_retention: "
        "must not exceed tracking.max_retention (30d), got 40d"
    )


def test_retention_below_one_day(tmp_path):
    path = write(tmp_path, '[tracking]\ndefault_retention = "23h"\n')
    assert error_for(path) == (
        f"config error: {path}: tracking.default_retention: must be at least 1d, got 23h"
    )


def test_toml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, '[server]\nhostname = "mx.example.org"\ndata_dir = \n')
    message = error_for(path)
    assert message.startswith(f"config error: {path}: invalid TOML: ")
    assert "line 3" in message


def test_file_not_valid_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\n# caf\xe9\nhostname = "mx.example.org"\n')
    assert error_for(path) == f"config error: {path}: line 2: not valid UTF-8"


def test_file_not_found(tmp_path):
    path = tmp_path / "missing.toml"
    assert error_for(path) == f"config error: {path}: no such file"


def test_file_is_a_directory(tmp_path):
    assert error_for(tmp_path) == f"config error: {tmp_path}: is a directory, not a file"


@pytest.mark.parametrize("hostname", ["mx", "192.0.2.1", "mx..example.org", "mx_1.example.org"])
def test_hostname_not_fqdn_shaped(tmp_path, hostname):
    path = write(tmp_path, f'[server]\nhostname = "{hostname}"\n')
    assert error_for(path) == (
        f"config error: {path}: server.hostname: "
        f"expected a fully-qualified host name such as mx.example.org, got '{hostname}'"
    )


def test_hostname_option_not_fqdn_shaped():
    assert error_for(None, (Override("--hostname", "server.hostname", "mx"),)) == (
        "config error: --hostname: "
        "expected a fully-qualified host name such as mx.example.org, got 'mx'"
    )


def test_bad_database_url(tmp_path):
    path = write(tmp_path, '[server]\ndatabase = "tracking.sqlite"\n')
    assert error_for(path) == (
        f"config error: {path}: server.database: expected an SQLAlchemy database URL such as "
        "postgresql://mtrkmta@db.example.org/mtrkmta, got 'tracking.sqlite'"
    )


def test_bad_node_id(tmp_path):
    path = write(tmp_path, '[server]\nnode_id = "mx 1"\n')
    assert error_for(path) == (
        f"config error: {path}: server.node_id: "
        "expected a node name of letters, digits, '.', '_', ':' and '-', got 'mx 1'"
    )


def test_empty_path(tmp_path):
    path = write(tmp_path, '[server]\ndata_dir = ""\n')
    assert error_for(path) == (
        f"config error: {path}: server.data_dir: expected a path, got an empty string"
    )


# ---------------------------------------------------------------------------
# check-config


def test_check_config_file_accepts_a_good_file(tmp_path):
    path = write(tmp_path, '[server]\nhostname = "mx.example.org"\n')
    assert check_config_file(path, fqdn=fqdn) is None


def test_check_config_file_returns_the_start_up_error(tmp_path):
    path = write(tmp_path, '[limits]\nmessage_size = "9x"\n')
    error = check_config_file(path, fqdn=fqdn)
    assert isinstance(error, ConfigError)
    assert str(error) == error_for(path)


# ---------------------------------------------------------------------------
# The example file and the documentation


def test_example_file_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(EXAMPLE, fqdn=lambda: "unused.example.org")
    assert config.hostname == "mx.example.org"
    assert config.node_id == "mx1"
    assert config.data_dir == Path("/var/lib/mtrkmta")
    assert config.listeners.smtp == "tcp:25"
    assert config.listeners.submission == "tcp:587"
    assert config.local_domains == ("example.org", "example.net", "localhost")
    assert config.route_for("example.net") == Route(
        "example.net", "lmtp", "unix:path=/run/dovecot/lmtp"
    )
    assert config.routes[-1] == DEFAULT_ROUTE
    assert ipaddress.ip_network("192.0.2.0/24") in config.relay.trusted_networks
    assert config.limits.message_size == 50 * MiB
    assert config.tracking.default_retention == 9 * DAY
    assert config.durability.fsync is True
    assert list(tmp_path.iterdir()) == []


def test_example_file_shows_every_section_and_key():
    text = EXAMPLE.read_text(encoding="utf-8")
    section = ""
    shown: set[str] = set()
    for line in text.splitlines():
        header = re.fullmatch(r"\[(\w+)\]", line.strip())
        if header:
            section = header.group(1)
            shown.add(section)
            continue
        key = re.match(r"#?\s*([a-z_]+)\s*=", line)
        if key and section:
            shown.add(f"{section}.{key.group(1)}")
    assert set(setting_names()) <= shown


def test_documentation_describes_exactly_the_settings():
    documented = re.findall(r"^\.\. describe:: ([a-z_]+(?:\.[a-z_]+)?)", DOC.read_text(), re.M)
    assert sorted(documented) == sorted(setting_names())


def test_local_section(tmp_path):
    aliases = tmp_path / "aliases.toml"
    aliases.write_text("")
    path = write(
        tmp_path,
        f'[local]\naliases = "{aliases}"\nrecipient_delimiter = "-"\n'
        'mailbox = "{domain}/{local}"\nusers = ["Alice", "bob"]\n',
    )
    local = load_config(path, fqdn=lambda: "mx.example.org").local
    assert (local.aliases, local.recipient_delimiter, local.mailbox, local.users) == (
        aliases,
        "-",
        "{domain}/{local}",
        ("alice", "bob"),
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('mailbox = "/var/{local}"', "expected a relative path containing {local}"),
        ('mailbox = "{user}"', "only {local} and {domain} may be used"),
        ('mailbox = "{local.foo}{local}"', "only {local} and {domain} may be used"),
        ('mailbox = "{local[0]}/{local}"', "only {local} and {domain} may be used"),
        ('mailbox = "{domain.__class__}/{local}"', "only {local} and {domain} may be used"),
        ('mailbox = "{local:d}"', "only {local} and {domain} may be used"),
        ('mailbox = "{}{local}"', "only {local} and {domain} may be used"),
        ('recipient_delimiter = "++"', "expected one character"),
        ("users = [1]", "expected a list of user names"),
    ],
)
def test_local_section_mistakes(tmp_path, line, problem):
    path = write(tmp_path, f"[local]\n{line}\n")
    assert problem in error_for(path)


def test_unusable_paths_are_one_line_errors(tmp_path):
    path = write(tmp_path, '[server]\ndata_dir = "~no-such-user-here/data"\n')
    assert error_for(path) == (
        f"config error: {path}: server.data_dir: expected a path, got '~no-such-user-here/data'"
    )
    path = write(tmp_path, f'[tls]\ncertificate = "{"0" * 300}"\n')
    assert error_for(path) == (
        f"config error: {path}: tls.certificate: "
        f"cannot use {tmp_path / ('0' * 300)}: File name too long"
    )


def test_mailbox_attribute_access_is_one_line_error(tmp_path):
    path = write(tmp_path, '[local]\nmailbox = "{local.foo}{local}"\n')
    assert error_for(path) == (
        f"config error: {path}: local.mailbox: only {{local}} and {{domain}} may be used, "
        "got '{local.foo}{local}'"
    )


# ---------------------------------------------------------------------------
# Any value in any key: a ConfigError or a configuration, never another exception


def _toml_value(value: object) -> str:
    """``value`` written as TOML (the strategies below only make what TOML can hold)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    assert isinstance(value, datetime.date | datetime.time)
    return value.isoformat()


_SCALARS = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),
    st.text(),
    st.sampled_from(
        [
            "9" * 400,
            "9" * 400 + "d",
            "{local.foo}{local}",
            "{local[0]}",
            "{domain!r}/{local}",
            "1e999",
            "none",
            "~nobody-here/x",
            "\x00",
            "tcp:99999",
            "99999999999T",
            "mx",
            "lmtp:",
            "0" * 300,
            "~no-such-user-here/file",
        ]
    ),
    st.dates(),
    st.datetimes(),
    st.times(),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@given(key=st.sampled_from(setting_names()), value=_VALUES)
@settings(max_examples=400, deadline=None)
def test_any_value_in_any_key_is_a_config_error_at_worst(tmp_path_factory, key, value):
    section, _, name = key.partition(".")
    document = f"[{section}]\n{json.dumps(name)} = {_toml_value(value)}\n" if name else ""
    if not name:  # a whole-table key such as routes
        if isinstance(value, dict):
            document = f"{section} = {_toml_value(value)}\n"
        else:
            document = f'[{section}]\n"*" = {_toml_value(value)}\n'
    path = tmp_path_factory.mktemp("any") / "mtrkmta.toml"
    path.write_text(document, encoding="utf-8")
    try:
        load_config(path, fqdn=fqdn)
    except ConfigError as error:
        assert "\n" not in str(error)
