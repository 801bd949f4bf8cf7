"""The layer rule of docs/design.md, enforced on the imports: a module imports only from
its own layer's package or from layers below it; nothing in the package imports the test
servers; ``shardckpt/__init__.py`` (the public facade) may import any layer."""

from __future__ import annotations

import ast
import pathlib

import shardckpt

PACKAGE = pathlib.Path(shardckpt.__file__).parent

# Lowest first. Each entry is one layer; packages within one layer do not import each other.
LAYERS: list[set[str]] = [
    {"errors"},
    {"compat"},
    {"_util", "uri"},
    {"store"},
    {"format"},
    {"dcp", "retention"},
    {"engine"},
    {"tools"},
    {"cli", "integrations"},
    {"testing"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(module: str) -> str:
    """`shardckpt.format.manifest` -> `format`; `shardckpt.errors` -> `errors`."""
    return module.split(".")[1]


def _imports(path: pathlib.Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("shardckpt.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "shardckpt":
                found += [f"shardckpt.{a.name}" for a in node.names]
            elif node.module.startswith("shardckpt."):
                found.append(node.module)
    return found


def _modules() -> list[tuple[str, pathlib.Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name != "shardckpt.__init__":
            out.append((name.removesuffix(".__init__"), path))
    return out


def test_every_module_belongs_to_a_layer():
    assert {_unit(name) for name, _ in _modules()} <= set(RANK)


def _violations(name: str, imports: list[str]) -> list[str]:
    unit = _unit(name)
    return [
        f"{name} imports {imported}"
        for imported in imports
        if _unit(imported) != unit
        and (_unit(imported) not in RANK or RANK[_unit(imported)] >= RANK[unit])
    ]


def test_modules_import_only_their_own_package_or_layers_below():
    wrong = [v for name, path in _modules() for v in _violations(name, _imports(path))]
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_upward_and_sideways_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import shardckpt.engine.checkpointer\n"
        "from shardckpt import testing\n"
        "from shardckpt.retention.deletion import sweep\n"
        "from shardckpt.format.layout import Layout\n"
    )
    assert _violations("shardckpt.dcp.writer", _imports(bad)) == [
        "shardckpt.dcp.writer imports shardckpt.engine.checkpointer",
        "shardckpt.dcp.writer imports shardckpt.testing",
        "shardckpt.dcp.writer imports shardckpt.retention.deletion",
    ]
