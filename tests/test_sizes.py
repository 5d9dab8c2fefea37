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
