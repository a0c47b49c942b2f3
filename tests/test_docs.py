"""The README's method table is the registry's: regenerate it with `python -m peftc.docs`."""

from pathlib import Path

import pytest
from peftc.passes import METHODS

from peftc.docs import BEGIN, END, method_table, with_table
from peftc.method import ANY, PARTS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_method_table_is_current():
    text = README.read_text()
    assert f"{BEGIN}\n{method_table()}\n{END}" in text, "README method table is stale: run python -m peftc.docs"


def test_table_lists_every_registered_method_and_variant():
    rows = method_table().splitlines()[2:]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows if ":" not in r.split(" | ")[0]] == list(METHODS)
    generic = len(PARTS.get(ANY, []))  # a row each for the parts of every method (modules_to_save)
    assert sum(len(m.variants) for m in METHODS.values()) + generic == sum(":" in r.split(" | ")[0] for r in rows)
    assert all(r.startswith("| every method with") for r in rows[len(rows) - generic:])


def test_a_readme_without_markers_is_an_error():
    with pytest.raises(ValueError, match="method-table"):
        with_table("# no table here\n")
