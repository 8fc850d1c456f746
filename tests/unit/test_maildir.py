"""Maildir mailbox names and paths: one mailbox per local part, never outside the root."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.python.threadpool import ThreadPool

from mtrkmta.delivery.interfaces import Attempt, NextHop
from mtrkmta.delivery.maildir import MaildirTransport, delivery_key, mailbox_name
from mtrkmta.envelope import Envelope, Recipient
from mtrkmta.tracking.interfaces import RecipientState


def transport(template: str = "{local}") -> MaildirTransport:
    return MaildirTransport(
        MemoryReactorClock(), ThreadPool(), Path("/nonexistent"), template=template
    )


@pytest.mark.parametrize(
    ("address", "mailbox"),
    [
        # Letters, digits and . _ = - keep their (lower-cased) names, as before.
        ("alice@x.test", "alice"),
        ("Bob.Smith@x.test", "bob.smith"),
        ("x-y_z=1@x.test", "x-y_z=1"),
        ("alice+lists@x.test", "alice"),
        ("postmaster", "postmaster"),
        # The old %XX escape of a code point had a variable length: U+0123 "4" and
        # U+1234 both gave %1234. Each UTF-8 octet is escaped now, in exactly three
        # characters, "%" included.
        ("\u01234@x.test", "%C4%A34"),
        ("\u1234@x.test", "%E1%88%B4"),
        ('" 28x"@x.test', "%22%2028x%22"),
        ("\u2028x@x.test", "%E2%80%A8x"),
        ("%2028x@x.test", "%252028x"),
        ("\u00e9@x.test", "%C3%A9"),
        # Nothing leads out of the root.
        (".hidden@x.test", "%2Ehidden"),
        ("..@x.test", "%2E."),
        ('"../x"@x.test', "%22..%2Fx%22"),
    ],
)
def test_mailbox_names_escape_utf8_octets(address, mailbox):
    assert mailbox_name(address) == mailbox


def test_nothing_falls_back_to_postmaster():
    # "+detail" has no base before the delimiter: it is not split. An empty local part
    # has no mailbox at all (RCPT refuses it).
    assert mailbox_name("+detail@x.test") == "%2Bdetail"
    assert mailbox_name('""@x.test') == "%22%22"
    with pytest.raises(ValueError):
        mailbox_name("@x.test")


local_parts = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="+@"), min_size=1
).map(str.lower)


@given(local_parts, local_parts)
def test_mailbox_names_are_one_to_one(first, second):
    # Distinct (case-folded) local parts never share a mailbox: the name decodes back.
    for local in (first, second):
        name = mailbox_name(f"{local}@x.test")
        assert unquote(name, errors="strict") == local.lower()
        assert "/" not in name and not name.startswith(".")
    if first.lower() != second.lower():
        assert mailbox_name(f"{first}@x.test") != mailbox_name(f"{second}@x.test")


def test_unusable_addresses():
    maildir = transport()
    assert maildir.unusable("alice@x.test") is None
    assert maildir.unusable("@x.test") == "empty local part: no mailbox"
    # 29 three-octet characters: 261 octets once escaped, past NAME_MAX (255).
    assert maildir.unusable("\u1234" * 29 + "@x.test") == "local part too long for a mailbox name"
    assert maildir.unusable("\u1234" * 28 + "@x.test") is None


def attempt(
    recipients: tuple[str, ...] = ("alice@x.test",), queue_id: str = "Q0000000001abcdefghi"
):
    envelope = Envelope(
        queue_id=queue_id, sender="s@y.test", recipients=tuple(Recipient(r) for r in recipients)
    )
    return Attempt(
        envelope=envelope,
        content=b"Subject: once\r\n\r\nhi\r\n",
        recipients=tuple(range(len(recipients))),
        next_hop=NextHop("maildir", "maildir"),
        now=0.0,
    )


def files(maildir: Path) -> list[Path]:
    return sorted(p for sub in ("new", "cur") for p in (maildir / sub).iterdir())


def test_the_same_attempt_again_finds_the_copy_in_new(tmp_path):
    # A crash between the rename into new/ and the commit of the outcome: the queue tries
    # the same recipient of the same message again. It finds the copy, reports it
    # delivered, and writes no second one.
    maildir = MaildirTransport(MemoryReactorClock(), ThreadPool(), tmp_path)
    first = maildir._deliver(attempt())
    (copy,) = files(tmp_path / "alice")
    # An earlier crash before the rename left its tmp/ file: it blocks nothing.
    (tmp_path / "alice" / "tmp" / copy.name).write_bytes(b"partial")
    again = maildir._deliver(attempt())
    assert [(o.state, o.status) for o in first + again] == [
        (RecipientState.DELIVERED, "2.1.5"),
        (RecipientState.DELIVERED, "2.1.5"),
    ]
    assert files(tmp_path / "alice") == [copy]
    assert copy.parent.name == "new"
    assert copy.read_bytes() == b"Return-Path: <s@y.test>\nDelivered-To: <alice@x.test>\n" + (
        b"Subject: once\n\nhi\n"
    )


def test_the_same_attempt_again_finds_the_copy_a_reader_moved_to_cur(tmp_path):
    # The MUA moved the copy to cur/ and appended its flags after ':' (Maildir: "2,S",
    # seen): the unique part before ':' still names the attempt.
    maildir = MaildirTransport(MemoryReactorClock(), ThreadPool(), tmp_path)
    maildir._deliver(attempt())
    (copy,) = files(tmp_path / "alice")
    copy.rename(tmp_path / "alice" / "cur" / f"{copy.name}:2,S")
    (outcome,) = maildir._deliver(attempt())
    assert outcome.state == RecipientState.DELIVERED
    assert [p.name for p in files(tmp_path / "alice")] == [f"{copy.name}:2,S"]


def test_another_hostname_or_a_new_process_still_finds_the_copy(tmp_path):
    # The node restarted (new pid, fresh counter), maybe under another host name.
    MaildirTransport(MemoryReactorClock(), ThreadPool(), tmp_path, hostname="a.test")._deliver(
        attempt()
    )
    later = MaildirTransport(MemoryReactorClock(), ThreadPool(), tmp_path, hostname="b.test")
    later._deliver(attempt())
    assert len(files(tmp_path / "alice")) == 1


def test_each_recipient_and_each_message_gets_its_own_copy(tmp_path):
    # Two recipients with one mailbox (alice and alice+lists) are two copies; so is
    # another message to alice. Only the same message and recipient index is one copy.
    maildir = MaildirTransport(MemoryReactorClock(), ThreadPool(), tmp_path)
    maildir._deliver(attempt(("alice@x.test", "alice+lists@x.test")))
    maildir._deliver(attempt(("alice@x.test", "alice+lists@x.test")))
    maildir._deliver(attempt(queue_id="Q0000000002abcdefghi"))
    assert len(files(tmp_path / "alice")) == 3


def test_delivery_keys_hold_no_maildir_separators():
    # "." separates the fields of a Maildir name, ":" starts the flags, "/" a path.
    assert delivery_key("0abcDEF_-9", 12) == "Q0abcDEF_-9R12"
    assert delivery_key("a.b:c/d%", 0) == "Qa%2Eb%3Ac%2Fd%25R0"
    assert delivery_key("aR1", 2) != delivery_key("a", 12)


def test_the_first_attempt_of_a_message_accepted_here_lists_no_mailbox(tmp_path, monkeypatch):
    # Attempt.first: the message was accepted by this process and this is its first run,
    # so no earlier attempt can have delivered it; listing a large mailbox costs
    # milliseconds, so only retries (and runs after a restart) look for a copy.
    from mtrkmta.delivery import maildir as module

    looked: list[Path] = []
    real = module._holds

    def holds(directory: Path, key: str) -> bool:
        looked.append(directory)
        return real(directory, key)

    monkeypatch.setattr(module, "_holds", holds)
    maildir = MaildirTransport(MemoryReactorClock(), ThreadPool(), tmp_path)
    (outcome,) = maildir._deliver(replace(attempt(), first=True))
    assert outcome.state == RecipientState.DELIVERED and looked == []
    maildir._deliver(attempt())
    assert looked == [tmp_path / "alice" / "new"]  # a retry looks, and finds the copy
    assert len(files(tmp_path / "alice")) == 1
