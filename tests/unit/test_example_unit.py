"""`mtrkmta example-unit`: the systemd unit shipped in the package, shown in doc/running.rst."""

from __future__ import annotations

import io
from pathlib import Path

from mtrkmta.cli.examples import unit, unit_main
from mtrkmta.cli.main import main

RUNNING = Path(__file__).resolve().parents[2] / "doc" / "running.rst"


def directives(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#")
    return {key: value for key, value in pairs}


def test_example_unit_prints_the_packaged_unit(capsys) -> None:
    assert main(["example-unit"]) == 0
    assert capsys.readouterr().out == unit()
    # The guide shows the same file, not a copy of it.
    assert ".. literalinclude:: ../mtrkmta/config/mtrkmta.service" in RUNNING.read_text("utf-8")


def test_the_unit_is_a_notify_service_that_reloads_on_sighup_and_binds_port_25() -> None:
    found = directives(unit())
    assert found["Type"] == "notify"
    assert found["ExecStart"] == "/usr/local/bin/mtrkmta serve --config /etc/mtrkmta/mtrkmta.toml"
    assert found["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert found["WatchdogSec"] and found["Restart"] == "on-failure"
    assert (found["User"], found["StateDirectory"]) == ("mtrkmta", "mtrkmta")
    assert found["AmbientCapabilities"] == found["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert found["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert found["ReadWritePaths"] == "/var/lib/mtrkmta"
    for hardening in (
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
    ):
        key, value = hardening.split("=")
        assert found[key] == value


def test_usage_errors_and_help_follow_the_conventions() -> None:
    out = io.StringIO()
    assert unit_main(["--help"], out) == 0
    assert unit_main(["surplus"], out) == 2
