"""The LMTP server: the ESMTP core with LHLO and one reply per recipient after DATA."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from mtrkmta.smtp.reply import Reply
from mtrkmta.smtp.server import Answer, IncomingTransaction, SMTPServer, SMTPServerFactory


class LMTPServer(SMTPServer):
    """RFC 2033: LHLO replaces HELO/EHLO, and DATA gets one reply per accepted RCPT.

    The replies come in RCPT order, duplicates included (RFC 2033 §4.2).
    """

    hello_verbs = ("LHLO",)
    service_name = "LMTP"

    def smtp_LHLO(self, argument: str) -> Reply:
        return self._hello(argument, esmtp=True, verb="LHLO")

    def smtp_EHLO(self, argument: str) -> Reply:
        # RFC 2033 §4.1: HELO/EHLO never get 2xx on LMTP.
        return Reply(500, "5.5.1", ("Command unrecognized: this is LMTP, use LHLO",))

    smtp_HELO = smtp_EHLO

    def _with_protocol(self) -> str:
        return "LMTPS" if self.session.tls else "LMTP"

    def _answer_data(
        self, result: Deferred[Reply] | Reply, transaction: IncomingTransaction
    ) -> Answer:
        count = len(transaction.recipients)

        def per_recipient(reply: Reply) -> tuple[Reply, ...]:
            if reply.code // 100 != 2:
                return (reply,) * count
            return tuple(
                Reply(reply.code, reply.enhanced, (f"<{rcpt.address}> {reply.lines[0]}",))
                for rcpt in transaction.recipients
            )

        if isinstance(result, Reply):
            return per_recipient(result)
        return result.addCallback(per_recipient)


class LMTPServerFactory(SMTPServerFactory):
    """Builds LMTP sessions."""

    protocol = LMTPServer
