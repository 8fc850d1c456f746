"""Maildir mailbox names and paths: one mailbox per local part, never outside the root."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.python.threadpool import ThreadPool

from mtrkmta.delivery.maildir import MaildirTransport, mailbox_name


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
