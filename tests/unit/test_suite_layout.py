"""The test tree itself: pytest imports test modules by basename (rootdir-relative
``importmode=prepend``), so two files with one name in different folders break collection
of the whole suite."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_module_has_a_name_of_its_own():
    names = Counter(path.name for path in TESTS.rglob("*.py") if path.name != "__init__.py")
    assert [name for name, count in names.items() if count > 1 and name != "conftest.py"] == []
