"""Bad parameters fail with one line naming the key, before any heavy work."""

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
        ({"hook": "attn_out"}, "hook"),
    ],
)
def test_bad_param_names_the_key(tmp_path, raw, key):
    with pytest.raises(ParamError) as err:
        load(write(tmp_path, **raw))
    assert str(err.value).startswith(f"{key}:")
    assert "\n" not in str(err.value)


def test_stage_exits_nonzero_with_one_line(tmp_path):
    write(tmp_path, layer=99)
    result = subprocess.run(
        [sys.executable, "-m", "stages.extract"], cwd=tmp_path, env=stage_env(), capture_output=True, text=True
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: params.yaml: layer: 99 is beyond smollm2-135m's 30 layers (0..29)"]
    assert not (tmp_path / "data").exists()
