"""Fixtures of the interop tests: the programs they need, the lab directory, logs on failure.

Every test here is marked ``interop``. A missing program fails the test with the
line that installs it (never a skip: ``tools/bootstrap.sh test`` installs them).
When a test fails, the ends of the logs of everything it ran (Dovecot, Postfix,
smtp-sink, the mtrkmta node) are added to its report.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from interop_lab import Lab, require_programs

HERE = Path(__file__).resolve().parent
LAB = pytest.StashKey[Lab]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.interop)


@pytest.fixture
def lab(request: pytest.FixtureRequest, reaper: object) -> Iterator[Lab]:
    """A fresh lab directory; its daemons are stopped and it is removed afterwards."""
    require_programs()
    workspace = Lab(reaper)
    request.node.stash[LAB] = workspace
    try:
        yield workspace
    finally:
        workspace.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    workspace = item.stash.get(LAB, None)
    if workspace is None or not report.failed:
        return
    for name in workspace.logs:
        report.sections.append((f"{name} log, last lines", workspace.log_tail(name)))
