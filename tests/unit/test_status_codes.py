"""The plain-language meanings of enhanced status codes (RFC 3463 §2, §3)."""

from __future__ import annotations

import pytest

from mtrkmta.smtp.statuscodes import meaning, with_meaning

# Every code RFC 3463 §3 enumerates (§3.1-§3.8), as the RFC writes them.
RFC_3463_CODES = (
    ["X.0.0"]
    + [f"X.1.{n}" for n in range(9)]
    + [f"X.2.{n}" for n in range(5)]
    + [f"X.3.{n}" for n in range(6)]
    + [f"X.4.{n}" for n in range(8)]
    + [f"X.5.{n}" for n in range(6)]
    + [f"X.6.{n}" for n in range(6)]
    + [f"X.7.{n}" for n in range(8)]
)


@pytest.mark.parametrize("code", RFC_3463_CODES)
@pytest.mark.parametrize("klass", ["2", "4", "5"])
def test_every_enumerated_code_has_its_own_meaning(code, klass):
    found = meaning(code.replace("X", klass, 1))
    assert found is not None
    # Not a fallback: only X.Y.0 mean "other ..." (RFC 3463 §3).
    assert found.startswith("other") == code.endswith(".0")


@pytest.mark.parametrize(
    "code, expected",
    [
        ("5.1.1", "bad destination mailbox address"),  # RFC 3463 §3.2
        ("4.4.1", "no answer from host"),  # §3.5
        ("4.4.7", "delivery time expired"),  # §3.5
        ("2.1.5", "destination address valid"),  # §3.2
        ("5.7.1", "delivery not authorized, message refused"),  # §3.8
        ("5.0.0", "other or undefined status"),  # §3.1
    ],
)
def test_meanings_follow_the_rfc_table(code, expected):
    assert meaning(code) == expected


def test_an_unknown_detail_falls_back_to_its_subject():
    # RFC 3463 §2: a client that does not know a detail code uses the subject (X.Y.0).
    assert meaning("5.1.99") == "other address status"
    assert meaning("4.4.20") == "other or undefined network or routing status"
    assert meaning("5.7.26") == "other or undefined security status"


def test_an_unknown_subject_falls_back_to_the_class():
    # RFC 3463 §2: the class alone says success, transient or permanent failure.
    assert meaning("2.9.1") == "success"
    assert meaning("4.8.0") == "persistent transient failure"
    assert meaning("5.42.3") == "permanent failure"


@pytest.mark.parametrize("text", ["", "5.1", "3.1.1", "5.1.1.1", "x.1.1", "5.1000.1", "smtp; 550"])
def test_what_is_no_status_code_has_no_meaning(text):
    assert meaning(text) is None
    assert with_meaning(text) == text


def test_with_meaning_puts_the_meaning_after_the_code():
    assert with_meaning("4.4.1") == "4.4.1: no answer from host"
    assert with_meaning("5.01.001") == "5.01.001: bad destination mailbox address"
