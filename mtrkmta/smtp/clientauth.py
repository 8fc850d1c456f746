"""AUTH toward a next hop, client side (RFC 4954, PLAIN RFC 4616, LOGIN): pure decisions."""

from __future__ import annotations

import base64
from typing import Literal

from mtrkmta.config import RelayCredentials
from mtrkmta.smtp.reply import Reply

Mechanism = Literal["PLAIN", "LOGIN"]

REDACTED = "[credentials]"


def choose_mechanism(keywords: dict[str, str]) -> Mechanism | None:
    """PLAIN when the server's ``AUTH`` keyword offers it, else LOGIN, else None."""
    if "AUTH" not in keywords:
        return None
    offered = {word.upper() for word in keywords["AUTH"].split()}
    if "PLAIN" in offered:
        return "PLAIN"
    if "LOGIN" in offered:
        return "LOGIN"
    return None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def plain_command(credentials: RelayCredentials) -> str:
    """``AUTH PLAIN`` with the initial response (RFC 4954 §4): base64 of
    ``[authzid] NUL authcid NUL passwd`` with an empty authzid (RFC 4616 §2)."""
    return "AUTH PLAIN " + _b64(f"\0{credentials.username}\0{credentials.password}")


def login_responses(credentials: RelayCredentials) -> tuple[str, str]:
    """What LOGIN answers its two ``334`` challenges with: the username, then the password."""
    return _b64(credentials.username), _b64(credentials.password)


def secrets(credentials: RelayCredentials) -> tuple[str, ...]:
    """Every form in which the password goes on the wire, and the password itself."""
    return (
        credentials.password,
        plain_command(credentials).split(" ", 2)[2],
        login_responses(credentials)[1],
    )


def redact(reply: Reply, credentials: RelayCredentials) -> Reply:
    """``reply`` with any echo of the credentials replaced by ``[credentials]``."""
    lines = reply.lines
    for secret in secrets(credentials):
        lines = tuple(line.replace(secret, REDACTED) for line in lines)
    return Reply(reply.code, reply.enhanced, lines)


def failure_status(reply: Reply) -> str:
    """The RFC 3463 code to defer with when AUTH is answered by ``reply``.

    Every refusal defers, a 5xx too (as Postfix's ``smtp_sasl_auth_soft_bounce = yes``):
    wrong credentials are the operator's to fix and the mail should wait for it. The
    reply's own enhanced code as 4.x.x, else 4.7.8 for ``535`` (RFC 4954 §6,
    "Authentication credentials invalid") and 4.7.0 for anything else.
    """
    if reply.enhanced is not None:
        return "4" + reply.enhanced[1:]
    return "4.7.8" if reply.code == 535 else "4.7.0"
