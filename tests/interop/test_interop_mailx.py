"""Debian's bsd-mailx (mail(1)) sending through mtrkmta's sendmail into a node's Maildir.

mail(1) runs the program its ``sendmail`` variable names (``man mail``); the test sets it
in a mail.rc of its own (``MAILRC``, with ``-n`` so that /etc/mail.rc is not read) to a
script that runs this checkout's sendmail with the node's configuration. Nothing on the
machine is changed: /usr/sbin/sendmail is left as it is.
"""

from __future__ import annotations

import os
import pwd
import shlex
import sys
from pathlib import Path

import pytest_twisted
from interop_lab import eventually, in_thread, program, run

import mtrkmta
from mtrkmta.testing import database_url, node_config, start_node, stop_node
from mtrkmta.tracking.interfaces import RecipientState

HOSTNAME = "mx.example.test"
IMPORT_ROOT = str(Path(mtrkmta.__file__).resolve().parent.parent)  # this checkout's mtrkmta


@pytest_twisted.ensureDeferred
async def test_mail_s_subject_user_is_delivered_through_our_sendmail(lab):
    data_dir = lab.path("data")
    node = await start_node(
        node_config(
            data_dir,
            hostname=HOSTNAME,
            listeners=("smtp",),
            options=(("pickup.poll_interval", "1h"),),  # sendmail's nudge brings it at once
        )
    )
    try:
        config = lab.path("sendmail.toml")
        config.write_text(
            f'[server]\nhostname = "{HOSTNAME}"\ndata_dir = "{data_dir}"\n'
            f'database = "{database_url(data_dir)}"\n'
        )
        arguments = lab.path("sendmail-args")
        wrapper = lab.path("sendmail")
        wrapper.write_text(
            "#!/bin/sh\n"
            f'printf "%s\\n" "$*" > {shlex.quote(str(arguments))}\n'
            f"PYTHONPATH={shlex.quote(IMPORT_ROOT)} exec {shlex.quote(sys.executable)} "
            f'-m mtrkmta.cli.sendmail -C {shlex.quote(str(config))} "$@"\n'
        )
        wrapper.chmod(0o755)
        mailrc = lab.path("mail.rc")
        mailrc.write_text(f"set sendmail={wrapper}\n")
        await in_thread(
            run,
            [program("bsd-mailx"), "-n", "-s", "interop via mail(1)", "alice"],
            input="Hello from bsd-mailx.\n.\nThe dot above is content.\n",
            env={**os.environ, "MAILRC": str(mailrc), "HOME": str(lab.path())},
        )
        new = data_dir / "mail" / "alice" / "new"
        [copy] = await eventually(
            lambda: [p.read_bytes() for p in new.iterdir()] if new.is_dir() else None,
            "alice's copy",
        )
        user = pwd.getpwuid(os.getuid()).pw_name
        header, _, body = copy.partition(b"\n\n")
        assert b"\nSubject: interop via mail(1)\n" in header + b"\n"
        assert f"Received: by {HOSTNAME} (mtrkmta, from userid {os.getuid()})".encode() in header
        assert f"Return-Path: <{user}@localhost>".encode() in header
        assert body == b"Hello from bsd-mailx.\n.\nThe dot above is content.\n"
        # bsd-mailx passes -i (a lone dot is content) and -t (the recipient is in To:).
        assert arguments.read_text().split() == ["-i", "-t"]
        assert b"\nTo: alice\n" in header + b"\n"
        queue_id = next(
            line.split(b"id ")[1].split(b";")[0]
            for line in header.split(b"\n")
            if line.startswith(b"\tid ")
        ).decode()
        record = await node.tracking.message(queue_id)
        assert record is not None
        assert [(r.address, r.state) for r in record.recipients] == [
            ("alice@localhost", RecipientState.DELIVERED)
        ]
    finally:
        await stop_node(node)
