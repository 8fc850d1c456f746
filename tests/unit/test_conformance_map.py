"""doc/conformance.rst names real tests and real code, and covers every RFC it promises."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "doc" / "conformance.rst"

# Every RFC the page must cover, each with a section labelled conformance-rfcNNNN.
RFCS = (
    "3885",
    "3886",
    "3887",
    "3461",
    "3464",
    "6522",
    "2033",
    "5321",
    "6531",
    "4954",
    "3030",
    "2852",
    "8461",
)

LABEL = re.compile(r"^\.\. _conformance-rfc(\d{4}):$")
ROW_START = re.compile(r"^   \* - (.*)$")
CELL_START = re.compile(r"^     - (.*)$")
CELL_MORE = re.compile(r"^       (.*)$")
ROW_ID = re.compile(r"^(\d{4})-(?:\d+(?:\.\d+)*-[a-z]|P\d+)$")
TEST_REF = re.compile(r"``(tests/[\w/]+\.py)::([\w:]+)``")
LITERAL = re.compile(r"``([^`]+)``")


@dataclass(frozen=True)
class Row:
    rfc: str  # the RFC of the section the row sits in
    cells: dict[str, str]  # column header -> cell text
    line: int


def rows(text: str) -> list[Row]:
    """Every list-table row of the page, as header -> cell text, with its section's RFC."""
    found: list[Row] = []
    rfc = ""
    header: list[str] = []
    current: list[str] | None = None
    start = 0

    def finish() -> None:
        if current is None:
            return
        if current[0] == "Id":
            header[:] = current
        else:
            found.append(Row(rfc, dict(zip(header, current, strict=True)), start))

    for number, line in enumerate(text.splitlines(), 1):
        if label := LABEL.match(line):
            finish()
            current, rfc = None, label.group(1)
        elif row := ROW_START.match(line):
            finish()
            current, start = [row.group(1)], number
        elif current is not None and (cell := CELL_START.match(line)):
            current.append(cell.group(1))
        elif current is not None and (more := CELL_MORE.match(line)):
            current[-1] += "\n" + more.group(1)
        elif current is not None and line.strip():
            finish()
            current = None
    finish()
    return found


@cache
def page_rows() -> tuple[Row, ...]:
    return tuple(rows(PAGE.read_text(encoding="utf-8")))


@cache
def definitions(path: Path) -> frozenset[str]:
    """Names defined in a module: top-level ``name`` and ``Class.name`` (also nested classes)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(prefix + node.name)
            elif isinstance(node, ast.ClassDef):
                names.add(prefix + node.name)
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, ast.Assign):
                names.update(prefix + t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(prefix + node.target.id)

    visit(tree.body, "")
    return frozenset(names)


def test_rows_parse_with_the_columns_of_the_page():
    assert len(page_rows()) > 100
    for row in page_rows():
        assert set(row.cells) in (
            {"Id", "Requirement", "Section", "Implemented in", "Tested by"},
            {"Id", "Decision (and why)", "Implemented in", "Tested by"},
        ), row


def test_every_rfc_has_its_section():
    labels = [m.group(1) for line in PAGE.read_text().splitlines() if (m := LABEL.match(line))]
    assert sorted(labels) == sorted(RFCS)


@pytest.mark.parametrize("rfc", RFCS)
def test_every_rfc_has_requirement_rows(rfc):
    assert any(row.rfc == rfc and "Requirement" in row.cells for row in page_rows())


def test_row_ids_are_well_formed_unique_and_in_their_rfcs_section():
    ids = [row.cells["Id"] for row in page_rows()]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"row ids used twice in {PAGE}: {duplicates}"
    for row in page_rows():
        match = ROW_ID.match(row.cells["Id"])
        assert match, f"{PAGE}:{row.line}: bad row id {row.cells['Id']!r}"
        assert match.group(1) == row.rfc, f"{PAGE}:{row.line}: row outside its RFC's section"


def test_every_row_names_a_test_or_says_why_not():
    for row in page_rows():
        tested = row.cells["Tested by"]
        assert TEST_REF.search(tested) or tested.startswith(
            ("not implemented", "not met", "does not apply", "no test")
        ), f"{PAGE}:{row.line}: {row.cells['Id']} names no test and gives no reason"


def test_every_named_test_exists():
    refs = TEST_REF.findall(PAGE.read_text(encoding="utf-8"))
    assert len(refs) > 200
    missing = []
    for path, name in refs:
        file = ROOT / path
        if not file.is_file() or name.replace("::", ".") not in definitions(file):
            missing.append(f"{path}::{name}")
        elif not name.rsplit("::", 1)[-1].startswith("test_"):
            missing.append(f"{path}::{name} (not a test)")
    assert not missing, f"{PAGE} names tests that do not exist: {missing}"


def test_every_named_module_and_definition_exists():
    missing = []
    for row in page_rows():
        cell = row.cells["Implemented in"]
        if not cell.startswith("``mtrkmta/"):
            continue
        for part in cell.split(";"):
            path, *names = LITERAL.findall(part)
            file = ROOT / path
            if not file.is_file():
                missing.append(f"{row.cells['Id']}: {path}")
                continue
            missing.extend(
                f"{row.cells['Id']}: {path} {name}"
                for name in names
                if name not in definitions(file)
            )
    assert not missing, f"{PAGE} names code that does not exist: {missing}"


def test_the_parser_sees_a_missing_test():
    text = (
        ".. _conformance-rfc3885:\n\n"
        ".. list-table::\n\n"
        "   * - Id\n     - Requirement\n     - Section\n     - Implemented in\n"
        "     - Tested by\n"
        "   * - 3885-2-a\n     - r\n     - §2\n     - ``mtrkmta/smtp/mtrk.py`` ``no_such``\n"
        "     - * ``tests/unit/test_conformance_map.py::test_no_such_test``\n"
        "       * ``tests/unit/test_conformance_map.py::test_every_named_test_exists``\n"
    )
    (row,) = rows(text)
    assert row.rfc == "3885" and row.cells["Id"] == "3885-2-a"
    refs = TEST_REF.findall(row.cells["Tested by"])
    assert [name in definitions(ROOT / path) for path, name in refs] == [False, True]
    assert "no_such" not in definitions(ROOT / "mtrkmta" / "smtp" / "mtrk.py")
