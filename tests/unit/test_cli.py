"""The `mtrkmta` command, run in-process: check-config, db upgrade and recover, serve, unknown
commands."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

from mtrkmta.cli.main import main
from mtrkmta.tracking.migrate import head_revision

EXAMPLE = Path(__file__).resolve().parents[2] / "mtrkmta" / "config" / "example.toml"


def test_check_config_accepts_the_shipped_example(capsys):
    assert main(["check-config", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{EXAMPLE}: configuration is valid\n"
    assert err == ""


def test_check_config_names_file_and_key_of_a_mistake(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\nmesage_size = "10M"\n', encoding="utf-8")
    assert main(["check-config", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"mtrkmta: config error: {bad}: limits.mesage_size: unknown key; "
        "did you mean limits.message_size?\n"
    )


def test_check_config_reports_a_bad_value(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\nmessage_size = "9x"\n', encoding="utf-8")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mtrkmta: config error: {bad}: limits.message_size: ")
    assert "'9x'" in err


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[local]\nmailbox = "{local.foo}{local}"\n', "local.mailbox"),
        (f"[queue]\nmax_lifetime = {'9' * 400}\n", "queue.max_lifetime"),
    ],
)
def test_check_config_never_crashes_on_a_bad_value(tmp_path, capsys, text, key):
    # Once an AttributeError and an OverflowError with a traceback: one line, status 2.
    bad = tmp_path / "bad.toml"
    bad.write_text(text, encoding="utf-8")
    assert main(["check-config", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"mtrkmta: config error: {bad}: {key}: ")
    assert err.count("\n") == 1


def test_check_config_of_a_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    assert main(["check-config", str(missing)]) == 2
    assert capsys.readouterr().err == f"mtrkmta: config error: {missing}: no such file\n"


def test_check_config_creates_nothing(tmp_path, monkeypatch, capsys):
    # The example names /var/lib/mtrkmta; checking must not create it, nor ./mtrkmta-data.
    monkeypatch.chdir(tmp_path)
    assert main(["check-config", str(EXAMPLE)]) == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [[], ["one.toml", "two.toml"]])
def test_check_config_wants_exactly_one_file(args, capsys):
    assert main(["check-config", *args]) == 2
    assert capsys.readouterr().err == (
        "mtrkmta check-config: give one configuration FILE\nTry 'mtrkmta check-config --help'.\n"
    )


def test_unknown_command_exits_two_in_two_lines(capsys):
    assert main(["frobnicate"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "mtrkmta: unknown command 'frobnicate'\nTry 'mtrkmta --help'.\n"


def test_a_mistyped_command_gets_a_suggestion(capsys):
    assert main(["sevre", "--data-dir", "x"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "mtrkmta: unknown command 'sevre' (did you mean serve?)\nTry 'mtrkmta --help'.\n"


def test_no_command_is_a_usage_error_in_two_lines(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    problem, help_line = err.splitlines()
    assert problem.startswith("mtrkmta: no command given (serve, check-config, ")
    assert help_line == "Try 'mtrkmta --help'."


@pytest.mark.parametrize("flag", ["-h", "--help", "help"])
def test_help_exits_zero(flag, capsys):
    assert main([flag]) == 0
    out = capsys.readouterr().out
    for command in ("serve", "check-config FILE", "db upgrade", "db recover"):
        assert command in out


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    conn.close()
    assert version == [(head_revision(),)]
    return {name for (name,) in rows}


def test_db_upgrade_creates_the_schema(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    database = tmp_path / "tracking.sqlite"
    assert main(["db", "upgrade", "--database", f"sqlite:///{database}"]) == 0
    assert capsys.readouterr().out == f"tracking database at revision {head_revision()}\n"
    assert {"messages", "recipients", "alembic_version"} <= _tables(database)
    # Running it again is harmless: the database is already at the head revision.
    assert main(["db", "upgrade", "--database", f"sqlite:///{database}"]) == 0
    assert capsys.readouterr().out == f"tracking database at revision {head_revision()}\n"


def test_db_upgrade_uses_the_data_dir_default_database(tmp_path, capsys):
    data_dir = tmp_path / "data"
    assert main(["db", "upgrade", "--data-dir", str(data_dir)]) == 0
    assert {"messages", "recipients"} <= _tables(data_dir / "tracking.sqlite")
    assert data_dir.stat().st_mode & 0o777 == 0o700


def test_db_upgrade_reads_the_config_file(tmp_path, capsys):
    config = tmp_path / "mtrkmta.toml"
    config.write_text('[server]\ndata_dir = "state"\n', encoding="utf-8")
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert {"messages", "recipients"} <= _tables(tmp_path / "state" / "tracking.sqlite")


def test_db_upgrade_rejects_an_unknown_option(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["db", "upgrade", "--frobnicate"]) == 2
    assert capsys.readouterr().err == (
        "mtrkmta db: unknown option --frobnicate\nTry 'mtrkmta db --help'.\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_db_upgrade_rejects_a_bad_database_url(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["db", "upgrade", "--database", "not a url"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtrkmta: config error: --database: expected an SQLAlchemy database URL")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [[], ["downgrade"]])
def test_db_without_upgrade_or_recover_is_a_usage_error(args, capsys):
    assert main(["db", *args]) == 2
    problem, help_line = capsys.readouterr().err.splitlines()
    assert problem.startswith("mtrkmta db: expected upgrade or recover")
    assert help_line == "Try 'mtrkmta db --help'."


def test_db_recover_rejects_an_unknown_option(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["db", "recover", "--frobnicate"]) == 2
    assert capsys.readouterr().err == (
        "mtrkmta db: unknown option --frobnicate\nTry 'mtrkmta db --help'.\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_db_recover_rejects_a_bad_database_url(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["db", "recover", "--database", "not a url"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtrkmta: config error: --database: expected an SQLAlchemy database URL")
    assert list(tmp_path.iterdir()) == []


def test_db_recover_takes_no_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["db", "recover", "now"]) == 2
    assert capsys.readouterr().err == (
        "mtrkmta db: expected upgrade or recover, got 'recover now'\nTry 'mtrkmta db --help'.\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_db_recover_refuses_an_undamaged_database(tmp_path, capsys):
    database = tmp_path / "tracking.sqlite"
    assert main(["db", "upgrade", "--database", f"sqlite:///{database}"]) == 0
    before = database.read_bytes()
    capsys.readouterr()
    assert main(["db", "recover", "--data-dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"mtrkmta: tracking database {database} is not damaged (PRAGMA quick_check: ok); "
        "db recover would throw its history away: nothing done (--force rebuilds it)\n"
    )
    assert database.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tracking.sqlite"]


def test_db_upgrade_of_a_damaged_database_names_it_and_the_way_out(tmp_path, capsys):
    database = tmp_path / "tracking.sqlite"
    url = f"sqlite:///{database}"
    assert main(["db", "upgrade", "--database", url]) == 0
    capsys.readouterr()
    with open(database, "r+b") as f:
        f.write(bytes(100))  # the header: "SQLite format 3" and the page size are gone
    assert main(["db", "upgrade", "--database", url]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"mtrkmta: tracking database {database} is damaged (file is not a database); "
        f"stop mtrkmta and run: mtrkmta db recover --database {url}\n"
    )


def test_serve_stops_on_a_bad_option_before_touching_disk(tmp_path, monkeypatch, capsys):
    # `mtrkmta serve` hands over to twistd, which runs the same option checks as the plugin.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # serve() replaces sys.argv
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--data-dir", str(tmp_path / "data"), "--smtp", "bogus:endpoint"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mtrkmta: config error: --smtp: expected a server endpoint description")
    assert "'bogus:endpoint'" in err
    assert list(tmp_path.iterdir()) == []


def test_db_recover_failure_is_one_line(tmp_path, capsys):
    database = tmp_path / "no such directory" / "tracking.sqlite"
    assert (
        main(["db", "recover", "--data-dir", str(tmp_path), "--database", f"sqlite:///{database}"])
        == 1
    )
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        err
        == "mtrkmta: db recover failed: (sqlite3.OperationalError) unable to open database file\n"
    )
    assert list(tmp_path.iterdir()) == []
