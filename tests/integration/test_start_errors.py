"""A failed start of `mtrkmta serve` is one line on stderr naming the setting and the fix.

Each test runs the server as a real process and reads what it printed; the
traceback of an unexpected failure appears only with ``--debug``.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from mtrkmtaprocess import run_mtrkmta

QUIET = ["--smtp", "none", "--lmtp", "none", "--mtqp", "none", "--http", "none"]


def serve(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``mtrkmta serve ARGS`` as a process; returns once it has exited."""
    return run_mtrkmta(["serve", *args], cwd)


def one_line(run: subprocess.CompletedProcess[str]) -> str:
    """The single line ``run`` printed on stderr (asserting it failed with status 1)."""
    assert run.returncode == 1, (run.stdout, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    return lines[0]


@pytest.mark.parametrize("listener", ["smtp", "http"])
def test_port_in_use_names_the_listener_and_its_key(tmp_path: Path, listener: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = serve(
            [
                "--data-dir",
                str(tmp_path / "data"),
                *QUIET,
                f"--{listener}",
                f"tcp:{port}:interface=127.0.0.1",
            ],
            tmp_path,
        )
    line = one_line(run)
    assert line.startswith(
        f"mtrkmta: cannot listen for {listener} on 127.0.0.1:{port} (listeners.{listener}"
    )
    assert line.endswith("address already in use; stop the other server or choose another port")


def test_an_empty_admin_token_file_is_one_line_naming_it(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("\n")
    token.chmod(0o600)
    config = tmp_path / "mtrkmta.toml"
    config.write_text(f'[http]\nadmin_token_file = "{token}"\n')
    args = ["--config", str(config), "--data-dir", str(tmp_path / "data"), *QUIET]
    line = one_line(serve([*args, "--http", "tcp:0:interface=127.0.0.1"], tmp_path))
    assert line == (
        f"mtrkmta: the admin token file {token} (http.admin_token_file) is empty; "
        "write a long random token into it (e.g. openssl rand -hex 32)"
    )


def test_data_dir_under_a_file_names_the_path_and_the_user(tmp_path: Path) -> None:
    # The tests run as root, whom a mode 0500 directory does not stop; a data
    # directory under a regular file is refused for everyone (ENOTDIR).
    (tmp_path / "file").write_text("")
    data_dir = tmp_path / "file" / "data"
    line = one_line(serve(["--data-dir", str(data_dir), *QUIET], tmp_path))
    assert line.startswith(f"mtrkmta: cannot use the data directory {data_dir} (server.data_dir)")
    assert "Not a directory" in line
    assert "the server runs as user " in line


def unreachable_database(tmp_path: Path) -> list[str]:
    # Port 1 is privileged and nothing listens there: the connection is refused.
    return [
        "--data-dir",
        str(tmp_path / "data"),
        *QUIET,
        "--database",
        "postgresql://mtrkmta@127.0.0.1:1/mtrkmta",
    ]


def test_other_failure_is_one_line_without_traceback(tmp_path: Path) -> None:
    line = one_line(serve(unreachable_database(tmp_path), tmp_path))
    assert line.startswith("mtrkmta: could not start: ")
    assert "Connection refused" in line


def test_debug_adds_the_traceback_to_the_log(tmp_path: Path) -> None:
    run = serve([*unreachable_database(tmp_path), "--debug"], tmp_path)
    assert run.returncode == 1
    assert run.stderr.splitlines()[0].startswith("mtrkmta: could not start: ")
    assert "Traceback" in run.stdout


# -- the permission case: root is not stopped by modes, so the mapping is tested directly --


def test_permission_denied_on_the_data_dir_names_path_and_user(tmp_path: Path) -> None:
    from mtrkmta.service import storage_error

    denied = PermissionError(13, "Permission denied", str(tmp_path / "data" / "spool"))
    error = storage_error(denied, tmp_path / "data", "sqlite:///x")
    assert error is not None
    line = str(error)
    assert line.startswith(f"cannot use the data directory {tmp_path / 'data'} (server.data_dir)")
    assert f"{tmp_path / 'data' / 'spool'}: Permission denied" in line
    assert "the server runs as user " in line
    assert "\n" not in line


def test_unopenable_sqlite_file_names_the_database(tmp_path: Path) -> None:
    import sqlite3

    from mtrkmta.service import storage_error

    url = f"sqlite:///{tmp_path}/no/such/dir/tracking.sqlite"
    try:
        sqlite3.connect(f"{tmp_path}/no/such/dir/tracking.sqlite")
    except sqlite3.OperationalError as real:
        error = storage_error(real, tmp_path, url)
    assert error is not None
    assert str(error).startswith(f"cannot open the tracking database {url} (server.database)")
