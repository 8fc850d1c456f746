"""Run the `mtrkmta` command of this checkout as a real process, for the tests that need one."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import mtrkmta

IMPORT_ROOT = str(Path(mtrkmta.__file__).resolve().parent.parent)
RUN_TIMEOUT = 60.0


def mtrkmta_env() -> dict[str, str]:
    """The environment of a child process that imports the mtrkmta these tests import."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (IMPORT_ROOT, os.environ.get("PYTHONPATH")) if p),
    }


def run_mtrkmta(
    args: Sequence[str], cwd: Path, *, merge_stderr: bool = False
) -> subprocess.CompletedProcess[str]:
    """``mtrkmta ARGS`` in ``cwd``; returns once it has exited. With ``merge_stderr``
    its standard error comes in ``stdout`` too."""
    return subprocess.run(
        [sys.executable, "-m", "mtrkmta.cli.main", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        timeout=RUN_TIMEOUT,
        env=mtrkmta_env(),
    )
