"""DVC dependencies cannot drift from the code: every stage's cmd module, and every first-party module
it imports (module- or function-level, transitively), is a dep of that stage, and nothing else is.
A missing dep would let `dvc status` call a stale result up to date; an extra one reruns for nothing."""

import ast

from tests.dvc_deps import PIPELINES, REPO, code_closure, direct_imports, drift, stage_modules


def test_every_stage_declares_exactly_the_code_it_runs():
    problems = drift()
    assert not problems, "fix with `python -m tests.dvc_deps --fix`:\n" + "\n".join(
        f"{where}: missing {d['missing']}, extra {d['extra']}" for where, d in problems.items()
    )


def test_package_inits_hold_only_a_docstring():
    """They are left out of the deps, which is sound only while they run no code."""
    for init in (REPO / "sae_ortho").rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), init


def test_function_level_imports_are_followed(tmp_path, monkeypatch):
    """The derivation sees an import inside a function body, as the stages use for heavy libraries."""
    deps = code_closure("stages.study_synthetic")
    assert "sae_ortho/evaluation/synthetic_arms.py" in deps
    # data/lm.py is imported inside functions only by some modules: the closure must still reach it
    assert any("sae_ortho.data.lm" in direct_imports(REPO / f) for f in code_closure("stages.core"))


def test_every_stage_has_a_cmd_module():
    for pipeline in PIPELINES:
        for name, (module, _) in stage_modules(pipeline).items():
            assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{pipeline.name}:{name} runs {module}"
