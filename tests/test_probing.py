"""Tests for sae_ortho/evaluation/{probe_cache,probing}.py and stages/probing.py: SAEBench sparse probing.

Synthetic per-token activations (no model) drive the SAE side through the real code path: a planted
direction must be found by a latent that reads it, an all-zero SAE must trip the sanity check. One
small run with the real model checks the LLM side: BOS handling, masking, and stored == run_with_cache.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from sae_ortho.base.params import Params, ProbingParams
from sae_ortho.evaluation import probe_cache, probing
from sae_ortho.training.sae import SAE, SAEConfig

D = 16
PLANTED, CONTROL = "language_id", "party"  # synthetic tasks borrow two offline task names
SYN = Params(
    probing=ProbingParams(
        tasks=(PLANTED, CONTROL), train_per_class=40, test_per_class=40, k_values=(1, 5), context_len=16, batch_size=8
    )
)


def synthetic_task(planted: bool, gen: torch.Generator) -> probe_cache.TaskActs:
    """Classes c0..c2, 3-8 N(0, 1) tokens per example; if `planted`, c0's tokens get +3 along dimension 0."""
    acts, rows, offset = [], [], 0
    for split, n in (("train", SYN.probing.train_per_class), ("test", SYN.probing.test_per_class)):
        for label in ("c0", "c1", "c2"):
            for i in range(n):
                length = int(torch.randint(3, 9, (1,), generator=gen))
                x = torch.randn(length, D, generator=gen)
                if planted and label == "c0":
                    x[:, 0] += 3.0
                acts.append(x)
                rows.append((label, split, i, offset, length))
                offset += length
    index = pd.DataFrame(rows, columns=["label", "split", "example", "offset", "length"])
    all_acts = torch.cat(acts).half()
    return probe_cache.TaskActs(all_acts, torch.arange(len(all_acts), dtype=torch.int32) + 10, index)


class ReadsDirection:
    """SAE-like: 32 ReLU latents on random directions; with `planted`, latent 0 reads dimension 0."""

    def __init__(self, planted: bool = True):
        self.W = torch.randn(D, 32, generator=torch.Generator().manual_seed(1)) / D**0.5
        if planted:
            self.W[:, 0] = 0
            self.W[0, 0] = 3.0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W)


class ZeroSAE:
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*x.shape[:-1], 32)


@pytest.fixture(scope="module")
def syn_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gen = torch.Generator().manual_seed(0)
    out = tmp_path_factory.mktemp("syn") / "probe_acts"
    tasks = {PLANTED: synthetic_task(True, gen), CONTROL: synthetic_task(False, gen)}
    probe_cache.save_probe_cache(out, tasks, SYN, progress_bar=False)
    return out


@pytest.fixture(scope="module")
def good_result(syn_cache: Path) -> dict:
    return probing.sae_probe_results(ReadsDirection(), syn_cache, SYN, progress_bar=False)


def details(result: dict) -> dict[str, dict]:
    return {d["dataset_name"]: d for d in result["eval_result_details"]}


def test_pooling_matches_per_example_means(syn_cache: Path) -> None:
    """Length-sorted chunks and their unsorting give, per example in index order, the plain mean."""
    from sae_bench.sae_bench_utils.activation_collection import (
        create_meaned_model_activations,
        get_sae_meaned_activations,
    )

    index = pd.read_parquet(syn_cache / probe_cache.INDEX)
    ta = probe_cache.TaskActs.load(syn_cache, PLANTED, index)
    sae = ReadsDirection()
    llm = ta.pooled("test", create_meaned_model_activations, chunk=7)
    lat = ta.pooled("test", lambda b: get_sae_meaned_activations(b, probing._Encoder(sae), 3), chunk=7)
    for label in ("c0", "c1", "c2"):
        rows = ta.index[(ta.index["split"] == "test") & (ta.index["label"] == label)]
        tokens = [ta.acts[o : o + n].float() for o, n in zip(rows["offset"], rows["length"], strict=True)]
        torch.testing.assert_close(llm[label], torch.stack([x.mean(0) for x in tokens]))
        torch.testing.assert_close(lat[label], torch.stack([sae.encode(x).mean(0) for x in tokens]))


def test_planted_feature_is_found(good_result: dict) -> None:
    per_class = good_result["eval_result_unstructured"][PLANTED]
    assert per_class["sae_top_1_test_accuracy"]["c0"] >= 0.95
    assert per_class["llm_top_1_test_accuracy"]["c0"] >= 0.95
    control = details(good_result)[CONTROL]
    for key in ("sae_top_1_test_accuracy", "sae_top_5_test_accuracy", "llm_top_1_test_accuracy"):
        assert 0.3 < control[key] < 0.7, (key, control[key])


def test_result_shape(good_result: dict) -> None:
    metrics = good_result["eval_result_metrics"]
    assert set(metrics["llm"]) == {"llm_test_accuracy", "llm_top_1_test_accuracy", "llm_top_5_test_accuracy"}
    assert set(metrics["sae"]) == {"sae_test_accuracy", "sae_top_1_test_accuracy", "sae_top_5_test_accuracy"}
    d = details(good_result)
    assert list(d) == [PLANTED, CONTROL]
    for key, value in metrics["sae"].items():
        assert value == pytest.approx((d[PLANTED][key] + d[CONTROL][key]) / 2)
    per_class = good_result["eval_result_unstructured"][PLANTED]["sae_test_accuracy"]
    assert set(per_class) == {"c0", "c1", "c2"}
    assert d[PLANTED]["sae_test_accuracy"] == pytest.approx(sum(per_class.values()) / 3)
    json.dumps(good_result)  # the stage writes it as JSON


def test_deterministic(syn_cache: Path, good_result: dict) -> None:
    again = probing.sae_probe_results(ReadsDirection(), syn_cache, SYN, progress_bar=False)
    assert again["eval_result_unstructured"] == good_result["eval_result_unstructured"]


def test_sanity_check(syn_cache: Path, good_result: dict) -> None:
    assert probing.check_probing_sanity(good_result) == []
    dead = probing.sae_probe_results(ZeroSAE(), syn_cache, SYN, progress_bar=False)
    assert details(dead)[PLANTED]["sae_top_5_test_accuracy"] == pytest.approx(0.5)
    fails = probing.check_probing_sanity(dead)
    # Only the planted task: on the control task the residual is at chance too.
    assert len(fails) == 1 and fails[0].startswith(f"{PLANTED}: SAE top-5") and "\n" not in fails[0]

    # A top-5 probe that fits worse than the top-1 probe on a subset of its latents is the probe's fit, not a
    # broken SAE (measured on a study SAE: top-1 0.753, top-5 0.522): the best over top-1..5 decides.
    unstable = {**details(good_result)[PLANTED], "sae_top_1_test_accuracy": 0.75, "sae_top_5_test_accuracy": 0.52}
    assert probing.check_probing_sanity({"eval_result_details": [unstable]}) == []

    nan = {"eval_result_details": [{**details(good_result)[CONTROL], "sae_top_1_test_accuracy": float("nan")}]}
    assert "non-finite" in probing.check_probing_sanity(nan)[0]


def test_stale_cache_is_refused(syn_cache: Path) -> None:
    other = Params(probing=ProbingParams(**{**SYN.probing.__dict__, "seed": 7}))
    with pytest.raises(ValueError, match="seed than params.yaml: run dvc repro llm_cache"):
        probing.sae_probe_results(ReadsDirection(), syn_cache, other, progress_bar=False)


def test_stage(syn_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from stages import probing as stage

    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"probing": {**SYN.probing.__dict__, "tasks": list(SYN.probing.tasks), "k_values": [1, 5]}})
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="run dvc repro llm_cache"):
        monkeypatch.setattr(sys, "argv", ["probing", "--sae", "good", "--dir", "models/good"])
        stage.main()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "probe_acts").symlink_to(syn_cache)
    with pytest.raises(SystemExit, match="SAE directory models/good not found"):
        stage.main()

    for name, bias in (("good", 0.0), ("dead", -1e4)):
        sae = SAE(SAEConfig(d_in=D, d_sae=32, architecture="relu"))
        with torch.no_grad():
            sae.W_enc.copy_(ReadsDirection().W)
            sae.b_enc.fill_(bias)  # -1e4: no latent ever fires
        sae.save(tmp_path / "models" / name)
    stage.main()
    result = json.loads((tmp_path / "metrics" / "sparse_probing" / "good.json").read_text())
    assert result["sae"] == "good" and result["seconds"] > 0
    assert "c0" in result["eval_result_unstructured"][PLANTED]["sae_top_1_test_accuracy"]
    assert "mean" in capsys.readouterr().out

    monkeypatch.setattr(sys, "argv", ["probing", "--sae", "dead", "--dir", "models/dead"])
    with pytest.raises(SystemExit) as exc:
        stage.main()
    assert exc.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: probing@dead: {PLANTED}: SAE top-5")
    assert (tmp_path / "metrics" / "sparse_probing" / "dead.json").exists()


# --------------------------------------------------------------------------------------------
# LLM side


TEXTS = {
    PLANTED: {
        "en": ["The cat sat on the mat.", "A long English sentence that goes on and on well past sixteen tokens."],
        "de": ["Der Hund schläft.", "Ein langer deutscher Satz, der weit über sechzehn Token hinausgeht, ja."],
        "fr": ["Le chat dort.", "Une longue phrase française qui dépasse largement seize jetons, oui."],
    },
    CONTROL: {
        "democratic": [
            "We invest in schools.",
            "Health care for every family, in every state, is the promise we make.",
        ],
        "republican": ["We will cut taxes.", "A strong defense and a smaller government keep this great nation free."],
    },
}
TINY = Params(
    probing=ProbingParams(
        tasks=(PLANTED, CONTROL), train_per_class=3, test_per_class=2, context_len=16, k_values=(1, 2), batch_size=4
    )
)


def write_probing_dir(root: Path, n_train: int = 3, n_test: int = 2) -> Path:
    """Tiny data/probing: per class, variants of two texts (one short, one past context_len)."""
    for task, classes in TEXTS.items():
        rows = [
            (f"{texts[i % 2]} ({split} {i})", label, split, f"{label}{i}")
            for label, texts in classes.items()
            for split, n in (("train", n_train), ("test", n_test))
            for i in range(n)
        ]
        root.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=["text", "label", "split", "group"]).to_parquet(root / f"{task}.parquet")
    return root


def test_collect_probe_activations(model, tmp_path: Path) -> None:
    probing_dir = write_probing_dir(tmp_path / "probing")
    out = tmp_path / "probe_acts"
    metrics = probe_cache.collect_probe_activations(model, TINY, probing_dir, out, progress_bar=False)
    assert metrics["examples"] == 5 * 5 and metrics["classes"] == 5
    assert metrics["tokens_stored"] + 25 <= metrics["tokens_forward"] < 25 * 16  # padding trimmed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe_acts", "probing"]  # no temporary directory left

    manifest = probing.load_cache_manifest(out, TINY)
    assert manifest["d_in"] == model.cfg.d_model and manifest["n_tokens"] == metrics["tokens_stored"]
    llm = json.loads((out / probe_cache.LLM_RESULTS).read_text())
    assert set(llm["per_class"][PLANTED]["llm_top_2_test_accuracy"]) == {"de", "en", "fr"}
    assert set(llm["eval_result_metrics"]["llm"]) == {
        "llm_test_accuracy",
        "llm_top_1_test_accuracy",
        "llm_top_2_test_accuracy",
    }

    index = pd.read_parquet(out / probe_cache.INDEX)
    texts = probe_cache.load_texts(TINY, probing_dir)
    tok = model.tokenizer
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    for task in TINY.probing.tasks:
        ta = probe_cache.TaskActs.load(out, task, index)
        assert ta.acts.dtype == torch.float16 and len(ta.acts) == len(ta.token_ids) == ta.index["length"].sum()
        assert not set(ta.token_ids.tolist()) & special
        for row in ta.index.itertuples():
            # Independent tokenisation: transformer_lens's own BOS, then truncation to context_len.
            ids = model.to_tokens(texts[task][row.split][row.label][row.example], prepend_bos=True)[0, :16]
            body = [t for t in ids[1:].tolist() if t not in special]
            assert ta.token_ids[row.offset : row.offset + row.length].tolist() == body
        assert ta.index["length"].min() < 15 and ta.index["length"].max() == 15  # padded and truncated examples

    # The longest example (a full batch) and the shortest (a batch cut to its own length).
    ta = probe_cache.TaskActs.load(out, PLANTED, index)
    for row in (ta.index.loc[ta.index["length"].idxmax()], ta.index.loc[ta.index["length"].idxmin()]):
        ids = model.to_tokens(texts[PLANTED][row["split"]][row["label"]][row["example"]], prepend_bos=True)[:, :16]
        _, cache = model.run_with_cache(ids, stop_at_layer=TINY.layer + 1, names_filter=TINY.hook_name)
        direct = cache[TINY.hook_name][0, 1 : 1 + row["length"]]
        stored = ta.acts[row["offset"] : row["offset"] + row["length"]].float()
        torch.testing.assert_close(stored, direct.half().float(), rtol=2e-3, atol=2e-3)


def test_too_few_examples(tmp_path: Path) -> None:
    probing_dir = write_probing_dir(tmp_path / "probing", n_train=2)
    with pytest.raises(ValueError) as exc:
        probe_cache.check_tasks_available(TINY, probing_dir)
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"'{PLANTED}'" in msg and "class 'de'" in msg and "train 2, test 2" in msg
    assert "lower probing.train_per_class" in msg

    (probing_dir / f"{CONTROL}.parquet").unlink()
    small = Params(probing=ProbingParams(**{**TINY.probing.__dict__, "train_per_class": 2}))
    with pytest.raises(FileNotFoundError, match="run dvc repro corpus"):
        probe_cache.check_tasks_available(small, probing_dir)


def test_hub_task_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    probing_dir = write_probing_dir(tmp_path / "probing")
    p = Params(probing=ProbingParams(**{**TINY.probing.__dict__, "tasks": (PLANTED, "fancyzhx/ag_news")}))
    out = tmp_path / "probe_acts"
    with pytest.raises(ValueError) as exc:
        probe_cache.collect_probe_activations(None, p, probing_dir, out)  # no model: it must fail before using one
    msg = str(exc.value)
    assert "\n" not in msg and "'fancyzhx/ag_news' needs the Hugging Face hub" in msg and "language_id" in msg
    assert not out.exists()

    # Without the variable, an unanswered hub request ends the same way.
    import huggingface_hub

    def no_route(self, repo_id: str, **kwargs) -> None:
        raise ConnectionError(f"cannot reach {repo_id}\nretries exhausted")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_route)
    with pytest.raises(ValueError) as exc:
        probe_cache.check_tasks_available(p, probing_dir)
    msg = str(exc.value)
    assert "\n" not in msg and "unreachable (ConnectionError: cannot reach fancyzhx/ag_news)" in msg
