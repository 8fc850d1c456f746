"""`mtrkmta passwd USER`: adds or replaces one users-file entry, atomically, keeping every
other line, the file's mode and owner; its errors are one line with the exit status."""

from __future__ import annotations

import errno
import fcntl
import io
import os
import stat
from pathlib import Path

import pytest

import mtrkmta
from mtrkmta.auth import hash_password, parse_hash, parse_users, verify_password
from mtrkmta.cli.main import main as mtrkmta_main
from mtrkmta.cli.passwd import PICKUP, main, rewrite, set_entry


def passwd(*args: str, password: str = "secret") -> tuple[int, str, str]:
    """Run `mtrkmta passwd ARGS` with ``password`` on a standard input that is no terminal."""
    out, err = io.StringIO(), io.StringIO()
    status = main(list(args), stdin=io.StringIO(password + "\n"), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def hashes(path: Path) -> dict[str, str]:
    return parse_users(path.read_text("utf-8"))


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(
        "# mtrkmta users\n"
        f"alice:{hash_password('old', iterations=1000)}\n"
        "\n"
        "# bob shares the file with Dovecot\n"
        f"bob@example.test:{hash_password('bobs', iterations=1000)}:1000:1000::/home/bob::\n"
    )
    path.chmod(0o600)
    return path


# -- adding and replacing ------------------------------------------------------------------------


def test_a_new_file_is_made_with_mode_0640(tmp_path):
    path = tmp_path / "users"
    status, out, err = passwd("--users-file", str(path), "alice", password="s3cret pass")
    assert (status, err) == (0, "")
    assert out == f"mtrkmta passwd: added alice to {path}; {PICKUP}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    [(user, stored)] = hashes(path).items()
    assert user == "alice" and stored.startswith("pbkdf2-sha256$200000$")
    assert verify_password(b"s3cret pass", stored)
    assert path.read_text().count("\n") == 1


def test_a_new_user_is_added_at_the_end_keeping_everything_else(users):
    before = users.read_text()
    assert passwd("--users-file", str(users), "carol")[0] == 0
    after = users.read_text()
    assert after.startswith(before)
    [added] = after[len(before) :].splitlines()
    assert added.startswith("carol:pbkdf2-sha256$")
    assert verify_password(b"secret", hashes(users)["carol"])


def test_replacing_keeps_comments_other_lines_and_dovecot_fields(users):
    before = users.read_text().splitlines()
    status, out, _ = passwd("--users-file", str(users), "bob@example.test", password="new")
    assert status == 0
    assert out.startswith(f"mtrkmta passwd: set bob@example.test's password in {users};")
    after = users.read_text().splitlines()
    assert len(after) == len(before)
    assert [a for a, b in zip(after, before, strict=True) if a != b] == [after[4]]
    user, stored, *rest = after[4].split(":")
    assert (user, rest) == ("bob@example.test", ["1000", "1000", "", "/home/bob", "", ""])
    assert verify_password(b"new", stored)
    assert not verify_password(b"bobs", stored)


def test_the_file_s_mode_and_owner_are_kept(users):
    owner = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(users, *owner)
    users.chmod(0o604)
    assert passwd("--users-file", str(users), "alice")[0] == 0
    info = users.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o604, *owner)


def test_scheme_sha512_crypt_writes_what_dovecot_reads(users):
    assert passwd("--users-file", str(users), "--scheme", "sha512-crypt", "alice")[0] == 0
    stored = hashes(users)["alice"]
    assert stored.startswith("{SHA512-CRYPT}$6$rounds=50000$")
    assert parse_hash(stored).scheme == "SHA512-CRYPT"
    assert verify_password(b"secret", stored)


def test_a_line_the_server_refuses_is_mended_by_setting_its_password(users):
    users.write_text(users.read_text() + "carol:{PLAIN}secret\n")
    assert passwd("--users-file", str(users), "carol", password="better")[0] == 0
    assert verify_password(b"better", hashes(users)["carol"])


def test_a_problem_left_on_another_line_is_reported_after_writing(users):
    users.write_text(users.read_text() + "carol:{MD5}$1$z1AsD6ap$5/jRqTH.UxGEZI1.Ay.mJ/\n")
    status, out, err = passwd("--users-file", str(users), "alice", password="fresh")
    assert status == 1
    assert out.startswith("mtrkmta passwd: set alice's password in")
    assert err == (
        f"mtrkmta passwd: but the server refuses the file until it is fixed: {users}:6: "
        "password scheme {MD5} is too weak and refused; set a new password with "
        "'mtrkmta passwd carol'\n"
    )
    assert "carol:{MD5}" in users.read_text()  # not the command's to delete


def test_the_password_is_the_first_line_of_standard_input(users):
    status = main(
        ["--users-file", str(users), "alice"],
        stdin=io.StringIO("two words\r\nsecond line\n"),
        out=io.StringIO(),
        err=io.StringIO(),
    )
    assert status == 0
    assert verify_password(b"two words", hashes(users)["alice"])


def test_stdin_reads_a_terminal_once(users):
    # --stdin: no prompt, no second reading, even when standard input is a terminal.
    master, slave = os.openpty()
    with open(master, "wb", buffering=0) as keyboard, open(slave, encoding="utf-8") as tty:
        assert tty.isatty()
        keyboard.write(b"typed once\n")
        out, err = io.StringIO(), io.StringIO()
        assert (
            main(["--stdin", "--users-file", str(users), "alice"], stdin=tty, out=out, err=err) == 0
        )
    assert verify_password(b"typed once", hashes(users)["alice"])


def test_set_entry_keeps_line_endings_and_ends_the_last_line():
    text, replaced = set_entry("a:x\r\n# a:y\r\nb:z", "a", "H")
    assert (text, replaced) == ("a:H\r\n# a:y\r\nb:z", True)
    text, replaced = set_entry("a:x\r\n# a:y\r\nb:z", "c", "H")
    assert (text, replaced) == ("a:x\r\n# a:y\r\nb:z\nc:H\n", False)
    assert set_entry("", "c", "H") == ("c:H\n", False)


# -- atomic replacement --------------------------------------------------------------------------


def test_the_file_is_replaced_by_a_rename_leaving_no_temporary_file(users):
    inode = users.stat().st_ino
    assert passwd("--users-file", str(users), "alice")[0] == 0
    assert users.stat().st_ino != inode  # a new file renamed over the old
    assert sorted(p.name for p in users.parent.iterdir()) == ["users"]


def test_a_failure_before_the_rename_leaves_the_old_file_untouched(users):
    before = users.read_text()

    def fail(text: str) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        rewrite(users, fail)
    assert users.read_text() == before
    assert sorted(p.name for p in users.parent.iterdir()) == ["users"]


def test_a_symbolic_link_s_target_is_rewritten_and_the_link_kept(users, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(users)
    assert passwd("--users-file", str(link), "alice", password="via link")[0] == 0
    assert link.is_symlink()
    assert verify_password(b"via link", hashes(users)["alice"])


def test_concurrent_runs_wait_for_each_other(users):
    # While one run rewrites the file it holds the directory's lock: another waits.
    tried: list[int] = []

    def update(text: str) -> str:
        other = os.open(users.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            tried.append(error.errno)
        finally:
            os.close(other)
        return text

    rewrite(users, update)
    assert tried == [errno.EWOULDBLOCK]


# -- errors: one line, and the exit status -------------------------------------------------------


def test_without_a_users_file_the_error_names_auth_users_file(tmp_path):
    assert passwd("alice") == (
        2,
        "",
        "mtrkmta passwd: no users file: give --users-file FILE, or --config FILE with "
        "auth.users_file set\n",
    )
    config = tmp_path / "mtrkmta.toml"
    config.write_text('[server]\ndata_dir = "spool"\n')
    status, out, err = passwd("--config", str(config), "alice")
    assert (status, out) == (2, "")
    assert "auth.users_file" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mtrkmta.toml"]


def test_the_config_s_users_file_is_written(users, tmp_path):
    config = tmp_path / "mtrkmta.toml"
    config.write_text(f'[auth]\nusers_file = "{users}"\n')
    status, _, err = passwd("--config", str(config), "alice", password="from config")
    assert (status, err) == (0, "")
    assert verify_password(b"from config", hashes(users)["alice"])


def test_a_broken_config_is_one_line(tmp_path):
    config = tmp_path / "mtrkmta.toml"
    config.write_text("[auth]\nuser_file = 'x'\n")
    status, out, err = passwd("--config", str(config), "alice")
    assert (status, out) == (2, "")
    assert err.startswith(f"mtrkmta passwd: config error: {config}") and err.count("\n") == 1


def test_an_empty_password_is_refused_and_nothing_written(users):
    before = users.read_text()
    assert passwd("--users-file", str(users), "alice", password="") == (
        1,
        "",
        "mtrkmta passwd: empty password refused; nothing written\n",
    )
    assert users.read_text() == before


def test_a_directory_that_is_missing_is_named(tmp_path):
    path = tmp_path / "no" / "users"
    status, out, err = passwd("--users-file", str(path), "alice")
    assert (status, out) == (1, "")
    assert err == (
        f"mtrkmta passwd: cannot write {path}: No such file or directory; nothing written\n"
    )


NAME_RULE = "it must not be empty, start with '#', or hold ':' or white space"


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["-u", "alice", "bob"], "give one USER"),
        (["-u"], "give one USER"),
        (["-u", "a:b"], f"user name 'a:b' cannot be written: {NAME_RULE}"),
        (["-u", "a b"], f"user name 'a b' cannot be written: {NAME_RULE}"),
        (["-u", "#a"], f"user name '#a' cannot be written: {NAME_RULE}"),
        (
            ["-u", "--scheme", "MD5", "a"],
            "unknown --scheme 'MD5' (use pbkdf2-sha256 or SHA512-CRYPT)",
        ),
        (["-u", "--config", "c.toml", "alice"], "give --users-file or --config, not both"),
        (["-u", "alice", "--scheme"], "option --scheme needs a value"),
        (["--user-file", "u", "alice"], "unknown option --user-file (did you mean --users-file?)"),
    ],
)
def test_usage_errors_are_two_lines_and_exit_2(tmp_path, args, problem):
    users = str(tmp_path / "users")
    args = [arg for a in args for arg in (["--users-file", users] if a == "-u" else [a])]
    status, out, err = passwd(*args)
    assert (status, out) == (2, "")
    assert err == f"mtrkmta passwd: {problem}\nTry 'mtrkmta passwd --help'.\n"
    assert list(tmp_path.iterdir()) == []


def test_the_command_is_listed_and_has_help_and_version(capsys):
    assert mtrkmta_main(["passwd", "--version"]) == 0
    assert capsys.readouterr().out == f"mtrkmta {mtrkmta.__version__}\n"
    assert mtrkmta_main(["passwd", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("Usage: mtrkmta passwd [--users-file FILE | --config FILE]")
    assert "--stdin" in help_text and "SHA512-CRYPT" in help_text
    assert mtrkmta_main(["--help"]) == 0
    assert "\n  passwd [--users-file FILE" in capsys.readouterr().out


def test_a_users_file_that_is_not_utf8_is_named_and_left_alone(users):
    users.write_bytes(b"alice:\xff\n")
    status, out, err = passwd("--users-file", str(users), "alice")
    assert (status, out) == (1, "")
    assert err == f"mtrkmta passwd: {users} is not UTF-8 text; nothing written\n"
    assert users.read_bytes() == b"alice:\xff\n"
    assert sorted(p.name for p in users.parent.iterdir()) == ["users"]


def test_a_password_that_is_not_text_is_refused(users):
    before = users.read_text()
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe\n"), encoding="utf-8")
    err = io.StringIO()
    assert main(["--users-file", str(users), "alice"], stdin=stdin, out=io.StringIO(), err=err) == 1
    assert err.getvalue() == "mtrkmta passwd: the password is not utf-8 text; nothing written\n"
    assert users.read_text() == before
