"""What every `mtrkmta` command shares, driven through main(): --version, --help, options
in any position, two-line usage errors, quiet on a closed pipe and Ctrl-C; show-config
and example-config."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

import mtrkmta
from mtrkmta.cli.main import COMMANDS, EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, main
from mtrkmta.cli.queue import QueueOptions
from mtrkmta.cli.send import SendOptions
from mtrkmta.cli.tracking import TrackingOptions
from mtrkmta.config import load_config, setting_names

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "mtrkmta" / "config" / "example.toml"
# The commands of this branch; others may join COMMANDS, each with its own tests.
OWN = ("serve", "check-config", "show-config", "example-config", "db", "queue", "tracking")
OWN += ("send", "sent", "track")


def run(capsys, *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


# -- --version ------------------------------------------------------------------------------


def test_version_is_the_package_version(capsys):
    assert run(capsys, "--version") == (0, f"mtrkmta {mtrkmta.__version__}\n", "")
    # One source of truth: the wheel's version is read from mtrkmta.__version__.
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mtrkmta.__version__"}


@pytest.mark.parametrize("command", OWN)
def test_every_command_prints_mtrkmta_version(capsys, command):
    # `send --version` printed Twisted's version; `serve --version` too.
    assert run(capsys, command, "--version") == (0, f"mtrkmta {mtrkmta.__version__}\n", "")


# -- --help ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", OWN)
def test_help_names_the_command_as_typed_on_stdout(capsys, command):
    status, out, err = run(capsys, command, "--help")
    assert (status, err) == (0, "")
    assert (out.splitlines()[0] + " ").startswith(f"Usage: mtrkmta {command} ")
    assert "--version" in out and "twistd" not in out.splitlines()[0]


@pytest.mark.parametrize(
    ("command", "subcommands"),
    [
        ("queue", ("list", "show", "flush", "hold", "release", "delete", "bounce")),
        ("db", ("upgrade", "recover")),
        ("tracking", ("set-max-retention",)),
    ],
)
def test_help_lists_subcommands_one_line_each(capsys, command, subcommands):
    out = run(capsys, command, "--help")[1]
    listed = out.split("\nCommands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in listed if line] == list(subcommands)
    assert all(len(line.split()) > 2 for line in listed if line)  # each says what it does


def test_help_shows_only_the_options_of_the_command(capsys, monkeypatch):
    # `tracking --help` listed queue's --json and --yes, which tracking ignored.
    out = run(capsys, "tracking", "--help")[1]
    assert "--json" not in out and "--yes" not in out and "--data-dir=" in out
    assert run(capsys, "tracking", "--json", "set-max-retention", "2d")[0] == 2
    # A docstring's line breaks do not show: every option's help is one paragraph.
    monkeypatch.setenv("COLUMNS", "80")  # the width twisted.python.usage wraps to
    out = run(capsys, "serve", "--help")[1]
    assert "sharing the SMTP\n                       and submission ports [default: 1]." in out


def test_help_command_gives_a_command_s_help(capsys):
    assert run(capsys, "help", "queue") == run(capsys, "queue", "--help")
    assert run(capsys, "help", "queue")[1].startswith("Usage: mtrkmta queue ")


def test_main_help_lists_every_command(capsys):
    status, out, err = run(capsys, "--help")
    assert (status, err) == (0, "")
    commands = out.split("\ncommands:\n", 1)[1]
    for name in COMMANDS:
        assert f"\n  {name} " in "\n" + commands
    assert "--version" in out and "130" in out


# -- usage errors ---------------------------------------------------------------------------


def test_a_mistyped_option_gets_a_suggestion_on_stderr(capsys):
    assert run(capsys, "serve", "--datadir", "x") == (
        2,
        "",
        "mtrkmta serve: unknown option --datadir (did you mean --data-dir?)\n"
        "Try 'mtrkmta serve --help'.\n",
    )


@pytest.mark.parametrize("command", OWN)
def test_every_command_refuses_an_unknown_option_in_two_lines(capsys, command, tmp_path):
    status, out, err = run(capsys, command, "--no-such-option")
    # `mtrkmta track` exits 2 when a recipient failed: its usage errors are EX_USAGE, 64.
    assert (status, out) == (64 if command == "track" else 2, "")
    assert err == (
        f"mtrkmta {command}: unknown option --no-such-option\nTry 'mtrkmta {command} --help'.\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_option_without_its_value(capsys):
    assert run(capsys, "queue", "list", "--config") == (
        2,
        "",
        "mtrkmta queue: option --config needs a value\nTry 'mtrkmta queue --help'.\n",
    )


# -- options in any position ----------------------------------------------------------------


def parsed(options, *args: str):
    options.parseOptions(args)
    return options


def test_queue_options_may_follow_the_command():
    after = parsed(QueueOptions(), "show", "QID", "--config", "a.toml", "--json", "-y")
    before = parsed(QueueOptions(), "--config", "a.toml", "--json", "-y", "show", "QID")
    for options in (after, before):
        assert (options["command"], options["queue_id"]) == ("show", "QID")
        assert (options["config"], options["json"], options["yes"]) == ("a.toml", 1, 1)


def test_queue_list_reads_a_config_given_after_list(tmp_path, capsys):
    # `mtrkmta queue list --config a.toml` said "Wrong number of arguments".
    config = tmp_path / "a.toml"
    config.write_text('[server]\ndata_dir = "data"\n', encoding="utf-8")
    status, out, err = run(capsys, "queue", "list", "--config", str(config))
    assert (status, out) == (1, "")
    assert str(tmp_path / "data" / "control.sock") in err and err.count("\n") == 1
    assert run(capsys, "queue", "--config", str(config), "list") == (status, out, err)


def test_tracking_and_send_options_may_follow_their_arguments():
    options = parsed(TrackingOptions(), "set-max-retention", "2d", "--data-dir", "d")
    assert (options["seconds"], options["data-dir"]) == (2 * 86400, "d")
    options = parsed(
        SendOptions(), "msg.eml", "--server", "mx.test", "--from", "a@x.test", "--to", "b@x.test"
    )
    assert (options["message"], options["server"], options["to"]) == (
        "msg.eml",
        "mx.test",
        ["b@x.test"],
    )


def test_db_options_may_come_before_the_command(tmp_path, capsys):
    data_dir = tmp_path / "data"
    status, _, err = run(capsys, "db", "--data-dir", str(data_dir), "upgrade")
    assert (status, err) == (0, "")
    assert (data_dir / "tracking.sqlite").is_file()


# -- closed pipe, Ctrl-C --------------------------------------------------------------------


class ClosedPipe(io.StringIO):
    """Standard output whose reader went away (`| head -1` after its line)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_pipe_ends_the_command_quietly(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["example-config"]) == EXIT_BROKEN_PIPE == 141
    assert capsys.readouterr().err == ""


class Interrupted(io.BytesIO):
    """Standard input that the user gives up on with Ctrl-C."""

    def read(self, size: int | None = -1) -> bytes:
        raise KeyboardInterrupt


def test_ctrl_c_ends_the_command_quietly_with_130(monkeypatch, capsys):
    # `mtrkmta send` waits for the message on standard input.
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(Interrupted()))
    args = ["send", "--server", "127.0.0.1:1", "--from", "a@x.test", "--to", "b@x.test"]
    assert main(args) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr() == ("", "")


# -- show-config ----------------------------------------------------------------------------


def test_show_config_prints_every_setting_in_schema_order(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsys, "show-config")
    assert (status, err) == (0, "")
    keys = [line.split(" = ", 1)[0] for line in out.splitlines()]
    names = [k if not k.startswith("routes.") else "routes" for k in keys]
    assert list(dict.fromkeys(names)) == list(setting_names())
    assert f'server.data_dir = "{tmp_path / "mtrkmta-data"}"\n' in out
    assert 'limits.message_size = "35M"\n' in out  # sizes and durations as the file says them
    assert 'queue.first_retry = "5m"\n' in out
    assert 'listeners.submission = "none"\n' in out
    assert 'routes."*" = "mx"\n' in out
    assert 'tls.certificate = ""\n' in out


def test_show_config_n_prints_what_the_file_changes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "a.toml"
    config.write_text(
        '[limits]\nmessage_size = "10M"\nidle_timeout = 300\n[routes]\n"example.org" = "mx"\n',
        encoding="utf-8",
    )
    status, out, err = run(capsys, "show-config", "--config", str(config), "-n")
    assert (status, err) == (0, "")
    # idle_timeout = 300 is the default: not shown.
    assert out == ('routes."example.org" = "mx"\nroutes."*" = "mx"\nlimits.message_size = "10M"\n')
    # -d: the defaults, whatever the file says; KEY: those settings only, in schema order.
    status, out, err = run(
        capsys, "show-config", "--config", str(config), "-d", "limits.message_size", "queue"
    )
    assert out.splitlines() == [
        'limits.message_size = "35M"',
        'queue.first_retry = "5m"',
        'queue.max_retry_interval = "1h"',
        'queue.max_lifetime = "5d"',
        'queue.delay_warning = "4h"',
        'queue.content_cache = "8M"',
    ]


def test_show_config_n_loads_back_as_the_same_configuration(tmp_path, capsys):
    files = tmp_path / "etc"
    files.mkdir()
    for name in ("cert.pem", "key.pem", "users", "aliases.toml"):
        (files / name).write_text("", encoding="utf-8")
    extra = tmp_path / "extra.toml"
    extra.write_text(
        EXAMPLE.read_text(encoding="utf-8")
        .replace("[tls]\n", '[tls]\ncertificate = "etc/cert.pem"\nprivate_key = "etc/key.pem"\n')
        .replace("[auth]\n", '[auth]\nusers_file = "etc/users"\n')
        .replace("[local]\n", '[local]\naliases = "etc/aliases.toml"\n')
        .replace("\nusers = []", '\nusers = ["Ann", "bob"]'),
        encoding="utf-8",
    )
    for source in (EXAMPLE, extra):
        status, out, err = run(capsys, "show-config", "--config", str(source), "-n")
        assert (status, err) == (0, "")
        shown = tmp_path / "shown.toml"
        shown.write_text(out, encoding="utf-8")
        elsewhere = tmp_path / "elsewhere"  # no relative path is left in the output
        elsewhere.mkdir(exist_ok=True)
        moved = elsewhere / "shown.toml"
        moved.write_text(out, encoding="utf-8")
        assert load_config(moved) == load_config(source)
    assert 'tls.certificate = "' + str(files / "cert.pem") + '"\n' in out
    assert 'local.users = ["ann", "bob"]\n' in out


def test_show_config_of_an_unknown_key_suggests_one(capsys):
    assert run(capsys, "show-config", "limits.mesage_size") == (
        2,
        "",
        "mtrkmta show-config: unknown setting 'limits.mesage_size' "
        "(did you mean limits.message_size?)\n"
        "Try 'mtrkmta show-config --help'.\n",
    )


def test_show_config_d_and_n_exclude_each_other(capsys):
    status, out, err = run(capsys, "show-config", "-d", "-n")
    assert (status, out) == (2, "")
    assert err.startswith("mtrkmta show-config: -d and -n exclude each other\n")


def test_show_config_of_a_bad_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\nmesage_size = "10M"\n', encoding="utf-8")
    assert run(capsys, "show-config", "--config", str(bad)) == (
        2,
        "",
        f"mtrkmta: config error: {bad}: limits.mesage_size: unknown key; "
        "did you mean limits.message_size?\n",
    )


# -- example-config -------------------------------------------------------------------------


def test_example_config_prints_the_shipped_example_which_is_valid(tmp_path, capsys):
    status, out, err = run(capsys, "example-config")
    assert (status, err) == (0, "")
    assert out == EXAMPLE.read_text(encoding="utf-8")
    saved = tmp_path / "mtrkmta.toml"
    saved.write_text(out, encoding="utf-8")
    assert run(capsys, "check-config", str(saved)) == (
        0,
        f"{saved}: configuration is valid\n",
        "",
    )


def test_double_dash_ends_the_options_and_long_options_may_be_shortened():
    options = parsed(QueueOptions(), "show", "--conf", "a.toml", "--", "--json")
    assert (options["command"], options["queue_id"]) == ("show", "--json")
    assert (options["config"], options["json"]) == ("a.toml", 0)


def test_show_config_writes_any_string_as_toml(tmp_path, capsys):
    # Control characters, quotes, backslashes, DEL and non-ASCII survive the round trip.
    config = tmp_path / "a.toml"
    config.write_text(
        '[server]\ndatabase = "sqlite:////tmp/a\\"b\\\\c\\u007f\\u00e9\\u0001.sqlite"\n',
        encoding="utf-8",
    )
    status, out, err = run(capsys, "show-config", "--config", str(config), "server.database")
    assert (status, err) == (0, "")
    shown = tmp_path / "shown.toml"
    shown.write_text(out, encoding="utf-8")
    assert (
        load_config(shown).database
        == load_config(config).database
        == ('sqlite:////tmp/a"b\\c\x7f\xe9\x01.sqlite')
    )
