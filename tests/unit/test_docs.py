"""The documentation keeps up with the code: settings, options, replies and the page index."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtrkmta.cli.options import ServeOptions
from mtrkmta.config import setting_names
from mtrkmta.receive.policy import RELAY_DENIED
from mtrkmta.receive.receiver import DISK_FULL
from mtrkmta.smtp.command import LINE_TOO_LONG
from mtrkmta.smtp.reply import Reply

DOC = Path(__file__).resolve().parents[2] / "doc"


def read(name: str) -> str:
    return (DOC / name).read_text(encoding="utf-8")


def flat(text: str) -> str:
    """Text with every run of blanks and line breaks made one space (rst wraps lines)."""
    return " ".join(text.split())


def long_options() -> list[str]:
    """The long options of ``twistd mtrkmta`` and ``mtrkmta serve``, without twistd's own."""
    options = ServeOptions()
    options.parseOptions([])  # fills longOpt
    return sorted(o.rstrip("=") for o in options.longOpt if o not in ("help", "version"))


def test_toctree_lists_every_page_and_every_page_exists():
    index = read("index.rst")
    toctree = index.split(".. toctree::", 1)[1]
    entries = re.findall(r"^ {3}(\w+)$", toctree, re.M)
    assert {"running", "configuration", "architecture", "development"} <= set(entries)
    pages = {p.stem for p in DOC.glob("*.rst") if p.stem != "index"}
    assert pages == set(entries)


@pytest.mark.parametrize("setting", setting_names())
def test_every_setting_is_described_in_configuration_rst(setting):
    directive = 'routes."DOMAIN"' if setting == "routes" else setting
    assert f".. describe:: {directive}\n" in read("configuration.rst")


@pytest.mark.parametrize("setting", setting_names())
def test_every_setting_appears_in_the_example_file(setting):
    section, _, key = setting.partition(".")
    example = (DOC.parent / "mtrkmta" / "config" / "example.toml").read_text(encoding="utf-8")
    assert f"\n[{section}]\n" in example
    if key:
        body = example.split(f"\n[{section}]\n", 1)[1].split("\n[", 1)[0]
        assert re.search(rf"^(# )?{key} = ", body, re.M), f"{setting} missing from the example"


def test_serve_options_are_known():
    assert long_options() == [
        "config",
        "data-dir",
        "database",
        "debug",
        "hostname",
        "http",
        "lmtp",
        "local-domain",
        "log-format",
        "mtqp",
        "prefix",
        "route",
        "smtp",
        "submission",
        "syslog",
        "workers",
    ]


@pytest.mark.parametrize("page", ["configuration.rst", "running.rst"])
@pytest.mark.parametrize("option", long_options())
def test_every_option_is_documented(page, option):
    assert f"``--{option}" in read(page)


def _wording(reply: Reply) -> str:
    return f"{reply.code} {reply.enhanced} {reply.lines[0]}"


@pytest.mark.parametrize("reply", [DISK_FULL, RELAY_DENIED, LINE_TOO_LONG], ids=_wording)
def test_running_rst_quotes_the_replies_as_sent(reply):
    assert _wording(reply) in flat(read("running.rst"))


def test_running_rst_gives_the_default_listeners():
    from mtrkmta.config import Listeners

    text = read("running.rst")
    for endpoint in (Listeners().smtp, Listeners().lmtp, Listeners().mtqp):
        assert f"``{endpoint}``" in text
