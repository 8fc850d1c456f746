"""The `mtrkmta` command as a real process: a closed pipe and Ctrl-C end it without a
traceback, and the bash completion of doc/examples completes its words in a real bash."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import pytest_twisted
from mtrkmtaprocess import RUN_TIMEOUT, mtrkmta_env
from smtpwire import in_thread

from mtrkmta.testing import node_config, start_node, stop_node

COMPLETION = Path(__file__).resolve().parents[2] / "doc" / "examples" / "mtrkmta.bash"
ENVID = "k2J9@client.example.test"
SECRET = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def into_closed_pipe(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``mtrkmta ARGS | head -1`` once head has gone: standard output is a pipe whose
    reading end is closed before the command writes, so every write fails (EPIPE)."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run(
            [sys.executable, "-m", "mtrkmta.cli.main", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=RUN_TIMEOUT,
            env=mtrkmta_env(),
        )
    finally:
        os.close(writer)


@pytest.mark.parametrize(
    "args", [["example-config"], ["show-config"], ["--help"], ["queue", "--help"]]
)
def test_a_closed_pipe_ends_a_command_without_traceback(tmp_path, args):
    done = into_closed_pipe(args, tmp_path)
    assert (done.returncode, done.stderr) == (141, "")


@pytest_twisted.ensureDeferred
async def test_queue_list_into_a_closed_pipe_ends_without_traceback(tmp_path):
    # The issue's `mtrkmta queue list | head -3`, against a running node.
    data_dir = tmp_path / "data"
    node = await start_node(node_config(data_dir, listeners=("smtp",)))
    try:
        done = await in_thread(
            into_closed_pipe, ["queue", "list", "--data-dir", str(data_dir)], tmp_path
        )
    finally:
        await stop_node(node)
    assert (done.returncode, done.stderr) == (141, "")


def test_track_into_a_closed_pipe_ends_without_traceback(tmp_path):
    # A tracking server that hangs up at once: track prints a timeline ("no answer").
    with socket.socket() as rude:
        rude.bind(("127.0.0.1", 0))
        rude.listen(1)
        rude.settimeout(RUN_TIMEOUT)
        port = rude.getsockname()[1]
        args = ["track", "--tls", "none", "--server", f"127.0.0.1:{port}", ENVID, SECRET]
        reader, writer = os.pipe()
        os.close(reader)
        with subprocess.Popen(
            [sys.executable, "-m", "mtrkmta.cli.main", *args],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            env=mtrkmta_env(),
        ) as track:
            os.close(writer)
            connection, _ = rude.accept()
            connection.close()
            _, err = track.communicate(timeout=RUN_TIMEOUT)
    assert (track.returncode, err) == (141, "")


def test_ctrl_c_while_track_waits_exits_130_without_traceback(tmp_path):
    # A tracking server that accepts the connection and never says a word.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        silent.settimeout(RUN_TIMEOUT)
        port = silent.getsockname()[1]
        args = ["track", "--tls", "none", "--server", f"127.0.0.1:{port}", ENVID, SECRET]
        with subprocess.Popen(
            [sys.executable, "-m", "mtrkmta.cli.main", *args],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=mtrkmta_env(),
        ) as track:
            connection, _ = silent.accept()  # track is connected, waiting for the greeting
            with connection:
                track.send_signal(signal.SIGINT)
                out, err = track.communicate(timeout=RUN_TIMEOUT)
    assert (track.returncode, out, err) == (130, "", "")


def test_ctrl_c_while_track_watches_exits_130_without_traceback(tmp_path):
    # --watch between two questions: the first answer ("no answer") is printed at once,
    # then it waits on the reactor's clock; Ctrl-C ends it as everywhere else.
    with socket.socket() as rude:
        rude.bind(("127.0.0.1", 0))
        rude.listen(1)
        rude.settimeout(RUN_TIMEOUT)
        port = rude.getsockname()[1]
        args = ["track", "--tls", "none", "--watch", "--server", f"127.0.0.1:{port}", ENVID]
        with subprocess.Popen(
            [sys.executable, "-m", "mtrkmta.cli.main", *args, SECRET],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=mtrkmta_env(),
        ) as track:
            connection, _ = rude.accept()
            connection.close()
            assert track.stdout is not None
            shown = [track.stdout.readline() for _ in range(3)]  # the first round, flushed
            track.send_signal(signal.SIGINT)
            out, err = track.communicate(timeout=RUN_TIMEOUT)
    assert shown[:2] == [f"Envelope id {ENVID}\n", f"Hop 1: 127.0.0.1 (127.0.0.1 port {port})\n"]
    assert shown[2].startswith("  no answer: ")
    assert (track.returncode, out, err) == (130, "", "")


# -- bash completion ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtrkmta_on_path(tmp_path_factory):
    """A directory holding an ``mtrkmta`` command that runs this checkout's."""
    bin_dir = tmp_path_factory.mktemp("bin")
    command = bin_dir / "mtrkmta"
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mtrkmta.cli.main "$@"\n')
    command.chmod(0o755)
    return bin_dir


def complete(bin_dir: Path, cwd: Path, *words: str) -> list[str]:
    """What bash offers for the last of ``words`` (a command line being typed)."""
    script = (
        f"source {COMPLETION}\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n'
        "\"$(complete -p mtrkmta | awk '{print $3}')\"  # the function registered\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**mtrkmta_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script, "bash", *words],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env,
        check=True,
    )
    assert done.stderr == ""
    return sorted(done.stdout.split())


def test_bash_registers_the_completion(mtrkmta_on_path, tmp_path):
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", f"source {COMPLETION}; complete -p mtrkmta"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=True,
    )
    assert done.stdout == "complete -F _mtrkmta mtrkmta\n"


def test_bash_completes_commands_subcommands_options_and_files(mtrkmta_on_path, tmp_path):
    (tmp_path / "node.toml").write_text("", encoding="utf-8")
    bin_dir = mtrkmta_on_path
    commands = complete(bin_dir, tmp_path, "mtrkmta", "")
    assert {"serve", "check-config", "show-config", "example-config", "db", "queue"} <= set(
        commands
    )
    assert {"send", "track", "tracking", "--help", "--version"} <= set(commands)
    assert complete(bin_dir, tmp_path, "mtrkmta", "que") == ["queue"]
    assert complete(bin_dir, tmp_path, "mtrkmta", "queue", "") == sorted(
        ["list", "show", "flush", "hold", "release", "delete", "bounce"]
    )
    assert complete(bin_dir, tmp_path, "mtrkmta", "serve", "--data") == ["--data-dir", "--database"]
    assert "--json" in complete(bin_dir, tmp_path, "mtrkmta", "queue", "list", "--")
    assert complete(bin_dir, tmp_path, "mtrkmta", "show-config", "--config", "no") == ["node.toml"]
    assert complete(bin_dir, tmp_path, "mtrkmta", "db", "r") == ["recover"]
