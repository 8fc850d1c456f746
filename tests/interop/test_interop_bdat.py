"""A real BDAT sender into mtrkmta: Dovecot 2.3's LMTP proxy (lib-smtp) uses BDAT toward a
backend that offers CHUNKING (RFC 3030), and mtrkmta's LMTP listener is that backend.

Postfix 3.7's smtp client never sends BDAT (its ``smtp`` binary has no BDAT command;
Postfix has CHUNKING in smtpd only), so Dovecot is the interop peer here.
"""

from __future__ import annotations

import re

import pytest_twisted
from interop_lab import Client, Dovecot, Lab, eventually, in_thread, running_mtrkmta, stuff

CONTENT = (
    b"From: sender@localhost\r\nSubject: over bdat\r\n\r\n"
    b"QUIT\r\n..a line with two dots\r\n\x80\xff eight bit\r\n"
)


class DovecotProxy(Dovecot):
    """Dovecot's LMTP as a proxy: every recipient goes to ``backend_port`` over LMTP."""

    def __init__(self, lab: Lab, backend_port: int) -> None:
        super().__init__(lab)
        self.backend_port = backend_port

    def _spawn(self, argv, cleanup) -> None:
        text = self.config.read_text()
        passdb = re.search(r"passdb \{.*?\n\}\n", text, re.DOTALL)
        assert passdb is not None
        proxy = (
            "lmtp_proxy = yes\n"
            "passdb {\n  driver = static\n"
            f"  args = proxy=y host=127.0.0.1 port={self.backend_port} nopassword=y\n}}\n"
        )
        self.config.write_text(text.replace(passdb.group(0), proxy))
        super()._spawn(argv, cleanup)


def lmtp_send(port: int) -> str:
    """One LMTP transaction with DATA to the proxy; its one reply (one recipient)."""
    with Client(port) as client:
        assert client.reply().code == 220
        client.expect("LHLO client.example.test", 250)
        client.expect("MAIL FROM:<sender@localhost>", 250)
        client.expect("RCPT TO:<gina@example.test>", 250)
        client.expect("DATA", 354)
        client.send(stuff(CONTENT))
        done = client.reply()
        client.command("QUIT")
        return str(done)


@pytest_twisted.ensureDeferred
async def test_dovecot_lmtp_proxy_sends_bdat_into_mtrkmta(lab: Lab):
    async with running_mtrkmta(lab, "from-postfix.toml") as node:
        proxy = DovecotProxy(lab, node.port("lmtp"))
        await in_thread(proxy.start)
        reply = await in_thread(lmtp_send, proxy.port)
        mailbox = node.config.data_dir / "mail" / "gina" / "new"
        (path,) = await eventually(lambda: list(mailbox.glob("*")), "gina's mail")
        delivered = path.read_bytes()
    assert reply.startswith("250 2.0.0 <gina@example.test>"), reply
    # mtrkmta's session log: the proxy's transaction used BDAT (counted as bdat=).
    log = (lab.path("mtrkmta.log")).read_text() if lab.path("mtrkmta.log").exists() else ""
    line = "lmtp disconnect from unknown[127.0.0.1] lhlo=1 mail=1 rcpt=1 bdat=1 quit=1 commands=5"
    assert line in log, log[-2000:]
    assert delivered.endswith(CONTENT.replace(b"\r\n", b"\n"))
