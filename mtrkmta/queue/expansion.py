"""Pure rules for what alias and list expansion sends on (RFC 3885 §3.3, §4.2; RFC 3461 §5.2.7;
RFC 3886 §4.2)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from mtrkmta.delivery.interfaces import RecipientOutcome
from mtrkmta.envelope import (
    ClientInfo,
    Envelope,
    MailParams,
    Mtrk,
    OriginalRecipient,
    RcptParams,
    Recipient,
)
from mtrkmta.routing.aliases import Divert, Expand, Loop, Redistribute, Resolution
from mtrkmta.tracking.interfaces import RecipientState

# The diagnostic recorded for a recipient accepted by a list exploder: the DSN layer
# reports it as "delivered" (3461 §5.2.7.1) while tracking says "expanded" (3886 §4.2).
LIST_DIAGNOSTIC = "x-local; accepted by a mailing list"
LOOP_DIAGNOSTIC = "x-local; mail loop: the alias expands into itself"

NEVER = frozenset({"NEVER"})


def remaining_mtrk(envelope: Envelope, now: float, default_retention: float) -> Mtrk | None:
    """The certifier with the timeout decremented by the whole seconds spent here, or None
    when it ran out (RFC 3885 §3.1)."""
    mtrk = envelope.params.mtrk
    if mtrk is None:
        return None
    base = mtrk.timeout if mtrk.timeout is not None else default_retention
    remaining = int(base) - math.floor(max(0.0, now - envelope.arrival))
    return Mtrk(mtrk.certifier, remaining) if remaining > 0 else None


def outcome_for(index: int, resolution: Resolution) -> RecipientOutcome:
    """What the tracking store says about the expanded recipient itself."""
    if isinstance(resolution, Loop):
        return RecipientOutcome(index, RecipientState.FAILED, "5.4.6", LOOP_DIAGNOSTIC)
    if isinstance(resolution, Divert):
        # Confidential or role alias: tracking stops here, the targets are never shown.
        return RecipientOutcome(index, RecipientState.DELIVERED, "2.1.5")
    if isinstance(resolution, Redistribute):
        return RecipientOutcome(
            index, RecipientState.EXPANDED, "2.1.5", LIST_DIAGNOSTIC, list_expansion=True
        )
    # The event names the targets of a plain alias (never a list's members: RFC 3886 §4.2).
    produced = resolution.targets if isinstance(resolution, Expand) else ()
    return RecipientOutcome(index, RecipientState.EXPANDED, "2.1.5", produced=produced)


def new_envelopes(
    envelope: Envelope,
    index: int,
    resolution: Expand | Redistribute | Divert,
    *,
    now: float,
    new_queue_id: Callable[[], str],
    hostname: str,
    default_retention: float,
) -> list[Envelope]:
    """The messages that carry the expanded recipient's mail on.

    * multi-target alias, option (c) of RFC 3461 §5.2.7.3 (doc/conformance.rst 3461-P2):
      ENVID, RET and ORCPT go to every target, ENVID and ORCPT with the esmtp-values as
      received (RFC 3885 §3.3: not modified), NOTIFY without SUCCESS; the certifier (timeout
      decremented) goes only to the primary target, the others get none
      (RFC 3885 §3.3; RFC 3461 §5.2.7.3);
    * mailing list: from the list owner, with nothing of the original's MTRK,
      ENVID, NOTIFY, RET or ORCPT (RFC 3885 §3.3, RFC 3461 §5.2.7.1(b));
    * confidential or role alias: untracked copies without DSN requests
      (NOTIFY=NEVER), so nothing downstream reveals the targets (RFC 3886 §4.2,
      RFC 3885 §4.2).
    """
    recipient = envelope.recipients[index]
    client = ClientInfo(address="", helo=hostname, protocol="local", listener="expansion")
    base = MailParams(body=envelope.params.body, smtputf8=envelope.params.smtputf8)

    def make(sender: str, params: MailParams, rcpts: list[Recipient]) -> Envelope:
        return Envelope(
            queue_id=new_queue_id(),
            sender=sender,
            recipients=tuple(rcpts),
            params=params,
            arrival=now,
            client=client,
        )

    if isinstance(resolution, Redistribute):
        members = [Recipient(m) for m in resolution.members]
        return [make(resolution.mailing_list.owner, base, members)]
    if isinstance(resolution, Divert):
        return [
            make(
                envelope.sender,
                base,
                [Recipient(t, RcptParams(notify=NEVER)) for t in resolution.targets],
            )
        ]
    original: OriginalRecipient = recipient.original
    notify = recipient.params.notify
    if notify is not None and notify != NEVER:
        notify = frozenset(notify - {"SUCCESS"}) or NEVER
    rcpt_params = RcptParams(notify=notify, orcpt=original)
    params = replace(
        base,
        envid=envelope.params.envid,
        envid_xtext=envelope.params.envid_xtext,  # the same esmtp-value (RFC 3885 §3.3)
        ret=envelope.params.ret,
    )
    primary = resolution.primary
    others = [Recipient(t, rcpt_params) for t in resolution.targets if t != primary]
    messages = []
    if primary is not None:
        tracked = replace(params, mtrk=remaining_mtrk(envelope, now, default_retention))
        messages.append(make(envelope.sender, tracked, [Recipient(primary, rcpt_params)]))
    if others:
        messages.append(make(envelope.sender, params, others))
    return messages
