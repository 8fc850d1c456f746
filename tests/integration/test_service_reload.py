"""SIGHUP on a real `mtrkmta serve` process: new certificate, users file and routes for new
connections, open sessions untouched, and a failed reload that keeps everything as it was."""

from __future__ import annotations

import base64
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from certs import pem_pair
from servprocess import ServeProcess

from mtrkmta.auth import hash_password
from mtrkmta.testing import database_url

HOSTNAME = "mx.example.test"
RELOADED = r"reloaded: TLS certificate "
FAILED = r"reload failed, the previous configuration stays: "


def der(cert_pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert_pem.decode())


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test compares the certificate itself
    return context


def starttls(port: int) -> tuple[smtplib.SMTP, bytes]:
    """An SMTP session after STARTTLS, and the certificate the server showed (DER)."""
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=10)
    client.starttls(context=client_context())
    client.ehlo("client.example")
    assert isinstance(client.sock, ssl.SSLSocket)
    peer = client.sock.getpeercert(binary_form=True)
    assert peer is not None
    return client, peer


def auth_plain(client: smtplib.SMTP, user: str, password: str) -> int:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    code, _ = client.docmd("AUTH", f"PLAIN {token}")
    return code


class Node:
    """The files of one node: its configuration file, certificate, key and users files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.certificate = root / "cert.pem"
        self.private_key = root / "key.pem"
        self.config = root / "mtrkmta.toml"
        self.users_a = root / "users-a"
        self.users_b = root / "users-b"
        self.users_a.write_text(f"alice:{hash_password('alice-pw', iterations=1000)}\n")
        self.users_b.write_text(f"bob:{hash_password('bob-pw', iterations=1000)}\n")
        self.use_pair("a.example.test")
        self.write_config(self.users_a, {})

    def use_pair(self, name: str) -> bytes:
        cert_pem, key_pem = pem_pair(name)
        self.certificate.write_bytes(cert_pem)
        self.private_key.write_bytes(key_pem)
        return der(cert_pem)

    def write_config(self, users: Path, routes: dict[str, str]) -> None:
        lines = [
            "[tls]",
            f'certificate = "{self.certificate}"',
            f'private_key = "{self.private_key}"',
            "[auth]",
            f'users_file = "{users}"',
            "[routes]",
            *(f'"{domain}" = "{target}"' for domain, target in routes.items()),
        ]
        self.config.write_text("\n".join(lines) + "\n")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Node, ServeProcess, int]]:
    files = Node(tmp_path)
    data = tmp_path / "data"
    process = ServeProcess(
        [
            "--config", str(files.config),
            "--data-dir", str(data), "--database", database_url(data),
            "--smtp", "tcp:0:interface=127.0.0.1", "--lmtp", "none", "--mtqp", "none",
            "--hostname", HOSTNAME, "--local-domain", "example.test",
        ],
        cwd=tmp_path,
    )  # fmt: skip
    try:
        yield files, process, process.port()
    finally:
        process.stop()


def test_sighup_serves_the_new_certificate_to_new_sessions_only(
    node: tuple[Node, ServeProcess, int],
) -> None:
    files, process, port = node
    cert_a = der(pem_pair("a.example.test")[0])
    before, shown = starttls(port)
    assert shown == cert_a
    cert_b = files.use_pair("b.example.test")
    process.reload()
    process.wait_for(RELOADED + str(files.certificate))
    after, shown = starttls(port)
    assert shown == cert_b
    assert after.noop()[0] == 250
    after.quit()
    # The session opened before the reload goes on with certificate A.
    assert isinstance(before.sock, ssl.SSLSocket)
    assert before.sock.getpeercert(binary_form=True) == cert_a
    assert before.noop()[0] == 250
    assert before.mail("someone@client.example")[0] == 250
    before.quit()


def test_a_key_that_does_not_match_keeps_the_old_certificate(
    node: tuple[Node, ServeProcess, int],
) -> None:
    files, process, port = node
    cert_a = der(pem_pair("a.example.test")[0])
    files.private_key.write_bytes(pem_pair("b.example.test")[1])  # another certificate's key
    process.reload()
    line = process.wait_for(FAILED).string
    assert str(files.private_key) in line and "does not belong to the certificate" in line
    session, shown = starttls(port)
    assert shown == cert_a
    session.quit()
    # One line, and nothing reloaded.
    assert not any("reloaded:" in seen for seen in process.seen)
    assert sum("reload failed" in seen for seen in process.seen) == 1


def test_a_broken_users_file_keeps_the_old_one_and_the_old_certificate(
    node: tuple[Node, ServeProcess, int],
) -> None:
    files, process, port = node
    cert_a = der(pem_pair("a.example.test")[0])
    files.use_pair("b.example.test")  # a good new certificate, but ...
    files.users_b.write_text("bob has no hash\n")
    files.write_config(files.users_b, {})  # ... a users file that does not parse
    process.reload()
    line = process.wait_for(FAILED).string
    assert f"auth.users_file {files.users_b}:1:" in line
    session, shown = starttls(port)
    assert shown == cert_a  # all or nothing: the certificate stays too
    assert auth_plain(session, "alice", "alice-pw") == 235
    session.quit()


def test_a_broken_configuration_file_keeps_everything(
    node: tuple[Node, ServeProcess, int],
) -> None:
    files, process, port = node
    cert_a = der(pem_pair("a.example.test")[0])
    files.use_pair("b.example.test")
    files.config.write_text(files.config.read_text() + "[limits]\nmessage_sise = 10\n")
    process.reload()
    line = process.wait_for(FAILED).string
    assert line.endswith(
        f"stays: config error: {files.config}: limits.message_sise: unknown key; "
        "did you mean limits.message_size?"
    )
    session, shown = starttls(port)
    assert shown == cert_a
    session.quit()


def test_sighup_switches_to_the_users_file_the_config_now_names(
    node: tuple[Node, ServeProcess, int],
) -> None:
    files, process, port = node
    session, _ = starttls(port)
    assert auth_plain(session, "bob", "bob-pw") == 535
    session.quit()
    files.write_config(files.users_b, {})
    process.reload()
    process.wait_for(r"reloaded: .*users file " + str(files.users_b))
    session, _ = starttls(port)
    assert auth_plain(session, "bob", "bob-pw") == 235
    session.quit()
    session, _ = starttls(port)
    assert auth_plain(session, "alice", "alice-pw") == 535
    session.quit()


def test_sighup_applies_new_routes_and_names_settings_that_need_a_restart(
    node: tuple[Node, ServeProcess, int],
) -> None:
    files, process, port = node
    session = smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=10)
    session.ehlo("client.example")
    assert session.mail("someone@client.example")[0] == 250
    assert session.rcpt("carol@partner.example")[0] == 554  # relay access denied
    session.rset()
    files.write_config(files.users_a, {"partner.example": "smtp:tcp:host=127.0.0.1:port=9"})
    text = files.config.read_text()
    files.config.write_text(text.replace("[tls]", "[limits]\nmessage_size = 1000\n[tls]"))
    process.reload()
    process.wait_for(r"reloaded: .* 2 route\(s\)")
    process.wait_for(
        r"reload: changed settings need a restart to take effect: limits\.message_size$"
    )
    fresh = smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=10)
    fresh.ehlo("client.example")
    assert fresh.mail("someone@client.example")[0] == 250
    assert fresh.rcpt("carol@partner.example")[0] == 250
    assert fresh.esmtp_features["size"] != "1000"  # limits.message_size waits for a restart
    fresh.quit()
    session.quit()


def test_the_master_passes_sighup_on_to_its_workers(tmp_path: Path) -> None:
    files = Node(tmp_path)
    data = tmp_path / "data"
    process = ServeProcess(
        [
            "--config", str(files.config),
            "--data-dir", str(data), "--database", database_url(data),
            "--smtp", "tcp:0:interface=127.0.0.1", "--lmtp", "none", "--mtqp", "none",
            "--hostname", HOSTNAME, "--local-domain", "example.test", "--workers", "2",
        ],
        cwd=tmp_path,
    )  # fmt: skip
    try:
        process.wait_for(r"worker 1: smtp accepting on")
        files.write_config(files.users_b, {})
        process.reload()
        reloaded = [process.wait_for(r"reloaded: ").string for _ in range(2)]
        assert sum("worker 1" in line for line in reloaded) == 1, reloaded
        assert all(f"users file {files.users_b}" in line for line in reloaded)
        assert process.proc.poll() is None
    finally:
        process.stop()
