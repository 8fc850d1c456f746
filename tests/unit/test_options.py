"""Tests for mtrkmta.cli.options.ServeOptions: parsing and turning options into a Config."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from mtrkmta.cli.options import ServeOptions
from mtrkmta.config import DEFAULT_ROUTE, ConfigError, Override, Route, load_config


def fqdn() -> str:
    return "mx.example.org"


def parse(*args: str) -> ServeOptions:
    options = ServeOptions()
    options.parseOptions(list(args))
    return options


def test_no_options_give_the_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse().load_config(fqdn=fqdn)
    assert config == load_config(fqdn=fqdn)
    assert config.listeners.smtp == "tcp:2525:interface=127.0.0.1"
    assert config.data_dir == tmp_path / "mtrkmta-data"
    assert list(tmp_path.iterdir()) == []


def test_each_option_overrides_its_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = parse(
        "--data-dir",
        "data",
        "--hostname",
        "mail.example.net",
        "--smtp",
        "tcp:25",
        "--submission",
        "tcp:587",
        "--lmtp",
        "none",
        "--mtqp",
        "unix:/run/mtqp.sock",
        "--database",
        "postgresql://db.example.net/mtrkmta",
        "--local-domain",
        "Example.NET",
        "--route",
        "example.net=maildir",
    )
    config = options.load_config(fqdn=fqdn)
    assert config.data_dir == tmp_path / "data"
    assert config.hostname == "mail.example.net"
    assert config.listeners.smtp == "tcp:25"
    assert config.listeners.submission == "tcp:587"
    assert config.listeners.lmtp is None
    assert config.listeners.mtqp == "unix:/run/mtqp.sock"
    assert config.database == "postgresql://db.example.net/mtrkmta"
    assert config.local_domains == ("example.net",)
    assert config.routes == (Route("example.net", "maildir"), DEFAULT_ROUTE)


def test_overrides_name_their_option():
    options = parse(
        "--smtp", "tcp:25", "--local-domain", "a.example", "--local-domain", "b.example"
    )
    assert options.overrides() == (
        Override("--smtp", "listeners.smtp", "tcp:25"),
        Override("--local-domain", "domains.local", ("a.example", "b.example")),
    )


def test_options_win_over_the_config_file(tmp_path):
    path = tmp_path / "mtrkmta.toml"
    path.write_text(
        '[server]\nhostname = "file.example.org"\n'
        '[listeners]\nsmtp = "tcp:25"\nsubmission = "tcp:587"\n'
        '[domains]\nlocal = ["a.example", "b.example"]\n'
        '[routes]\n"a.example" = "lmtp:tcp:host=127.0.0.1:port=24"\n"*" = "mx"\n'
    )
    options = parse(
        "--config",
        str(path),
        "--submission",
        "none",
        "--local-domain",
        "c.example",
        "--local-domain",
        "d.example",
        "--route",
        "*=smtp:tcp:host=relay.example.org:port=25",
        "--route",
        "c.example=lmtp:unix:path=/run/dovecot/lmtp",
    )
    config = options.load_config(fqdn=fqdn)
    assert config.hostname == "file.example.org"
    assert config.listeners.smtp == "tcp:25"
    assert config.listeners.submission is None
    assert config.local_domains == ("c.example", "d.example")
    assert config.routes == (
        Route("a.example", "lmtp", "tcp:host=127.0.0.1:port=24"),
        Route("c.example", "lmtp", "unix:path=/run/dovecot/lmtp"),
        Route("*", "smtp", "tcp:host=relay.example.org:port=25"),
    )


def test_relative_config_path(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mtrkmta.toml").write_text('[server]\ndata_dir = "../var"\n')
    monkeypatch.chdir(tmp_path)
    config = parse("--config", "etc/mtrkmta.toml", "--hostname", "mx.example.org").load_config()
    assert config.data_dir == tmp_path / "var"


def test_route_without_equals_sign():
    with pytest.raises(ConfigError) as info:
        parse("--route", "example.org").load_config(fqdn=fqdn)
    assert str(info.value) == (
        "config error: --route: expected DOMAIN=TARGET such as example.org=mx, got 'example.org'"
    )


def test_bad_endpoint_option():
    with pytest.raises(ConfigError) as info:
        parse("--lmtp", "tcp:twentyfour").load_config(fqdn=fqdn)
    assert str(info.value).startswith(
        "config error: --lmtp: expected a server endpoint description such as "
        "tcp:2525:interface=127.0.0.1, or none, got 'tcp:twentyfour' ("
    )


def test_bad_hostname_option():
    with pytest.raises(ConfigError) as info:
        parse("--hostname", "mx").load_config(fqdn=fqdn)
    assert str(info.value) == (
        "config error: --hostname: "
        "expected a fully-qualified host name such as mx.example.org, got 'mx'"
    )


def test_missing_config_file(tmp_path):
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        parse("--config", str(path)).load_config(fqdn=fqdn)
    assert str(info.value) == f"config error: {path}: no such file"


def test_the_file_error_comes_before_option_errors(tmp_path):
    path = tmp_path / "mtrkmta.toml"
    path.write_text('[limits]\nmessage_size = "9x"\n')
    with pytest.raises(ConfigError) as info:
        parse("--config", str(path), "--smtp", "tcp:x").load_config(fqdn=fqdn)
    assert str(info.value).startswith(f"config error: {path}: limits.message_size:")


@pytest.mark.parametrize(
    "args",
    [["--no-such-option"], ["--route"], ["--smtp"], ["positional"]],
)
def test_usage_errors(args):
    with pytest.raises(usage.UsageError):
        parse(*args)


def test_instances_do_not_share_repeatable_options():
    first = parse("--local-domain", "a.example", "--route", "a.example=mx")
    second = parse()
    assert first["local-domain"] == ["a.example"]
    assert second["local-domain"] == []
    assert second["route"] == []
    assert second.overrides() == ()


def test_help_lists_every_option():
    text = str(ServeOptions())
    for option in (
        "--config",
        "--data-dir",
        "--hostname",
        "--smtp",
        "--submission",
        "--lmtp",
        "--mtqp",
        "--local-domain",
        "--route",
        "--database",
    ):
        assert option + "=" in text


def test_config_path_is_kept_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("m.toml").write_text("[limit]\n")
    with pytest.raises(ConfigError) as info:
        parse("--config", "m.toml").load_config(fqdn=fqdn)
    assert str(info.value) == "config error: m.toml: limit: unknown section; did you mean [limits]?"
