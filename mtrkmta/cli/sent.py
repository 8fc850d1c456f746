"""`mtrkmta sent`: list the messages `mtrkmta send` recorded, newest first, to pick one."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, TextIO

from twisted.python import usage

from mtrkmta.cli.conventions import CommandOptions, parse
from mtrkmta.originator import (
    SecretsFile,
    SecretsFileError,
    SentRecord,
    default_secrets_path,
    load_secrets,
)

EXIT_LISTED = 0
EXIT_PROBLEM = 1


class SentOptions(CommandOptions):
    program = "mtrkmta sent"
    synopsis = "[--secrets FILE] [--json] [-n N]"
    longdesc = (
        "List the messages sent with `mtrkmta send`, newest first: number, date (local time "
        "zone), subject, recipients and the mtqp:// URI that tracks it. `mtrkmta track --pick "
        "N` tracks message N. Exit status: 0 listed, 1 the secrets file is missing, unreadable "
        "or has damaged lines (the others are listed), 2 usage error."
    )
    optFlags = (("json", None, "Print the list as JSON."),)
    optParameters = (
        ("secrets", None, None, "Secrets file [~/.local/share/mtrkmta/sent.jsonl]."),
        ("number", "n", None, "List only the N newest messages."),
    )

    def postOptions(self) -> None:
        number = self["number"]
        if number is not None:
            if not number.isdigit() or int(number) < 1:
                raise usage.UsageError(f"-n is a number above 0, not {number!r}")
            self["number"] = int(number)


def local_time(sent_at: str, zone: tzinfo | None = None) -> datetime | None:
    """``sent_at`` (ISO 8601) in ``zone`` (None: the local time zone); None when it is no
    time with an offset."""
    try:
        when = datetime.fromisoformat(sent_at)
    except ValueError:
        return None
    return None if when.tzinfo is None else when.astimezone(zone)


def _entry_json(number: int, record: SentRecord) -> dict[str, Any]:
    when = local_time(record.sent_at)
    return {
        "number": number,
        "sent_at": record.sent_at if when is None else when.isoformat(),
        "subject": record.subject,
        "sender": record.sender,
        "recipients": list(record.recipients),
        "envid": record.envid,
        "server": record.server,
        "mtqp": record.mtqp,
    }


def render(records: Sequence[SentRecord], out: TextIO) -> None:
    """One block per message: number, date and subject; recipients; URI."""
    width = len(str(len(records)))
    indent = " " * (width + 2)
    for number, record in enumerate(records, start=1):
        when = local_time(record.sent_at)
        date = record.sent_at if when is None else when.strftime("%Y-%m-%d %H:%M:%S %z")
        subject = record.subject or "(no subject)"
        print(f"{number:>{width}}  {date}  {subject}", file=out)
        recipients = ", ".join(record.recipients) or "(no recipient accepted)"
        print(f"{indent}to {recipients}", file=out)
        print(f"{indent}{record.mtqp}", file=out)


def main(args: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """List the secrets file; the exit status (0, 1 or 2)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    options = SentOptions()
    status = parse(options, args, err)
    if status is not None:
        return status
    path = Path(options["secrets"]) if options["secrets"] else default_secrets_path()
    try:
        secrets: SecretsFile = load_secrets(path)
    except SecretsFileError as error:
        print(f"mtrkmta: {error}", file=err)
        return EXIT_PROBLEM
    for line in secrets.damaged:
        print(
            f"mtrkmta: {path} line {line}: not a record of `mtrkmta send`, skipped "
            "(repair or delete the line)",
            file=err,
        )
    records = secrets.newest_first()[: options["number"]]
    if options["json"]:
        entries = [_entry_json(number, record) for number, record in enumerate(records, 1)]
        print(json.dumps(entries, indent=2), file=out)
    elif not records:
        print(f"mtrkmta: {path}: no message recorded", file=err)
    else:
        render(records, out)
    return EXIT_PROBLEM if secrets.damaged else EXIT_LISTED
