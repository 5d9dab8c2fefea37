"""Ground-truth absorption on SAELens's synthetic model: known answers, training end to end, the
trainer's batch source (the LM path unchanged), parameters."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

from sae_ortho.base.params import ParamError, Params, SyntheticHierarchy, SyntheticParams, TrainParams, load
from sae_ortho.data.shards import ActivationShards, write_manifest, write_shard
from sae_ortho.evaluation import synthetic as syn
from sae_ortho.evaluation import synthetic_arms as arms
from sae_ortho.training.batches import shuffled_batches
from sae_ortho.training.run_config import RunConfig
from sae_ortho.training.sae import SAE, SAEConfig
from sae_ortho.training.train import geometric_median, train
from sae_ortho.training.trainer import Trainer
from tests.conftest import REPO, stage_env

FLAT = SyntheticHierarchy("flat", total_root_nodes=4, branching_factor=3, max_depth=1, num_features=24)
DEEP = SyntheticHierarchy("deep", total_root_nodes=2, branching_factor=2, max_depth=2, num_features=24)
TINY_TRAIN = TrainParams(
    d_sae=24, k=4, lr=0.01, warmup_steps=5, batch_size=256, train_tokens=256 * 200,
    aux_k=8, dead_tokens=5000, log_every=5, checkpoint_every=1000,
)  # fmt: skip
# hidden_dim >= num_features, so the true directions are linearly independent and have an exact dual.
TINY = SyntheticParams(
    hidden_dim=32, model_seed=100, hierarchies=(FLAT,), seeds=(0,), train=TINY_TRAIN, eval_samples=4000, bootstrap=200
)


@pytest.fixture(scope="module", params=[FLAT, DEEP], ids=lambda h: h.name)
def model(request):
    with arms.single_thread():  # SAELens orthogonalises the directions: threads only slow it down
        return syn.build_model(TINY, request.param)


def dual_sae(model, gate_parents: bool = False) -> SAE:
    """ReLU SAE with the true directions as decoder and their exact dual as encoder (latent i ==
    feature i's activation). gate_parents: built to absorb instead: a parent's latent is switched
    off whenever one of its children fires, and each child's decoder row is child + parent."""
    f = model.feature_dict.feature_vectors.detach()
    n, d = f.shape
    dual = torch.linalg.pinv(f)  # [d, n]: f @ dual == I, so (a @ f) @ dual == a
    w_enc, w_dec = dual.clone(), f.clone()
    if gate_parents:
        for parent, child in syn.parent_child_pairs(model):
            w_enc[:, parent] -= 2 * dual[:, child]  # activations are exactly 1: 1 - 2 * (children on) <= -1
            w_dec[child] = f[child] + f[parent]
    sae = SAE(SAEConfig(d_in=d, d_sae=n, architecture="relu"))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec / w_dec.norm(dim=1, keepdim=True))
        sae.b_enc.fill_(-1e-4)  # float32 round-off of the dual must not count as firing
        sae.b_dec.zero_()
    return sae


def test_sae_with_the_true_features_has_no_absorption_and_mcc_one(model):
    pairs = syn.parent_child_pairs(model)
    ev = syn.evaluate(dual_sae(model), model, pairs, TINY)
    np.testing.assert_array_equal(ev["matched"], np.arange(24))
    pp, summary = ev["per_pair"], ev["summary"]
    assert (pp["n_child_active"] > 0).all()
    assert np.all(pp["absorption"] == 0) and np.all(pp["absorption_control"] == 0)
    assert np.all(pp["partial"] == 0) and np.allclose(pp["activation_ratio"], 1, atol=1e-4)
    assert summary["mcc"] == pytest.approx(1, abs=1e-5)
    assert summary["precision"] == pytest.approx(1) and summary["recall"] == pytest.approx(1)
    assert summary["explained_variance"] == pytest.approx(1, abs=1e-4)
    assert summary["l0"] == pytest.approx(summary["true_l0"], rel=1e-6)
    assert np.abs(pp["child_parent_cos"]).max() < 0.3  # orthogonalised directions


def test_sae_built_to_absorb_measures_absorption_one(model):
    pairs = syn.parent_child_pairs(model)
    ev = syn.evaluate(dual_sae(model, gate_parents=True), model, pairs, TINY)
    pp = ev["per_pair"]
    assert np.all(pp["absorption"] == 1) and np.all(pp["absorption_control"] == 0)
    assert np.all(pp["parent_learned"] == 1)
    assert np.all(pp["child_parent_cos"] > 0.6) and np.abs(pp["child_parent_cos_control"]).max() < 0.3
    assert ev["summary"]["mcc"] < 0.99


class PlantedSAE:
    """A planted encoder over the exact dual of the true directions (latent i == feature i's activation),
    with parent latents changed as a test needs; `W_dec` for the matching and the many-to-one sets."""

    def __init__(self, model, w_dec: torch.Tensor, encode):
        f = model.feature_dict.feature_vectors.detach()
        self.dual, self.W_dec, self._encode = torch.linalg.pinv(f), w_dec, encode
        self.gen = torch.Generator().manual_seed(7)  # its own stream: independent of the samples

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(x @ self.dual - 1e-4)  # float32 round-off of the dual must not count as firing
        return self._encode(a, self.gen)


def _rates(model, sae, pairs, n_latents: int | None = None):
    matched = syn.match_features(sae.W_dec, model.feature_dict.feature_vectors)
    return matched, syn.absorption_per_pair(sae, model, pairs, matched, 20_000, seed=3)


def test_parent_silenced_at_random_reads_raw_absorption_but_no_normalised_absorption(model):
    """A parent latent dropped on 40% of samples, independently of its children: the raw rate reads
    ~0.4 absorption, recall reads ~0.6, and normalised absorption reads ~0 (it is not absorption)."""
    pairs = syn.parent_child_pairs(model)
    parents = torch.as_tensor(np.unique(pairs[:, 0]))
    f = model.feature_dict.feature_vectors.detach()

    def drop_parents(a, gen):
        keep = (torch.rand(a.shape[0], len(parents), generator=gen) >= 0.4).float()
        a = a.clone()
        a[:, parents] *= keep
        return a

    _, pp = _rates(model, PlantedSAE(model, f.clone(), drop_parents), pairs)
    assert np.allclose(pp["absorption"], 0.4, atol=0.08) and np.allclose(pp["parent_recall"], 0.6, atol=0.08)
    assert np.abs(pp["absorption_normalised"]).max() < 0.15
    assert np.all(pp["parent_learned"] == 1)  # recall 0.6 >= 0.5


def test_planted_absorber_reads_normalised_absorption_one(model):
    pairs = syn.parent_child_pairs(model)
    ev = syn.evaluate(dual_sae(model, gate_parents=True), model, pairs, TINY)
    pp = ev["per_pair"]
    assert np.all(pp["absorption_normalised"] == 1) and np.all(pp["parent_recall"] == 1)
    assert np.all(pp["absorption_normalised_m2o"] == 1)  # the absorbing child latent is not read as the parent


def test_split_parent_reads_as_learned_under_the_many_to_one_reading(model):
    """One parent's latent split in two (30% / 70% of its firings, both decoders on its direction): the
    one-to-one reading calls it unlearned (recall ~0.3), the many-to-one reading learned (recall 1)."""
    pairs = syn.parent_child_pairs(model)
    parent = int(pairs[0, 0])
    f = model.feature_dict.feature_vectors.detach()
    w_dec = torch.cat([f, f[parent : parent + 1]])  # latent n_features: the parent's second half

    def split(a, gen):
        first = (torch.rand(a.shape[0], generator=gen) < 0.3).float()
        return torch.cat([a, (a[:, parent] * (1 - first))[:, None]], 1).index_put_(
            (torch.arange(a.shape[0]), torch.full((a.shape[0],), parent)), a[:, parent] * first
        )

    matched, pp = _rates(model, PlantedSAE(model, w_dec, split), pairs)
    mine = pairs[:, 0] == parent
    assert matched[parent] == parent  # Hungarian keeps the first of the two equal latents
    assert np.allclose(pp["parent_recall"][mine], 0.3, atol=0.08) and not pp["parent_learned"][mine].any()
    assert np.all(pp["parent_recall_m2o"][mine] == 1) and np.all(pp["parent_latents_m2o"][mine] == 2)
    assert np.abs(pp["absorption_normalised_m2o"][mine]).max() < 1e-9
    assert np.all(pp["parent_learned_m2o"][mine] == 1) and np.all(pp["absorption_normalised_m2o_learned"][mine] == 0)
    others = ~mine
    assert np.all(pp["parent_recall"][others] == 1) and np.all(pp["absorption_normalised"][others] == 0)


def test_pairs_are_the_hierarchy_edges(model):
    pairs = syn.parent_child_pairs(model)
    h = FLAT if model.cfg.hierarchy.max_depth == 1 else DEEP
    assert len(pairs) == h.n_nodes - h.total_root_nodes and len(set(pairs[:, 1])) == len(pairs)
    with syn.IsolatedRng(0).active():
        x, a = model.sample_with_features(2000)
    assert ((a[:, pairs[:, 1]] > 0) <= (a[:, pairs[:, 0]] > 0)).all()  # a child fires only with its parent


def test_synthetic_stream_is_deterministic_and_leaves_the_global_rng_alone(model):
    source = syn.SyntheticSource.create(model)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = [next(source.stream(64, 3)) for _ in range(1)] + list(_take(source.stream(64, 3), 3))
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(10)  # other use of the global RNG in between does not change the stream
    b = [next(source.stream(64, 3))] + list(_take(source.stream(64, 3), 3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[1], a[2]) and a[0].shape == (64, 32) and a[0].dtype == torch.float32


def _take(it, n):
    for _ in range(n):
        yield next(it)


def test_kept_pair_kinds():
    pairs = np.array([[0, 2], [0, 3], [1, 4]])  # features 0, 1 parents; 2, 3 children of 0
    matched = np.array([5, 6, 7, 8, 9])  # feature f -> latent f + 5; latents 0..4 match nothing
    kinds = syn.kept_pair_kinds(np.array([5, 7, 5, 0]), np.array([7, 8, 6, 7]), matched, pairs)
    assert kinds == {"parent_child": 0.25, "siblings": 0.25, "other_tree": 0.25, "other": 0.25}


def test_train_and_evaluate_an_arm_end_to_end(tmp_path):
    """Both arms through the real Trainer (orthogonality loss included) on streamed synthetic batches."""
    p = Params(synthetic=TINY, tau=1.0, topk_fraction=0.01)
    ortho = arms.run_arm(p, "ortho", tmp_path / "ortho", tmp_path / ".ckpt", progress_bar=False)
    h = ortho["hierarchies"]["flat"]
    model = syn.build_model(TINY, FLAT)
    untrained = syn.evaluate(SAE(SAEConfig(32, 24, "topk", k=4), seed=0), model, syn.parent_child_pairs(model), TINY)
    assert h["mcc"]["mean"] > max(0.85, untrained["summary"]["mcc"] + 0.3), (h["mcc"], untrained["summary"]["mcc"])
    assert h["explained_variance"]["mean"] > 0.8 and 1 < h["l0"]["mean"] <= 4  # TopK k=4; ReLU clips the rest
    for key in ("absorption", "absorption_control", "child_parent_cos", "partial"):
        assert all(np.isfinite(v) for v in [h[key]["mean"], *h[key]["ci95"], *h[key]["per_seed"]]), key
        assert h[key]["ci95"][0] <= h[key]["mean"] <= h[key]["ci95"][1]
    assert sum(v["mean"] for v in h["kept_pairs_last20pct"].values()) == pytest.approx(1, abs=1e-4)
    settings = ortho["settings"]
    assert settings["pair_budget"] == 3 and settings["tau"] == 1.0 and settings["train"]["d_sae"] == 24
    assert settings["device"] == str(p.torch_device)  # recorded; the runs trained there
    run = tmp_path / "ortho" / "flat" / "seed_0"
    assert (run / "pairs.parquet").exists() and SAE.load(run).cfg.d_sae == 24
    matching = json.loads((run / "matching.json").read_text())
    assert len(matching["parent_latents"]) == len(matching["pairs"]) == 12
    assert not (tmp_path / ".ckpt").exists() and not (tmp_path / ".ortho.tmp").exists()

    # The baseline ignores tau (its stage does not declare it) and trains on the same batches.
    base = arms.run_arm(replace(p, tau=0.5), "baseline", tmp_path / "base", tmp_path / ".ckpt", progress_bar=False)
    again = arms.run_arm(p, "baseline", tmp_path / "base2", tmp_path / ".ckpt", workers=2, progress_bar=False)
    assert "tau" not in base["settings"] and not (tmp_path / "base" / "flat" / "seed_0" / "pairs.parquet").exists()
    for result in (base, again):
        result.pop("seconds"), result["settings"].pop("workers")
        for hier in result["hierarchies"].values():
            hier.pop("train_seconds")
    assert base == again  # deterministic, also over two worker processes
    assert not torch.equal(SAE.load(tmp_path / "base/flat/seed_0").W_dec, SAE.load(run).W_dec)


# --- the trainer's batch source: the LM path draws exactly what it drew before -------------------


@pytest.fixture(scope="module")
def fake_shards(tmp_path_factory) -> ActivationShards:
    root = tmp_path_factory.mktemp("shards")
    gen = torch.Generator().manual_seed(0)
    infos = []
    for i in range(3):
        acts = (torch.randn(700, 16, generator=gen) * 3).half()
        index = {"context_id": np.arange(700) // 10, "position": np.arange(700) % 10}
        infos.append(write_shard(root, i, acts, index, first_context=70 * i, n_contexts=70))
    write_manifest(root, {"d_in": 16, "model": "m", "hook_name": "h", "fingerprint": "f"}, infos)
    return ActivationShards(root)


def test_shard_source_draws_the_legacy_batches_and_median_sample(fake_shards, tmp_path):
    """The LM path through BatchSource == the code before it: same batches, same b_dec
    initialisation, same first step (the real-shard default SAEs were also checked bit-identical)."""
    t = replace(TINY_TRAIN, d_sae=32, batch_size=128, train_tokens=128 * 6, buffer_shards=2, checkpoint_every=1)
    cfg = RunConfig(t, seed=4, tau=0.1)
    trainer = Trainer(cfg, fake_shards)
    legacy = shuffled_batches(fake_shards, 128, 4, 2)
    for _ in range(12):  # beyond one epoch (2100 rows)
        assert torch.equal(next(trainer.batches), next(legacy))
    scale = 16**0.5 / fake_shards.manifest["norm"]["mean"]
    assert trainer.sae.cfg.input_scale == scale
    # train()'s first step, replayed the legacy way: median of shuffled_batches(shards, 8192, seed + 1, 1).
    reference = Trainer(cfg, fake_shards)
    with torch.no_grad():
        reference.sae.b_dec.copy_(geometric_median(next(shuffled_batches(fake_shards, 8192, 5, 1)) * scale))
    reference.train_step(next(shuffled_batches(fake_shards, 128, 4, 2)))
    train(cfg, fake_shards, tmp_path / "sae", tmp_path / ".ckpt", progress_bar=False, max_steps=1)
    state = torch.load(tmp_path / ".ckpt" / "ckpt.pt", weights_only=False)["sae"]
    for name, value in reference.sae.state_dict().items():
        assert torch.equal(state[name], value), name


# --- parameters ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"synthetic": {"train": {"d_sae": 100, "k": 8}}}, "synthetic.hierarchies[0].num_features"),
        ({"synthetic": {"train": {"d_sae": 200, "k": 300}}}, "synthetic.train.k"),
        (
            {"synthetic": {"hierarchies": [{"name": "a", "total_root_nodes": 50, "branching_factor": 4}]}},
            "synthetic.hierarchies[0].num_features",
        ),
        ({"synthetic": {"hierarchies": [{"name": "a"}, {"name": "a"}]}}, "synthetic.hierarchies"),
        ({"synthetic": {"hierarchies": [{"name": "a", "depth": 2}]}}, "synthetic.hierarchies[0].depth"),
        ({"synthetic": {"seeds": [1, 1]}}, "synthetic.seeds"),
        ({"synthetic": {"model_seed": 0, "seeds": [0, 1]}}, "synthetic.model_seed"),
        ({"synthetic": {"firing_min_prob": 0.3}}, "synthetic.firing_min_prob"),
    ],
)  # fmt: skip
def test_bad_synthetic_params(tmp_path, raw, key):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamError, match="^" + re.escape(key) + ":"):
        load(tmp_path / "params.yaml")


def test_synthetic_stage_fails_before_work_on_bad_params(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"synthetic": {"seeds": []}}))
    result = subprocess.run(
        [sys.executable, "-m", "stages.synthetic", "--arm", "ortho"],
        cwd=tmp_path, env=stage_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "error: params.yaml: synthetic.seeds: needs at least one seed"
    assert not (tmp_path / "models").exists()


def test_baseline_stage_does_not_declare_the_ortho_keys():
    """So `dvc exp run -S tau=...` reruns synthetic_ortho only."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    ortho_keys = {"tau", "topk_fraction", "tau_schedule", "ortho"}
    assert not ortho_keys & set(stages["synthetic_baseline"]["params"])
    assert ortho_keys <= set(stages["synthetic_ortho"]["params"])
    # never the LM's data (sae_ortho/data/ is code: the synthetic stream reuses the shard batch source)
    assert not any(d.startswith("data/") for s in ("synthetic_baseline", "synthetic_ortho") for d in stages[s]["deps"])
