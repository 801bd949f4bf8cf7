"""docs/reliability.md maps each claim to the test that checks it: every test it names exists,
and the tests of Ctrl-C during a save and of the CLI's one-line errors are named."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"

# `tests/x/test_y.py::test_z`, `test_y.py::test_z` (a unique file name under tests/),
# `::test_z` (the file named last), `test_y.py` alone; a parametrized id is left off.
REFERENCE = re.compile(r"`((?:[\w/]+\.py)?(?:::\w+)?)(?:\[[^\]`]*\])?`")


def named_tests() -> list[tuple[Path, str]]:
    """(file, test name or "") for every reference in the document, in order."""
    by_name: dict[str, list[Path]] = {}
    for path in (ROOT / "tests").rglob("*.py"):
        by_name.setdefault(path.name, []).append(path)
    named, last = [], None
    for ref in filter(None, REFERENCE.findall(DOC.read_text())):
        file, _, test = ref.partition("::")
        if file:
            found = [ROOT / file] if "/" in file else by_name.get(file, [])
            assert len(found) == 1 and found[0].is_file(), f"{ref}: no single file {file}"
            last = found[0]
        assert last is not None, f"{ref}: which file?"
        named.append((last, test))
    return named


def test_every_test_it_names_exists() -> None:
    named = named_tests()
    assert len(named) > 50
    for path, test in named:
        if test:
            assert re.search(rf"^def {test}\(", path.read_text(), re.M), f"{path}::{test}"


def test_ctrl_c_and_the_clis_one_line_errors_are_named() -> None:
    named = {(str(path.relative_to(ROOT)), test) for path, test in named_tests()}
    for test in (
        "test_ctrl_c_once_says_so_and_lets_the_save_finish",
        "test_ctrl_c_twice_aborts_within_seconds_and_commits_nothing",
        "test_an_aborted_writer_uploads_nothing_and_never_commits",
    ):
        assert ("tests/checkpointer/test_interrupt.py", test) in named, test
    for test in (
        "test_an_endpoint_without_scheme_is_an_invalid_uri",
        "test_https_to_a_plain_http_server_is_unreachable_at_once",
        "test_an_unknown_profile_is_a_config_error",
        "test_a_server_that_never_answers_is_given_up_within_the_timeout",
    ):
        assert ("tests/store/test_errors.py", test) in named, test
    for test in (
        "test_newcomer_mistakes_get_one_error_line",
        "test_https_to_a_plain_http_server_is_one_error_line",
        "test_a_server_that_never_answers_fails_within_the_timeout_and_says_it_retries",
    ):
        assert ("tests/cli/test_cli.py", test) in named, test
