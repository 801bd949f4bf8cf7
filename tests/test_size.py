"""Small modules and short functions, so that a newcomer can read the package in an hour:
no module of ``shardckpt/`` over ``MAX_MODULE_LINES`` lines, no function over
``MAX_FUNCTION_LINES`` lines unless its docstring says why ("Long because ...")."""

from __future__ import annotations

import ast
import pathlib

import shardckpt

PACKAGE = pathlib.Path(shardckpt.__file__).parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
REASON = "Long because"


def _offenders(path: pathlib.Path, name: str) -> list[str]:
    """What in the module at ``path`` (shown as ``name``) is over the limits."""
    text = path.read_text()
    found = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = (node.end_lineno or node.lineno) - node.lineno + 1
        if length > MAX_FUNCTION_LINES and REASON not in " ".join(
            (ast.get_docstring(node) or "").split()
        ):
            found.append(
                f"{name}:{node.lineno} {node.name}: {length} lines (at most "
                f"{MAX_FUNCTION_LINES}, or a docstring saying {REASON!r} ...)"
            )
    return found


def test_modules_and_functions_are_small():
    modules = {path.relative_to(PACKAGE).as_posix(): path for path in PACKAGE.rglob("*.py")}
    wrong = [o for name, path in sorted(modules.items()) for o in _offenders(path, name)]
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_long_modules_and_functions(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    long = tmp_path / "long.py"
    long.write_text(f"def f():\n{body}\n\ndef g():\n    '''{REASON} it must be.'''\n{body}")
    assert [o.split(" ")[0] for o in _offenders(long, "long.py")] == ["long.py:1"]
    big = tmp_path / "big.py"
    big.write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert _offenders(big, "big.py") == [f"big.py: {MAX_MODULE_LINES + 1} lines (at most 400)"]
