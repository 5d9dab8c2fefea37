"""Modules stay readable top to bottom: none past 400 lines, no class past 150 (split by job instead)."""

import ast

from tests.conftest import REPO

MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 150
CODE_DIRS = ("sae_ortho", "stages", "bench")


def _modules():
    for top in CODE_DIRS:
        yield from sorted((REPO / top).rglob("*.py"))


def test_no_module_past_the_cap():
    long = {
        str(p.relative_to(REPO)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_class_past_the_cap():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long[f"{path.relative_to(REPO)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert not long, f"classes over {MAX_CLASS_LINES} lines: {long}"


def test_duplicate_check_of_make_lint_catches_an_eleven_line_twin(tmp_path):
    """`make lint` runs pylint's symilar with -d 10, which flags identical runs of more than 10 lines
    (measured: a 10-line twin passes, an 11-line one is flagged); it must flag the twin and pass distinct
    code, or the check could not fail."""
    import subprocess
    import sys
    from pathlib import Path

    body = "\n".join(f"    total = total + {n} * value" for n in range(11))
    twin_a, twin_b, other = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    twin_a.write_text(f"def f(value):\n    total = 0\n{body}\n    return total\n")
    twin_b.write_text(f"def g(value):\n    total = 1\n{body}\n    return -total\n")
    other.write_text("def h(value):\n    return value\n")
    symilar = Path(sys.executable).parent / "symilar"
    args = [str(symilar), "-d", "10", "--ignore-imports", "--ignore-docstrings", "--ignore-comments"]
    found = subprocess.run([*args, str(twin_a), str(twin_b)], capture_output=True, text=True).stdout
    assert "duplicates=0 " not in found and "similar lines in 2 files" in found, found
    clean = subprocess.run([*args, str(twin_a), str(other)], capture_output=True, text=True).stdout
    assert "duplicates=0 " in clean, clean
