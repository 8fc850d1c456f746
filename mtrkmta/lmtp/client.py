"""The LMTP client: the SMTP client core with LHLO and one reply per accepted recipient."""

from __future__ import annotations

from mtrkmta.smtp.client import SMTPClient


class LMTPClient(SMTPClient):
    """RFC 2033 client side: LHLO (no HELO fallback), and after the final dot one
    reply per accepted RCPT, in RCPT order (RFC 2033 §4.2).

    Each reply is recorded as it arrives, so when the connection drops only the
    recipients without a reply are left undecided; the transport makes them
    temporary failures (RFC 2033 §5).
    """

    hello_verb = "LHLO"
    fallback_verb = None

    def _final_count(self, accepted: int) -> int:
        return accepted
