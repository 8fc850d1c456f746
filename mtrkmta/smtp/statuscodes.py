"""Plain-language meanings of enhanced mail system status codes (RFC 3463 §2, §3)."""

from __future__ import annotations

import re

#: The class digit's meaning (RFC 3463 §2).
CLASSES: dict[str, str] = {
    "2": "success",
    "4": "persistent transient failure",
    "5": "permanent failure",
}

#: X.Y.0 for every subject: what an unknown detail of that subject means (RFC 3463 §3.1-§3.8).
SUBJECTS: dict[str, str] = {
    "0": "other or undefined status",
    "1": "other address status",
    "2": "other or undefined mailbox status",
    "3": "other or undefined mail system status",
    "4": "other or undefined network or routing status",
    "5": "other or undefined protocol status",
    "6": "other or undefined media error",
    "7": "other or undefined security status",
}

#: Subject.detail to meaning, as RFC 3463 §3 enumerates them (X.Y.0 are in SUBJECTS).
DETAILS: dict[str, str] = {
    "1.1": "bad destination mailbox address",
    "1.2": "bad destination system address",
    "1.3": "bad destination mailbox address syntax",
    "1.4": "destination mailbox address ambiguous",
    "1.5": "destination address valid",
    "1.6": "destination mailbox has moved, no forwarding address",
    "1.7": "bad sender's mailbox address syntax",
    "1.8": "bad sender's system address",
    "2.1": "mailbox disabled, not accepting messages",
    "2.2": "mailbox full",
    "2.3": "message length exceeds administrative limit",
    "2.4": "mailing list expansion problem",
    "3.1": "mail system full",
    "3.2": "system not accepting network messages",
    "3.3": "system not capable of selected features",
    "3.4": "message too big for system",
    "3.5": "system incorrectly configured",
    "4.1": "no answer from host",
    "4.2": "bad connection",
    "4.3": "directory server failure",
    "4.4": "unable to route",
    "4.5": "mail system congestion",
    "4.6": "routing loop detected",
    "4.7": "delivery time expired",
    "5.1": "invalid command",
    "5.2": "syntax error",
    "5.3": "too many recipients",
    "5.4": "invalid command arguments",
    "5.5": "wrong protocol version",
    "6.1": "media not supported",
    "6.2": "conversion required and prohibited",
    "6.3": "conversion required but not supported",
    "6.4": "conversion with loss performed",
    "6.5": "conversion failed",
    "7.1": "delivery not authorized, message refused",
    "7.2": "mailing list expansion prohibited",
    "7.3": "security conversion required but not possible",
    "7.4": "security features not supported",
    "7.5": "cryptographic failure",
    "7.6": "cryptographic algorithm not supported",
    "7.7": "message integrity failure",
}

_CODE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")


def meaning(code: str) -> str | None:
    """What ``code`` (``class.subject.detail``) means: the detail's meaning, else its
    subject's "other" meaning (X.Y.0), else its class's; None when it is no status code."""
    match = _CODE.fullmatch(code.strip())
    if match is None:
        return None
    klass, subject, detail = (str(int(part)) for part in match.groups())
    found = DETAILS.get(f"{subject}.{detail}") or SUBJECTS.get(subject)
    return found or CLASSES[klass]


def with_meaning(code: str) -> str:
    """``5.1.1: bad destination mailbox address``, or the code alone when it means nothing."""
    found = meaning(code)
    return code if found is None else f"{code}: {found}"
