"""Pure rules for what an outbound SMTP/LMTP client puts on the wire: parameters, stuffing, BDAT."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from mtrkmta.envelope import BINARYMIME, NOTIFY_NEVER, Envelope, Recipient
from mtrkmta.smtp import xtext
from mtrkmta.smtp.deliverby import parse_min_by_time, render_by
from mtrkmta.smtp.framing import normalize_line_ends
from mtrkmta.smtp.mtrk import MAX_TIMEOUT, format_mtrk

CRLF = b"\r\n"
END_OF_DATA = b".\r\n"
_NOTIFY_ORDER = ("SUCCESS", "FAILURE", "DELAY")


def remaining_timeout(envelope: Envelope, now: float, default_retention: float) -> int | None:
    """The MTRK timeout to send on, or None when MTRK must be omitted (RFC 3885 §3.1).

    remaining = requested timeout - whole seconds the message spent here; the local
    ``default_retention`` is the base when no timeout arrived (doc/conformance.rst 3885-P5).
    None when the message carries no MTRK or the result is <= 0 (RFC 3885 §3.1: MUST omit the
    whole parameter). A clock that went backwards counts as no time spent.
    """
    mtrk = envelope.params.mtrk
    if mtrk is None:
        return None
    base = mtrk.timeout if mtrk.timeout is not None else int(default_retention)
    spent = max(0, int(now - envelope.arrival))
    remaining = base - spent
    if remaining <= 0:
        return None
    return min(remaining, MAX_TIMEOUT)


def remaining_by_time(envelope: Envelope, now: float) -> int | None:
    """The by-time to relay: seconds left until deliver-by-time, negative once it passed
    (RFC 2852 §4.1.4), whole seconds spent here counted as for MTRK; None without BY."""
    by = envelope.params.deliver_by
    if by is None:
        return None
    return by.seconds - max(0, int(now - envelope.arrival))


def deliverby_refusal(envelope: Envelope, keywords: Mapping[str, str], now: float) -> str | None:
    """The status that fails an R-mode message instead of relaying it to this hop, or None.

    RFC 2852 §4.1.4.1: an R message MUST NOT be relayed to a server without DELIVERBY,
    nor to one whose min-by-time exceeds the time remaining; it is then undeliverable for
    permanent reasons (§4.1.2): 5.3.3, "system not capable of selected features"
    (RFC 3463). With no time left it is 5.4.7 (RFC 2852 §4.1.3).
    """
    by = envelope.params.deliver_by
    remaining = remaining_by_time(envelope, now)
    if by is None or by.mode != "R" or remaining is None:
        return None
    if remaining <= 0:
        return "5.4.7"
    if "DELIVERBY" not in keywords:
        return "5.3.3"
    minimum = parse_min_by_time(keywords["DELIVERBY"])
    if minimum is not None and minimum > remaining:
        return "5.3.3"
    return None


def deliver_by_relayed_dsn(
    envelope: Envelope, recipient: Recipient, keywords: Mapping[str, str], now: float
) -> bool:
    """True when relaying owes the sender a "relayed" DSN for ``recipient`` whatever
    NOTIFY=SUCCESS says (RFC 2852 §4.1.4, §4.1.4.2); never with NOTIFY=NEVER or a null
    sender (RFC 3461 §5.2).

    * by-trace ``T``: a "relayed" DSN SHOULD be generated on relay (§4.1.4);
    * by-mode N relayed before the deliver-by-time to a hop without DELIVERBY: the
      relaying client MUST issue one (§4.1.4.2).
    """
    by = envelope.params.deliver_by
    if by is None or envelope.sender.strip() in ("", "<>"):
        return False
    notify = recipient.params.notify
    if notify is not None and NOTIFY_NEVER in notify:
        return False
    return by.trace or n_mode_adds_delay(envelope, keywords, now)


def n_mode_adds_delay(envelope: Envelope, keywords: Mapping[str, str], now: float) -> bool:
    """By-mode N relayed before its deliver-by-time to a hop without DELIVERBY: RCPT's
    NOTIFY gains DELAY and a "relayed" DSN is owed (RFC 2852 §4.1.4.2)."""
    by = envelope.params.deliver_by
    if by is None or by.mode != "N" or "DELIVERBY" in keywords:
        return False
    remaining = remaining_by_time(envelope, now)
    return remaining is not None and remaining > 0


def _carries_envid_orcpt(keywords: Mapping[str, str]) -> bool:
    # RFC 3885 §2 item 4: MTRK support includes ENVID and ORCPT, so an MTRK hop takes
    # them even if it (wrongly) omits DSN; NOTIFY and RET stay tied to DSN.
    return "DSN" in keywords or "MTRK" in keywords


def mail_parameters(
    envelope: Envelope,
    keywords: Mapping[str, str],
    now: float,
    *,
    size: int,
    default_retention: float,
) -> tuple[list[str], bool]:
    """The MAIL parameters for a next hop that advertised ``keywords``, and whether MTRK went.

    ``keywords`` is :func:`mtrkmta.smtp.extensions.parse_ehlo` output (upper-case keys);
    ``size`` the content length in octets, before dot-stuffing (RFC 1870).

    * ``SIZE=<size>`` when SIZE is advertised.
    * ``BODY=`` as received when 8BITMIME is advertised. A hop without 8BITMIME gets
      8-bit content anyway, without ``BODY=`` and without conversion, as most MTAs
      do (RFC 6152 would ask for a downgrade to 7 bit or a bounce).
      ``BODY=BINARYMIME`` only to a hop advertising BINARYMIME (RFC 3030 §3; the
      caller refuses such a message to any other hop, see :func:`binarymime_status`).
    * ``SMTPUTF8`` when the message was received with it and the hop offers it
      (the caller decides what to do when a message needs it and the hop lacks it).
    * ``ENVID`` and ``RET`` as received for a DSN hop; none of them for a hop without
      DSN; never invented (RFC 3885 §3.3, RFC 3461 §5.2.1). ENVID also goes with MTRK. ENVID carries
      the same esmtp-value as received (RFC 3461 §5.2.1(a), RFC 3885 §3.3), xtext
      encoded canonically only for an ENVID this MTA made.
    * ``MTRK=<B>:<remaining>`` only to a hop advertising MTRK, with the decremented
      timeout, and omitted when it is <= 0 or when no ENVID came with it
      (RFC 3885 §3.1, §3.3; RFC 3886 §3.5). B is unpadded base64 (see :func:`format_mtrk`).
    * ``BY=<remaining>;<mode>[T]`` to a hop advertising DELIVERBY, with the seconds left
      until deliver-by-time (RFC 2852 §4.1.4); see :func:`deliverby_refusal` for R-mode.
    """
    params = envelope.params
    out: list[str] = []
    if "SIZE" in keywords:
        out.append(f"SIZE={size}")
    if params.body == BINARYMIME:
        if "BINARYMIME" in keywords:
            out.append(f"BODY={BINARYMIME}")
    elif params.body is not None and "8BITMIME" in keywords:
        out.append(f"BODY={params.body}")
    if params.smtputf8 and "SMTPUTF8" in keywords:
        out.append("SMTPUTF8")
    if params.envid is not None and _carries_envid_orcpt(keywords):
        out.append(f"ENVID={xtext.on_the_wire(params.envid, params.envid_xtext)}")
    if params.ret is not None and "DSN" in keywords:
        out.append(f"RET={params.ret}")
    forwarded = False
    if params.mtrk is not None and params.envid is not None and "MTRK" in keywords:
        remaining = remaining_timeout(envelope, now, default_retention)
        if remaining is not None:
            out.append(f"MTRK={format_mtrk(params.mtrk.certifier, remaining)}")
            forwarded = True
    remaining = remaining_by_time(envelope, now)
    if params.deliver_by is not None and remaining is not None and "DELIVERBY" in keywords:
        out.append(f"BY={render_by(remaining, params.deliver_by.mode, params.deliver_by.trace)}")
    return out, forwarded


def rcpt_parameters(
    recipient: Recipient, keywords: Mapping[str, str], *, add_delay: bool = False
) -> list[str]:
    """The RCPT parameters for ``recipient`` to a hop that advertised ``keywords``.

    For a DSN (or MTRK) hop: ``NOTIFY`` as received (never invented) and ``ORCPT``
    with the identical original-recipient-address, its xtext as received (RFC 3461
    §5.2.1(d)); when none arrived, ``ORCPT=rfc822;<RCPT address>``
    is added as RFC 3461 §5.2.1 allows (and Postfix does), for ASCII addresses.
    Nothing DSN-related for a hop without DSN (RFC 3461 §5.2.2(a);
    doc/conformance.rst 2033-P2).

    ``add_delay`` (by-mode N to a hop without DELIVERBY, RFC 2852 §4.1.4.2): NOTIFY
    absent becomes ``NOTIFY=FAILURE,DELAY`` and a NOTIFY other than NEVER gains DELAY.
    """
    if not _carries_envid_orcpt(keywords):
        return []
    out: list[str] = []
    notify = recipient.params.notify
    if add_delay and (notify is None or NOTIFY_NEVER not in notify):
        notify = (notify or frozenset({"FAILURE"})) | {"DELAY"}  # RFC 2852 §4.1.4.2
    if notify is not None and "DSN" in keywords:
        if NOTIFY_NEVER in notify:
            out.append(f"NOTIFY={NOTIFY_NEVER}")
        else:
            out.append("NOTIFY=" + ",".join(k for k in _NOTIFY_ORDER if k in notify))
    orcpt = recipient.params.orcpt
    if orcpt is not None:
        out.append(f"ORCPT={orcpt.addr_type};{xtext.on_the_wire(orcpt.address, orcpt.xtext)}")
    elif recipient.address.isascii() and recipient.address.isprintable():
        out.append(f"ORCPT=rfc822;{xtext.encode(recipient.address)}")
    return out


def smtputf8_status(envelope: Envelope, recipients: tuple[int, ...], content: bytes) -> str | None:
    """Why the message cannot go to a hop without SMTPUTF8, or None when it can.

    Only a message received with SMTPUTF8 can need it; it does when the sender or
    one of ``recipients`` has a non-ASCII address (``5.6.7``, RFC 6531 §3.2) or the
    header section has a non-ASCII octet (``5.6.9``). An all-ASCII message goes as is.
    """
    if not envelope.params.smtputf8:
        return None
    addresses = [envelope.sender, *(envelope.recipients[i].address for i in recipients)]
    if not all(address.isascii() for address in addresses):
        return "5.6.7"
    end = content.find(b"\r\n\r\n")
    header = content if end < 0 else content[:end]
    if not header.isascii():
        return "5.6.9"
    return None


class DotStuffer:
    """Incremental SMTP dot-stuffer (RFC 5321 §4.5.2): feed content chunks, then finish.

    Output does not depend on where the content is split. Every bare CR and
    every bare LF becomes CRLF (:func:`~mtrkmta.smtp.framing.normalize_line_ends`;
    RFC 5321 §2.3.8: a client MUST NOT send them otherwise), so that no
    ``<CR>.<CR>``, ``<LF>.<LF>`` or other lenient end of data can reach a next hop
    (SMTP smuggling, CVE-2023-51764); then a line starting with ``.`` gets
    another ``.`` (RFC 5321 §4.5.2); content not ending in CRLF gets one;
    :meth:`finish` adds the ``.<CRLF>`` terminator.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._held_cr = False  # a trailing CR whose LF may come in the next chunk
        self._finished = False

    def feed(self, chunk: bytes) -> bytes:
        """Stuff one chunk; returns the bytes to send (possibly fewer, never later lost)."""
        if self._finished:
            raise ValueError("DotStuffer already finished")
        if not chunk:
            return b""
        data = b"\r" + chunk if self._held_cr else chunk
        self._held_cr = data.endswith(b"\r")
        if self._held_cr:
            data = data[:-1]
        if not data:
            return b""
        data = normalize_line_ends(data)  # every CR now has its next byte in data
        stuffed = data.replace(b"\r\n.", b"\r\n..")
        if self._line_start and stuffed[:1] == b".":
            stuffed = b"." + stuffed
        self._line_start = stuffed.endswith(CRLF)
        return stuffed

    def finish(self) -> bytes:
        """The bytes that end the content: a missing CRLF, then ``.<CRLF>``."""
        if self._finished:
            raise ValueError("DotStuffer already finished")
        self._finished = True
        if self._held_cr:
            return CRLF + END_OF_DATA  # a bare CR at the very end: one more CRLF
        if not self._line_start:
            return CRLF + END_OF_DATA
        return END_OF_DATA


def dot_stuff(content: bytes) -> bytes:
    """The whole DATA payload for ``content``: stuffed, CRLF-terminated, ending in ``.<CRLF>``."""
    stuffer = DotStuffer()
    return stuffer.feed(content) + stuffer.finish()


BDAT_CHUNK = 256 * 1024
"""Content octets per BDAT chunk by default (before line-end repair)."""


def offers_chunking(keywords: Mapping[str, str], enabled: bool) -> bool:
    """True when the message goes with BDAT: the hop advertised CHUNKING (RFC 3030 §2) and
    ``delivery.chunking`` is on. Otherwise DATA, as to any hop without it."""
    return enabled and "CHUNKING" in keywords


def binarymime_status(
    envelope: Envelope, keywords: Mapping[str, str], chunking: bool
) -> str | None:
    """Why a ``BODY=BINARYMIME`` message cannot go to this hop (``5.6.3``), or None when it can.

    RFC 3030 §3: BINARYMIME content goes only with BDAT, to a server that advertised
    both BINARYMIME and CHUNKING; there is no conversion here, so the message is
    returned as undeliverable (5.6.3, conversion required but not supported, RFC 3463).
    """
    if envelope.params.body != BINARYMIME:
        return None
    if offers_chunking(keywords, chunking) and "BINARYMIME" in keywords:
        return None
    return "5.6.3"


def bdat_command(size: int, last: bool) -> bytes:
    """``BDAT <size>[ LAST]<CRLF>`` (RFC 3030 §2: ``bdat-cmd ::= "BDAT" SP chunk-size
    [ SP end-marker ] CR LF``); ``size`` is the exact count of octets that follow."""
    if size < 0:
        raise ValueError(f"a BDAT chunk size is never negative, got {size}")
    return b"BDAT %d%s\r\n" % (size, b" LAST" if last else b"")


def bdat_chunks(
    content: bytes, chunk: int = BDAT_CHUNK, *, binary: bool = False
) -> Iterator[tuple[bytes, bytes]]:
    """The BDAT chunks for ``content``, one ``(command, payload)`` pair at a time.

    No dot-stuffing and no ``.<CRLF>`` terminator (RFC 3030 §2: the octets of a chunk
    are taken as they are). Line ends are repaired exactly as on the DATA path
    (:class:`DotStuffer`, RFC 5321 §2.3.8): a bare CR or LF becomes CRLF and content
    not ending in CRLF gets one, so the next hop stores the same bytes whichever of
    DATA or BDAT carried them. ``chunk`` bounds the content octets read per chunk (a
    payload is at most twice that after repair); the command's size is the payload's
    exact length. The last chunk says ``LAST`` (``BDAT 0 LAST`` for empty content).
    Only one chunk is materialised at a time. ``binary`` (a ``BODY=BINARYMIME``
    message, RFC 3030 §3) sends the octets unchanged, chunks of exactly ``chunk``.
    """
    step = max(1, chunk)
    if binary:
        for start in range(0, max(len(content), 1), step):
            payload = content[start : start + step]
            yield bdat_command(len(payload), start + step >= len(content)), payload
        return
    held_cr = False  # a trailing CR whose LF may start the next slice
    at_line_start = True
    offset = 0
    while True:
        piece = content[offset : offset + step]
        offset += step
        last = offset >= len(content)
        data = b"\r" + piece if held_cr else piece
        held_cr = not last and data.endswith(b"\r")
        if held_cr:
            data = data[:-1]
        payload = normalize_line_ends(data)
        if payload:
            at_line_start = payload.endswith(CRLF)
        if last and not at_line_start:
            payload += CRLF
        if payload or last:
            yield bdat_command(len(payload), last), payload
        if last:
            return
