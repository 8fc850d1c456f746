"""Code and tests cite RFC sections and doc/conformance.rst rows, never the unpublished list."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORD = "CHECK" + "LIST"  # built, so that this file does not match itself
SKIPPED_DIRS = frozenset({"__pycache__", ".hypothesis", ".pytest_cache", ".mypy_cache"})


def text_files(top: Path) -> list[Path]:
    """Every file under ``top`` that reads as UTF-8 text (binary files are left out)."""
    found = []
    for path in sorted(top.rglob("*")):
        if not path.is_file() or SKIPPED_DIRS.intersection(path.relative_to(top).parts):
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        found.append(path)
    return found


def citing(top: Path, base: Path = ROOT) -> list[str]:
    """``path:line`` (relative to ``base``) of every line under ``top`` naming the checklist."""
    hits = []
    for path in text_files(top):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if WORD in line:
                hits.append(f"{path.relative_to(base)}:{number}")
    return hits


def test_no_checklist_citations_in_code_or_tests():
    # The checklist is not in the repository: a maintainer who clones it cannot follow such a
    # citation (issue #15). Cite `RFC 3885 §3.1` or `doc/conformance.rst 3885-P2` instead.
    hits = citing(ROOT / "mtrkmta") + citing(ROOT / "tests")
    assert hits == []


def test_the_scan_finds_a_citation(tmp_path):
    # The scan itself works: a text file naming the checklist is reported, a binary one is not.
    (tmp_path / "cited.py").write_text(f"x = 1\n# see {WORD} 1.3.2\n", encoding="utf-8")
    (tmp_path / "clean.py").write_text("# see RFC 3885 §3.1\n", encoding="utf-8")
    (tmp_path / "blob.bin").write_bytes(b"\0" + WORD.encode())
    assert citing(tmp_path, tmp_path) == ["cited.py:2"]
