"""docs/design.md opens with the map of the code, one line per file: every module of the
package is on it, under its package, and it names no module that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "design.md"
PACKAGE = ROOT / "shardckpt"


def mapped_modules(text: str) -> set[str]:
    """The modules the tree block names, as paths under the package (``dcp/writer.py``)."""
    tree = text.split("```", 2)[1]
    package, found = "", set()
    for line in tree.splitlines()[1:]:  # the first line is the block's language tag
        directory = re.match(r"  (\w+)/(?:\s|$)", line)
        if directory:
            package = f"{directory.group(1)}/"
        elif re.match(r"  \S", line):  # a module at the top of the package
            package = ""
        found |= {package + name for name in re.findall(r"\b(\w+\.py)\b", line)}
    return found


def test_the_map_names_every_module_and_no_other() -> None:
    modules = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    modules -= {p for p in modules if p.endswith("/__init__.py")}  # a package's own line
    mapped = mapped_modules(DOC.read_text())
    assert not modules - mapped, f"not on the map in {DOC.name}: {sorted(modules - mapped)}"
    assert not mapped - modules, f"on the map but gone: {sorted(mapped - modules)}"


def test_the_map_reader_places_each_module_under_its_package() -> None:
    text = (
        "```\nshardckpt/\n  errors.py   x\n  dcp/   y\n    writer.py  z\n    a.py, b.py  w\n```\n"
    )
    assert mapped_modules(text) == {"errors.py", "dcp/writer.py", "dcp/a.py", "dcp/b.py"}
