"""The README's method table, generated from the method registry so it cannot drift from the code.

    python -m peftc.docs            # rewrite the table in README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from peftc.method import ANY, PARTS, Method
from peftc.passes import METHODS

BEGIN, END = "<!-- method-table:begin (python -m peftc.docs) -->", "<!-- method-table:end -->"


def _kinds(method: Method, kinds: tuple[str, ...] | list[str]) -> str:
    return ", ".join(dict.fromkeys(method.layer_types[k] for k in kinds))


def _mixed(method: Method) -> str:
    batched = type(method).emit_mixed is not Method.emit_mixed
    return "gather + bmm" if batched else "per-sample select"


def method_table() -> str:
    """A markdown table: method (and config-selected variant) x layer types x mergeable x mixed batches."""
    rows = ["| method | layer types | mergeable (fold) | mixed batches | PEFT checkpoint keys |",
            "|---|---|---|---|---|"]
    for peft_type, method in METHODS.items():
        groups = ", ".join(f"`{g}`" for g in method.groups)
        merge = "yes" if method.mergeable else "no"
        # the kinds adapted at an op; the rest (rebound parameters, module copies) come with their variant
        at_ops = [k for k in method.layer_types if method.site_ops[k]]
        rows.append(f"| {peft_type} | {_kinds(method, at_ops)} | {merge} | {_mixed(method)} "
                    f"| {groups} |")
        for variant, kinds in method.variants.items():
            shown = "no" if variant in method.unmergeable_variants else merge
            rows.append(f"| {peft_type}: {variant} | {_kinds(method, kinds)} | {shown} | | |")
    for part in PARTS.get(ANY, []):  # parts of every method whose config has their field
        merge = "yes" if part.mergeable else "no"
        rows.append(f"| every method with `{part.part_of_field}`: {part.description} "
                    f"| {_kinds(part, list(part.layer_types))} | {merge} | | |")
    return "\n".join(rows)


def with_table(readme: str) -> str:
    """`readme` with the text between the table markers replaced by the current table."""
    head, sep, rest = readme.partition(BEGIN)
    _, sep_end, tail = rest.partition(END)
    if not sep or not sep_end:
        raise ValueError(f"README has no {BEGIN} ... {END} block")
    return f"{head}{BEGIN}\n{method_table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    path = Path(argv[0] if argv else "README.md")
    path.write_text(with_table(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
