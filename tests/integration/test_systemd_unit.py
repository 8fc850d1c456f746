"""The shipped systemd unit, checked by the real systemd-analyze (verify and security)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mtrkmta.cli.examples import unit

SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
INSTALLED = "/usr/local/bin/mtrkmta serve"


def installed_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart= on this checkout's mtrkmta (systemd-analyze checks that the
    program exists), in a directory of its own: the unit's name must stay mtrkmta.service."""
    text = unit()
    assert INSTALLED in text
    path = tmp_path / "mtrkmta.service"
    path.write_text(text.replace(INSTALLED, f"{sys.executable} -m mtrkmta.cli.main serve"))
    return path


def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path: Path) -> None:
    path = installed_copy(tmp_path)
    # --man=no: the Documentation= man page is not installed here.
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_systemd_analyze_security_rates_the_unit_well_hardened(tmp_path: Path) -> None:
    path = installed_copy(tmp_path)
    # Exposure 0 (locked down) .. 100 (no hardening); 2.0 "OK" shows as 20 here.
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", "--no-pager", str(path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level for mtrkmta.service: 1." in result.stdout
