"""The interop fixtures themselves: install hints, configuration snippets, templates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from interop_lab import HERE, INSTALL_LINE, PACKAGES, POSTFIX_PRESEED, mtrkmta_options, program

from mtrkmta.config import Route
from mtrkmta.testing import node_config

BOOTSTRAP = HERE.parent.parent / "tools" / "bootstrap.sh"


def bootstrap_value(name: str) -> str:
    match = re.search(rf"^{name}=(.*)$", BOOTSTRAP.read_text(), re.MULTILINE)
    assert match is not None, f"{name} not set in {BOOTSTRAP}"
    return match.group(1)


def test_bootstrap_installs_what_the_interop_tests_need():
    test_packages = bootstrap_value("TEST_PACKAGES").strip("()").split()
    assert set(PACKAGES) <= set(test_packages)
    assert bootstrap_value("POSTFIX_PRESEED") == f'"{POSTFIX_PRESEED}"'


def test_a_missing_program_fails_with_the_install_line():
    with pytest.raises(pytest.fail.Exception) as failed:
        program("mtrkmta-no-such-program")
    assert INSTALL_LINE in str(failed.value)
    assert (
        "apt-get install -y --no-install-recommends dovecot-core dovecot-lmtpd postfix swaks"
        in (INSTALL_LINE)
    )


@pytest.mark.parametrize("snippet", sorted(p.name for p in (HERE / "mtrkmta").glob("*.toml")))
def test_mtrkmta_snippets_are_valid_configuration(snippet: str, tmp_path: Path):
    values = {"DOVECOT_LMTP_PORT": 24, "POSTFIX_SMTP_PORT": 25, "SINK_PORT": 26}
    config = node_config(tmp_path / "data", options=mtrkmta_options(snippet, **values))
    routed = {route.domain: route for route in config.routes}
    expected = {
        "to-dovecot.toml": (
            "example.test",
            Route("example.test", "lmtp", "tcp:host=127.0.0.1:port=24"),
        ),
        "to-postfix.toml": (
            "relay.test",
            Route("relay.test", "smtp", "tcp:host=127.0.0.1:port=25"),
        ),
        "to-sink.toml": ("sink.test", Route("sink.test", "smtp", "tcp:host=127.0.0.1:port=26")),
    }
    if snippet in expected:
        domain, route = expected[snippet]
        assert routed[domain] == route
    else:
        assert snippet == "from-postfix.toml"
        assert config.local_domains == ("example.test", "localhost")


def test_unfilled_placeholders_are_refused():
    with pytest.raises(AssertionError, match="no value for DOVECOT_LMTP_PORT"):
        mtrkmta_options("to-dovecot.toml")
