"""twistd --help lists the mtrkmta plugin from both an editable install and a wheel install.

Each test makes a fresh virtual environment and installs mtrkmta into it with
``--no-deps``. Its dependencies (Twisted and the rest) come from the environment
the tests run in, through a mirror of that environment's site-packages that
leaves mtrkmta out: ``venv --system-site-packages`` would not do, because from
inside a virtual environment it exposes the base interpreter's packages, not
the running environment's, and exposing them whole would let twistd find the
plugin installed there instead of the one under test.

The project is built from a copy of the working tree, so that neither the wheel
build nor the editable install writes ``build/`` or ``*.egg-info`` into it. The
build backend comes from pip's isolated build environment (the running
environment may have no setuptools, or one too old for this pyproject.toml).
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 180
PLUGIN = "twisted/plugins/mtrkmta_plugin.py"
MIGRATIONS = Path("mtrkmta") / "tracking" / "migrations"

# Not part of the project: virtual environments, caches and build output.
_NOT_SOURCE = {
    ".git",
    ".venv",
    ".tox",
    ".tox-bootstrap",
    ".hypothesis",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    "build",
    "dist",
    "mtrkmta-data",
    "_build",
}
# What the mirror of the running environment must not show: mtrkmta itself.
_MTRKMTA_ENTRY = re.compile(r"mtrkmta([-_.].*)?|__editable__.*|.*\.pth|.*\.egg-link", re.I)
_TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
_WHERE = (
    "import mtrkmta, twisted.plugins.mtrkmta_plugin as plugin;"
    "from mtrkmta.tracking.migrate import head_revision;"
    "print(mtrkmta.__file__); print(plugin.__file__); print(head_revision())"
)


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert proc.returncode == 0, (
        f"{args} exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


def copy_source(dest: Path) -> Path:
    """Copy the working tree without environments and build output; plant a dropin.cache."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if n in _NOT_SOURCE or n.endswith((".egg-info", ".pyc"))}

    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    # twistd writes this cache beside the plugins it scans; it must never be packaged.
    (dest / "twisted" / "plugins" / "dropin.cache").write_bytes(b"not a real cache")
    return dest


def site_dirs() -> list[Path]:
    dirs = [*site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [Path(d) for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _link_all(source: Path, dest: Path, skip: Iterable[str] = ()) -> None:
    for entry in source.iterdir():
        if entry.name not in skip and not (dest / entry.name).exists():
            (dest / entry.name).symlink_to(entry)


def dependency_mirror(dest: Path) -> Path:
    """The running environment's site-packages as symlinks, less everything of mtrkmta.

    ``twisted`` and ``twisted/plugins`` are real directories there, so that the
    mtrkmta plugin module (installed into ``twisted/plugins`` by a wheel) and
    twistd's ``dropin.cache`` stay out.
    """
    dest.mkdir()
    for source in site_dirs():
        for entry in source.iterdir():
            target = dest / entry.name
            if _MTRKMTA_ENTRY.fullmatch(entry.name) or target.exists():
                continue
            if entry.name == "twisted" and (entry / "__init__.py").is_file():
                target.mkdir()
                _link_all(entry, target, skip=("plugins", "__pycache__"))
                (target / "plugins").mkdir()
                _link_all(
                    entry / "plugins",
                    target / "plugins",
                    skip=("mtrkmta_plugin.py", "dropin.cache", "__pycache__"),
                )
            else:
                target.symlink_to(entry)
    assert (dest / "twisted" / "__init__.py").exists(), "Twisted not found in the environment"
    return dest


def new_venv(path: Path, mirror: Path) -> Path:
    """A virtual environment without pip whose only extra packages are the mirror's."""
    run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent)
    python = path / "bin" / "python"
    purelib = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        cwd=path.parent,
    ).stdout.strip()
    (Path(purelib) / "mtrkmta-test-dependencies.pth").write_text(f"{mirror}\n", encoding="utf-8")
    return python


def pip(python: Path, *args: str, cwd: Path) -> None:
    """The running environment's pip, operating on the environment of ``python``."""
    run([sys.executable, "-m", "pip", "--python", str(python), *args], cwd=cwd)


def twistd_commands(python: Path, cwd: Path) -> list[str]:
    """The plugin names twistd --help lists under "Commands"."""
    out = run([str(python), "-c", _TWISTD, "--help"], cwd=cwd).stdout
    # One command a line, indented by four; wrapped descriptions are indented further.
    return re.findall(r"^ {4}(\S+)", out.split("\nCommands:\n", 1)[1], re.M)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_source(tmp_path_factory.mktemp("source") / "mtrkmta")


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(source)], out)
    (built,) = out.glob("mtrkmta-*.whl")
    return built


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A fresh venv where mtrkmta is not installed yet, and twistd does not know it."""
    python = new_venv(tmp_path / "venv", dependency_mirror(tmp_path / "deps"))
    probe = "import importlib.util; print(importlib.util.find_spec('mtrkmta'))"
    assert run([str(python), "-c", probe], cwd=tmp_path).stdout.strip() == "None"
    commands = twistd_commands(python, tmp_path)
    assert "web" in commands  # Twisted's own plugins are found through the mirror
    assert "mtrkmta" not in commands
    return python


def test_wheel_contents(wheel: Path, source: Path):
    dist_info = wheel.name.split("-py3")[0] + ".dist-info"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert PLUGIN in names
    shipped_migrations = {
        path.relative_to(source).as_posix()
        for pattern in ("*.py", "*.mako", "versions/*.py")
        for path in (source / MIGRATIONS).glob(pattern)
    }
    assert {
        f"{MIGRATIONS.as_posix()}/env.py",
        f"{MIGRATIONS.as_posix()}/script.py.mako",
        f"{MIGRATIONS.as_posix()}/versions/0001_initial.py",
    } <= shipped_migrations
    assert shipped_migrations <= names
    # twisted/ is Twisted's package: a wheel must not own (and clobber) its __init__.py files.
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [name for name in names if name.endswith("dropin.cache")]
    assert {name.split("/")[0] for name in names} == {"mtrkmta", "twisted", dist_info}
    assert "mtrkmta = mtrkmta.cli.main:main" in entry_points
    # `mtrkmta example-config` prints it: the wheel carries no doc/.
    assert "mtrkmta/config/example.toml" in names
    assert "mtrkmta/config/mtrkmta.service" in names  # `mtrkmta example-unit` prints it
    assert "sendmail = mtrkmta.cli.sendmail:main" in entry_points
    assert "mailq = mtrkmta.cli.sendmail:mailq_main" in entry_points
    assert "newaliases = mtrkmta.cli.sendmail:newaliases_main" in entry_points


def test_twistd_finds_the_plugin_of_a_wheel_install(
    wheel: Path, venv: Path, tmp_path: Path, source: Path
):
    pip(venv, "install", "--no-deps", "--no-index", str(wheel), cwd=tmp_path)
    assert "mtrkmta" in twistd_commands(venv, tmp_path)
    package, plugin, revision = run([str(venv), "-c", _WHERE], cwd=tmp_path).stdout.split()
    site_packages = venv.parent.parent
    assert Path(package).is_relative_to(site_packages)
    assert Path(plugin).is_relative_to(site_packages)
    assert revision == "0009"
    out = run([str(venv), "-c", _TWISTD, "mtrkmta", "--help"], cwd=tmp_path).stdout
    assert "--data-dir=" in out
    # The example configuration is package data; the version has one source.
    example = run([str(venv), "-m", "mtrkmta.cli.main", "example-config"], cwd=tmp_path).stdout
    assert example == (source / "mtrkmta" / "config" / "example.toml").read_text(encoding="utf-8")
    unit = run([str(venv), "-m", "mtrkmta.cli.main", "example-unit"], cwd=tmp_path).stdout
    assert unit == (source / "mtrkmta" / "config" / "mtrkmta.service").read_text("utf-8")
    version = run([str(venv), "-m", "mtrkmta.cli.main", "--version"], cwd=tmp_path).stdout
    metadata = "import importlib.metadata as m; print('mtrkmta', m.version('mtrkmta'))"
    assert version == run([str(venv), "-c", metadata], cwd=tmp_path).stdout == "mtrkmta 0.1.0\n"
    # The sendmail command is installed beside python: a usage error is one line, status 64.
    usage = subprocess.run(
        [str(venv.parent / "sendmail"), "-R", "x", "root"], capture_output=True, text=True
    )
    assert (usage.returncode, usage.stderr) == (64, "sendmail: -R x: expected full or hdrs\n")


def test_twistd_finds_the_plugin_of_an_editable_install(source: Path, venv: Path, tmp_path):
    # compat mode puts the source tree itself on sys.path, where twistd looks for
    # twisted/plugins directories; the default finder-based mode would not.
    pip(
        venv,
        "install",
        "--no-deps",
        "--config-settings",
        "editable_mode=compat",
        "-e",
        str(source),
        cwd=tmp_path,
    )
    assert "mtrkmta" in twistd_commands(venv, tmp_path)
    package, plugin, revision = run([str(venv), "-c", _WHERE], cwd=tmp_path).stdout.split()
    assert Path(package) == source / "mtrkmta" / "__init__.py"
    assert Path(plugin) == source / PLUGIN
    assert revision == "0009"
