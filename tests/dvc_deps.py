"""Each DVC stage's code dependencies, derived from its imports (module- and function-level).

`python -m tests.dvc_deps` lists what dvc.yaml / study/dvc.yaml miss or list in excess;
`python -m tests.dvc_deps --fix` rewrites their code-dependency lines (data dependencies untouched).
The test is tests/test_dvc_deps.py. Package `__init__.py` files are left out: they hold only a
docstring (checked there), so a change to them cannot change a result.
"""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINES = (REPO / "dvc.yaml", REPO / "study/dvc.yaml")
FIRST_PARTY = ("sae_ortho", "stages")
CODE_DEP = re.compile(r"^(stages|sae_ortho)/.*\.py$")


def module_file(module: str) -> Path | None:
    base = REPO / Path(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


@cache
def direct_imports(path: Path) -> frozenset[str]:
    """First-party modules `path` imports anywhere in its body (a function-level import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import name`: name is a submodule or an attribute of pkg
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in FIRST_PARTY:
                continue
            while name and module_file(name) is None:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return frozenset(found)


def code_closure(module: str) -> set[str]:
    """Repository-relative .py files `module` runs, transitively, without package __init__ files."""
    seen, todo = set(), [module]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = module_file(mod)
        if path is not None:
            todo.extend(direct_imports(path))
    files = {module_file(m) for m in seen}
    return {str(f.relative_to(REPO)) for f in files if f is not None and f.name != "__init__.py"}


def stage_modules(pipeline: Path) -> dict[str, tuple[str, list[str]]]:
    """stage name -> (module its cmd runs, its declared code deps)."""
    stages = yaml.safe_load(pipeline.read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        match = re.search(r"python -m ([\w.]+)", body["cmd"])
        if match is None:
            continue
        deps = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])]
        out[name] = (match.group(1), [d for d in deps if CODE_DEP.match(d)])
    return out


def drift() -> dict[str, dict[str, list[str]]]:
    """pipeline:stage -> {"missing": [...], "extra": [...]} for every stage whose code deps differ."""
    out = {}
    for pipeline in PIPELINES:
        for name, (module, declared) in stage_modules(pipeline).items():
            need = code_closure(module)
            missing, extra = sorted(need - set(declared)), sorted(set(declared) - need)
            if missing or extra:
                out[f"{pipeline.relative_to(REPO)}:{name}"] = {"missing": missing, "extra": extra}
    return out


def fix(pipeline: Path) -> None:
    """Rewrite each stage's code-dependency lines to the derived set, in place (comments kept)."""
    modules = stage_modules(pipeline)
    lines = pipeline.read_text().split("\n")
    out, stage = [], None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^  ([\w@-]+):\s*$", line)
        if m:
            stage = m.group(1)
        dep = re.match(r"^(\s*)- ((?:stages|sae_ortho)/\S+\.py)\s*$", line)
        if dep and stage in modules:
            indent = dep.group(1)
            while i < len(lines) and re.match(r"^\s*- (?:stages|sae_ortho)/\S+\.py\s*$", lines[i]):
                i += 1
            module = modules[stage][0]
            entry = module.replace(".", "/") + ".py"
            rest = sorted(code_closure(module) - {entry})
            out.extend(f"{indent}- {f}" for f in [entry, *rest])
            continue
        out.append(line)
        i += 1
    pipeline.write_text("\n".join(out))


if __name__ == "__main__":
    if "--fix" in sys.argv:
        for p in PIPELINES:
            fix(p)
    for where, d in drift().items():
        print(where, d)
