"""First-letter absorption, SAE side (stage `absorption@<sae>`): sae_bench's own code on cached residuals.

Per seed of the letter cache (sae_ortho/evaluation/letters.py) and per SAE:
- `run_k_sparse_probing_experiment`: an L1 probe on the SAE latents picks each letter's top-k latents
  (k = 1..max_k), sklearn fits k-sparse probes, F1 on the test words, feature splits by F1 jumps;
- `load_and_run_calculate_projections_and_cos_sims` with sae_bench's `FeatureAbsorptionCalculator`
  (its thresholds untouched), then `_aggregate_results_df`, then `run_eval`'s summary over the letters
  whose LLM probe F1 passes the gate.

sae_bench runs the model in both steps. `CachedModel` stands in for it: its `model_name` and tokenizer
locate and parse the probe files, and `run_with_cache` serves the residuals the letter cache stored
for exactly the prompts the calculator examines (`CachedPromptCalculator` returns those prompts
instead of sampling new ones). An unknown prompt is an error, never a silent forward pass.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator
from safetensors.torch import load_file

from sae_ortho.base.io import verified
from sae_ortho.base.params import AbsorptionParams
from sae_ortho.base.stats import bootstrap_ci
from sae_ortho.evaluation.letters import LETTERS, MANIFEST, PROMPT_ACTS, PROMPTS, TOKENIZER


class CachedModel:
    """The parts of a HookedTransformer sae_bench's absorption code touches, served from the letter cache."""

    def __init__(self, manifest: dict, tokenizer, prompts: list[str], acts: torch.Tensor, n_ctx: int):
        self.cfg = SimpleNamespace(model_name=manifest["model_name"], d_model=manifest["d_model"])
        self.tokenizer = tokenizer
        self.hook = manifest["hook_name"]
        self.pos = manifest["letters"]["prompt_token_pos"]
        self.n_ctx = n_ctx
        self.acts = acts
        self.row = {prompt: i for i, prompt in enumerate(prompts)}

    def _rows(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in prompts if p not in self.row]
        if missing:
            raise KeyError(f"prompt not in the letter cache (dvc repro letter_cache): ...{missing[0][-60:]!r}")
        return torch.tensor([self.row[p] for p in prompts], dtype=torch.long)

    def to_tokens(self, text: str) -> torch.Tensor:
        self._rows([text])
        return torch.zeros(1, self.n_ctx, dtype=torch.long)  # only the length is read

    def run_with_cache(self, prompts: list[str], names_filter=None, **_):
        if names_filter is not None and list(names_filter) != [self.hook]:
            raise ValueError(f"the letter cache holds {self.hook} only, asked for {names_filter}")
        # NaN everywhere but the word position: reading any other position would poison the result visibly.
        out = torch.full((len(prompts), self.n_ctx, self.acts.shape[1]), float("nan"))
        out[:, self.pos] = self.acts[self._rows(prompts)]
        return None, {self.hook: out}


@dataclass
class CachedPromptCalculator(FeatureAbsorptionCalculator):
    """sae_bench's calculator with the prompts the letter cache built (by this same class, seeded)."""

    cached_prompts: dict[str, str] = field(default_factory=dict)  # word -> prompt

    def _build_prompts(self, words: list[str]):
        from sae_bench.evals.absorption.prompting import SpellingPrompt

        missing = [w for w in words if w not in self.cached_prompts]
        if missing:
            raise KeyError(f"word {missing[0]!r} has no cached absorption prompt (dvc repro letter_cache)")
        return [SpellingPrompt(self.cached_prompts[w], self.answer_formatter(w), w) for w in words]


def load_manifest(letters_dir: Path) -> dict:
    path = letters_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run dvc repro letter_cache")
    return json.loads(verified(path).read_text())


def _fvu(sae, x: torch.Tensor) -> float:
    x = x.to(sae.W_dec.device)  # the probe's cached activations are on the host
    with torch.no_grad():
        err = ((x - sae.decode(sae.encode(x))) ** 2).sum()
        return float(err / ((x - x.mean(0)) ** 2).sum())


def seed_result(sae, letters_dir: Path, manifest: dict, seed_info: dict, ap: AbsorptionParams, name: str) -> dict:
    """sae_bench's k-sparse probing and absorption for one SAE (a sae_lens SAE) on one seed's cache."""
    from sae_bench.evals.absorption.feature_absorption import (
        ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS,
        ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
        ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
        FULL_ABSORPTION_PROBE_COS_THRESHOLD,
        load_and_run_calculate_projections_and_cos_sims,
    )
    from sae_bench.evals.absorption.k_sparse_probing import run_k_sparse_probing_experiment
    from sae_bench.evals.absorption.prompting import first_letter_formatter
    from transformers import AutoTokenizer

    seed, lp, layer = seed_info["seed"], manifest["letters"], manifest["layer"]
    seed_dir = letters_dir / f"seed_{seed}"
    probe_dir = seed_dir / "probes" / manifest["model_name"] / f"layer_{layer}"
    # Without these files sae_bench would train a probe on the whole vocabulary through the model; checked
    # (sae_bench reads them itself), as is the tokenizer, whose vocabulary decides every token id.
    for needed in ("probe.pth", "data.npz", "train_df.csv", "test_df.csv"):
        verified(probe_dir / needed)
    for tokenizer_file in sorted((letters_dir / TOKENIZER).iterdir()):
        verified(tokenizer_file)
    prompts = pd.read_parquet(verified(seed_dir / PROMPTS))
    acts = load_file(str(verified(seed_dir / PROMPT_ACTS)))["acts"]
    tokenizer = AutoTokenizer.from_pretrained(letters_dir / TOKENIZER)
    model = CachedModel(manifest, tokenizer, prompts["prompt"].tolist(), acts, seed_info["prompt_tokens"])
    sae_name = f"{name}_seed{seed}"
    device = sae.W_dec.device  # sae_bench's probes and caches follow the SAE
    work = Path(tempfile.mkdtemp(prefix="absorption_"))
    torch.manual_seed(seed)  # sae_bench's probe training shuffles with torch's global generator
    try:
        metrics_df = run_k_sparse_probing_experiment(
            model=model,
            sae=sae,
            layer=layer,
            sae_name=sae_name,
            max_k_value=ap.max_k,
            prompt_template=lp["prompt_template"],
            prompt_token_pos=lp["prompt_token_pos"],
            device=device,
            experiment_dir=work / "k_sparse_probing",
            probes_dir=seed_dir / "probes",
            force=True,
            f1_jump_threshold=ap.f1_jump_threshold,
            k_sparse_probe_l1_decay=ap.k_sparse_l1,
            k_sparse_probe_num_epochs=ap.k_sparse_epochs,
            k_sparse_probe_batch_size=ap.k_sparse_batch_size,
            precalc_k_sparse_probe_sae_acts=True,
            verbose=False,
        )
        calculator = CachedPromptCalculator(
            model=model,
            icl_word_list=[],
            max_icl_examples=lp["max_icl_examples"],
            base_template=lp["prompt_template"],
            answer_formatter=first_letter_formatter(),
            word_token_pos=lp["prompt_token_pos"],
            full_absorption_probe_cos_sim_threshold=FULL_ABSORPTION_PROBE_COS_THRESHOLD,
            absorption_fraction_probe_cos_sim_threshold=ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
            probe_projection_proportion_threshold=ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
            absorption_fraction_max_absorbing_latents=ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS,
            batch_size=lp["batch_size"],
            cached_prompts=dict(zip(prompts["word"], prompts["prompt"], strict=True)),
        )
        raw = load_and_run_calculate_projections_and_cos_sims(
            model,
            sae,
            calculator,
            metrics_df,
            sae_name=sae_name,
            layer=layer,
            probes_dir=seed_dir / "probes",
            sparse_probing_task_output_dir=work / "k_sparse_probing" / sae_name,
            device=device,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summarize(metrics_df, raw, ap, seed, _fvu(sae, _probe_train_acts(probe_dir)))


def _probe_train_acts(probe_dir: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(probe_dir / "data.npz")["X_train"]).float()


def summarize(metrics_df: pd.DataFrame, raw: pd.DataFrame, ap: AbsorptionParams, seed: int, fvu: float) -> dict:
    """run_eval's summary (letters whose LLM probe passes the gate), per letter, counts and CIs."""
    from sae_bench.evals.absorption.main import _aggregate_results_df

    by_letter = metrics_df.set_index("letter")
    agg = _aggregate_results_df(raw).set_index("letter") if len(raw) else pd.DataFrame()
    per_letter = {}
    for letter in LETTERS:
        m = by_letter.loc[letter]
        row = {
            "probe_f1": round(float(m["f1_probe"]), 4),
            "latent_f1_k1": round(float(m["f1_sparse_sae_1"]), 4),
            "main_latent": int(m["sparse_sae_k_1_feats"][0]),
            "split_latents": [int(f) for f in m["split_feats"]],
        }
        if letter in agg.index:
            a = agg.loc[letter]
            row.update(
                mean_absorption_fraction=round(float(a["mean_absorption_fraction"]), 4),
                full_absorption_rate=round(float(a["full_absorption_rate"]), 4),
                num_split_features=int(a["num_split_feats"]),
                probe_true_positives=int(a["num_probe_true_positives"]),
            )
        per_letter[letter] = row
    gated = [c for c, r in per_letter.items() if r["probe_f1"] > ap.probe_f1_gate and "mean_absorption_fraction" in r]
    carried = [c for c, r in per_letter.items() if r["latent_f1_k1"] > ap.latent_f1_gate]
    out: dict = {
        "seed": seed,
        "letters_probe_supported": sum(r["probe_f1"] > ap.probe_f1_gate for r in per_letter.values()),
        "letters_evaluated": len(gated),
        "letters_carried_by_one_latent": len(carried),
        "carried_letters": "".join(carried),
        "k1_mean_f1": round(float(np.mean([r["latent_f1_k1"] for r in per_letter.values()])), 4),
        "fvu_on_prompts": round(fvu, 4),
    }
    for key in ("mean_absorption_fraction", "full_absorption_rate", "num_split_features"):
        values = np.array([per_letter[c][key] for c in gated], dtype=float)
        out[key] = round(float(values.mean()), 4) if len(values) else None
        out[f"{key}_ci95"] = bootstrap_ci(values, ap.bootstrap, seed)
    out["per_letter"] = per_letter
    return out


def absorption_result(sae, letters_dir: Path, ap: AbsorptionParams, name: str) -> dict:
    """Every seed of the letter cache; the headline is their mean, the reseed noise their spread."""
    manifest = load_manifest(letters_dir)
    if sae.cfg.d_in != manifest["d_model"]:
        raise ValueError(f"SAE d_in {sae.cfg.d_in} != the letter cache's d_model {manifest['d_model']}")
    seeds = [seed_result(sae, letters_dir, manifest, info, ap, name) for info in manifest["seeds"]]
    headline: dict = {}
    for key in ("mean_absorption_fraction", "full_absorption_rate", "num_split_features", "k1_mean_f1"):
        values = [s[key] for s in seeds if s[key] is not None]
        headline[key] = round(float(np.mean(values)), 4) if values else None
        # Reseed noise: the same SAE under other vocabulary samples, probes and prompts (max - min).
        headline[f"{key}_reseed_range"] = round(float(np.ptp(values)), 4) if len(values) >= 2 else None
    carried = min(s["letters_carried_by_one_latent"] for s in seeds)
    return {
        **headline,
        "letters_probe_supported": min(s["letters_probe_supported"] for s in seeds),
        "letters_carried_by_one_latent": carried,
        "meaningful": carried >= ap.min_carried_letters,
        "per_seed": seeds,
        "settings": {
            "letters": manifest["letters"],
            "vocabulary_size": manifest["vocabulary_size"],
            "sae_bench_version": manifest["sae_bench_version"],
            "hook_name": manifest["hook_name"],
            **{k: getattr(ap, k) for k in ap.__dataclass_fields__},
        },
    }
