"""Integration-test hooks: the fault-injection suite lists the points it covered; the
``log_file`` and ``log_lines`` fixtures; a test CA (``ca``) and a TLS smarthost node
(``smarthost``) for the verified-relay tests."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from certs import TestCA
from test_relay_auth_verify import Smarthost
from twisted.logger import formatEvent, globalLogPublisher

from mtrkmta.logfile import text_observer

COVERED = re.compile(
    r"test_fault_injection\.py::test_(crash_at|crash_at_lmtp_next_hop|streamed_message_at|failed_write_at)\[(.+)\]$"
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """After a run of tests/integration/test_fault_injection.py: each point and outcome."""
    rows = []
    for outcome in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            match = COVERED.search(getattr(report, "nodeid", ""))
            if match is not None and report.when == "call":
                kind = {
                    "crash_at": "crash",
                    "crash_at_lmtp_next_hop": "crash, LMTP next hop",
                    "streamed_message_at": "streamed message",
                }
                rows.append(
                    f"{match.group(2)} ({kind.get(match.group(1), 'failed write')}): {outcome}"
                )
    if rows:
        terminalreporter.write_sep("-", f"fault injection: {len(rows)} cases")
        for row in rows:
            terminalreporter.write_line(row)


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    """Everything logged during the test, as `mtrkmta serve` writes it, in a file."""
    path = tmp_path / "mtrkmta.log"
    with path.open("w", encoding="utf-8") as out:
        observer = text_observer(out)
        globalLogPublisher.addObserver(observer)
        try:
            yield path
        finally:
            globalLogPublisher.removeObserver(observer)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every log event of the test, formatted, as it happens (for waiting on a line)."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest.fixture
def ca() -> TestCA:
    """A test certificate authority: the certificates it issues, and its PEM to trust."""
    return TestCA()


@pytest_twisted.async_yield_fixture
async def smarthost(tmp_path: Path, ca: TestCA) -> AsyncIterator[Smarthost]:
    """A second node offering STARTTLS with a certificate from ``ca``; stopped after."""
    host = Smarthost(tmp_path / "smarthost", ca)
    yield host
    await host.stop()
