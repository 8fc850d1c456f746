"""The manual pages (doc/man/, built by the docs tox env) list what the commands accept."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from twisted.python import usage

from mtrkmta.cli.main import COMMANDS
from mtrkmta.cli.options import ServeOptions
from mtrkmta.cli.queue import QueueOptions
from mtrkmta.cli.send import SendOptions
from mtrkmta.cli.sendmail import OPTIONS as SENDMAIL_LETTERS
from mtrkmta.cli.track import TrackOptions

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "doc" / "man"


def man_pages() -> list[tuple[str, str, str, list[str], int]]:
    """``man_pages`` of doc/conf.py, as Sphinx reads it."""
    namespace: dict[str, object] = {}
    exec((ROOT / "doc" / "conf.py").read_text(encoding="utf-8"), namespace)
    return namespace["man_pages"]  # type: ignore[return-value]


def documented_options(page: str) -> set[str]:
    """Every option named by an ``.. option::`` directive of ``doc/man/PAGE.rst``."""
    text = (MAN / f"{page}.rst").read_text(encoding="utf-8")
    names: set[str] = set()
    for line in re.findall(r"^\.\. option:: (.+)$", text, re.M):
        names.update(part.split()[0] for part in line.split(", "))
    return names


def parser_options(options: usage.Options) -> set[str]:
    """The options a twisted.python.usage parser accepts, as ``--long`` and ``-s``."""
    return {f"--{name.rstrip('=')}" for name in options.longOpt} | {
        f"-{letter}" for letter in options.shortOpt.replace(":", "")
    }


@pytest.mark.parametrize(
    ("page", "options"),
    [
        ("mtrkmta", ServeOptions),
        ("mtrkmta-queue", QueueOptions),
        ("mtrkmta-send", SendOptions),
        ("mtrkmta-track", TrackOptions),
    ],
)
def test_a_page_lists_exactly_the_options_of_its_command(page, options):
    assert documented_options(page) == parser_options(options())


def test_the_sendmail_page_lists_every_option_letter_sendmail_accepts():
    letters = {option[1] for option in documented_options("sendmail")}
    assert letters == set(SENDMAIL_LETTERS.replace(":", ""))


def test_the_sendmail_page_documents_each_mode_of_b():
    documented = documented_options("sendmail")
    assert {"-bm", "-bs", "-bp", "-bi"} <= documented


def test_every_mtrkmta_command_is_on_the_mtrkmta_page():
    text = (MAN / "mtrkmta.rst").read_text(encoding="utf-8")
    named = set(re.findall(r"^\*\*([a-z-]+)", text, re.M))
    assert named >= set(COMMANDS)


def test_every_installed_command_has_a_page():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    pages = {name for _, name, _, _, _ in man_pages()}
    synopsis = (MAN / "sendmail.rst").read_text(encoding="utf-8")
    for script in scripts:
        # mailq and newaliases are sendmail -bp and -bi, on sendmail's page.
        assert script in pages or f"| **{script}**" in synopsis, script


def test_every_page_source_is_built_as_a_manual_page():
    sources = {source for source, *_ in man_pages()}
    pages = {f"man/{path.stem}" for path in MAN.glob("*.rst") if path.stem != "index"}
    assert pages <= sources
    assert "configuration" in sources  # mtrkmta.toml(5)
