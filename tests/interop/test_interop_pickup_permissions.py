"""Who may write into the pickup directory: sendmail run by an ordinary user (nobody).

The test runs as root (as the interop suite does) and forks a child that drops to
uid/gid 65534 before it runs sendmail's ``run``: the data directory's mode decides
whether the user may send, and the user can never list the pickup directory.
"""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest_twisted
from interop_lab import NOBODY, eventually, in_thread

from mtrkmta.cli.sendmail import EX_NOPERM, run
from mtrkmta.testing import node_config, start_node, stop_node


def sendmail_as(uid: int, config: Path, recipient: str, pickup: Path) -> list[object]:
    """Fork, become ``uid``, run ``sendmail -C config recipient``; its exit status, its
    standard error, and whether it could list ``pickup``."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            err = io.StringIO()
            message = io.BytesIO(b"Subject: from nobody\n\nhello\n")
            status = run("sendmail", ["-C", str(config), recipient], message, io.StringIO(), err)
            try:
                listed = os.listdir(pickup) is not None
            except PermissionError:
                listed = False
            os.write(writer, json.dumps([status, err.getvalue(), listed]).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(answer)


@pytest_twisted.ensureDeferred
async def test_a_user_may_send_once_the_data_directory_is_searchable(lab):
    data_dir = lab.path("data")
    node = await start_node(
        node_config(data_dir, listeners=("smtp",), options=(("pickup.poll_interval", "1s"),))
    )
    try:
        pickup = data_dir / "pickup"
        assert stat.S_IMODE(pickup.stat().st_mode) == 0o1733
        config = lab.path("sendmail.toml")
        config.write_text(f'[server]\nhostname = "mx.example.test"\ndata_dir = "{data_dir}"\n')
        # The data directory as the node made it (0700): the user is told, in one line.
        status, err, _ = await in_thread(sendmail_as, NOBODY, config, "alice", pickup)
        assert status == EX_NOPERM
        assert err.count("\n") == 1
        assert "must be searchable by everyone (mode 0711)" in err
        # Searchable: the user writes, cannot list, and the node delivers (on its poll:
        # the control socket is not the user's to nudge).
        data_dir.chmod(0o711)
        status, err, listed = await in_thread(sendmail_as, NOBODY, config, "alice", pickup)
        assert (status, err, listed) == (0, "", False)
        new = data_dir / "mail" / "alice" / "new"
        [copy] = await eventually(
            lambda: [p.read_bytes() for p in new.iterdir()] if new.is_dir() else None,
            "alice's copy",
        )
        assert f"(mtrkmta, from userid {NOBODY})".encode() in copy
        assert b"Return-Path: <nobody@localhost>" in copy
        assert list(pickup.iterdir()) == []
    finally:
        await stop_node(node)
