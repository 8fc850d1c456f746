"""`mtrkmta check-config` is a dry run of what start-up loads: aliases, TLS pair,
database dialect, users file. Each problem is one line naming the file or key, status 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from certs import pem_pair

from mtrkmta.auth import hash_password
from mtrkmta.cli.main import main


def check(tmp_path: Path, toml: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "mtrkmta.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n{toml}')
    status = main(["check-config", str(path)])
    err = capsys.readouterr().err
    return status, err


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_broken_aliases_file_is_named(tmp_path, capsys):
    aliases = tmp_path / "aliases.toml"
    aliases.write_text('[alias.postmaster]\nto = "root"\n[alias.bad\n')
    status, err = check(tmp_path, f'[local]\naliases = "{aliases}"\n', capsys)
    assert status == 2
    assert f"local.aliases {aliases}" in one_line(err)
    assert not (tmp_path / "data").exists()  # a dry run: nothing created


def test_a_misspelt_alias_key_gets_did_you_mean(tmp_path, capsys):
    aliases = tmp_path / "aliases.toml"
    aliases.write_text('[alias.postmaster]\nto = ["root"]\nprimray = "root"\n')
    status, err = check(tmp_path, f'[local]\naliases = "{aliases}"\n', capsys)
    assert status == 2
    assert one_line(err).endswith("alias.postmaster.primray: unknown key; did you mean primary?")


def test_a_key_that_does_not_match_the_certificate_names_both_files(tmp_path, capsys):
    cert_pem, key_pem = pem_pair("mx.example.test")
    _, other_key_pem = pem_pair("other.example.test")  # another key
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    toml = f'[tls]\ncertificate = "{cert}"\nprivate_key = "{key}"\n'
    assert check(tmp_path, toml, capsys) == (0, "")  # the certificate's own key passes
    key.write_bytes(other_key_pem)
    status, err = check(tmp_path, toml, capsys)
    assert status == 2
    line = one_line(err)
    assert str(cert) in line and str(key) in line
    assert "the key does not belong to the certificate" in line


def test_an_unknown_database_dialect_is_named(tmp_path, capsys):
    status, err = check(tmp_path, 'database = "foo://bar"\n', capsys)
    assert status == 2
    assert "server.database 'foo://bar'" in one_line(err)


def test_a_broken_users_file_is_named(tmp_path, capsys):
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('secret', iterations=1000)}\nbob-no-hash\n")
    status, err = check(tmp_path, f'[auth]\nusers_file = "{users}"\n', capsys)
    assert status == 2
    assert f"auth.users_file {users}:2" in one_line(err)
