"""Train and evaluate one study SAE on the LM's activations in one process (stages `lm_*` of study/dvc.yaml).

The evaluations are the default pipeline's (core metrics, SAEBench first-letter absorption, SAEBench
sparse probing), on the default's caches (data/heldout, data/letters, data/probe_acts), so every arm is
measured exactly as the default SAEs are. One process loads the LM once for all of them. The metrics
file is compact (headline figures only, for `dvc exp show` / `dvc metrics diff`); the full evaluation
records go beside the SAE.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from sae_ortho.analysis import stability as st
from sae_ortho.base.io import verified
from sae_ortho.base.params import Params
from sae_ortho.base.paths import HELDOUT, LETTERS, PROBE_ACTS
from sae_ortho.evaluation.absorption import absorption_result
from sae_ortho.evaluation.core import core_metrics, science_failures
from sae_ortho.evaluation.heldout import HeldoutSet
from sae_ortho.evaluation.probing import check_probing_sanity, sae_probe_results
from sae_ortho.training.sae import SAE

CORE_KEYS = (
    "fvu",
    "l0",
    "ce_recovered_vs_zero",
    "ce_recovered_vs_zero_all_positions",
    "kl_with_sae",
    "dead_fraction",
    "dense_fraction",
    "n_tokens",
)
ABSORPTION_KEYS = (
    "mean_absorption_fraction",
    "mean_absorption_fraction_reseed_range",
    "full_absorption_rate",
    "full_absorption_rate_reseed_range",
    "letters_carried_by_one_latent",
    "meaningful",
)


KL_CONTEXTS = 16  # KL and the clean run on the first 16 contexts; CE on all (one LM pass per context beyond)


class BrokenSAE(RuntimeError):
    """A figure that means a broken SAE or pipeline (FVU >= 1, probing at chance, NaN)."""


def evaluate(
    sae_dir: Path,
    p: Params,
    model,
    with_probing: bool,
    heldout_contexts: int,
    progress_bar: bool = True,
    with_absorption: bool = True,
) -> dict:
    """Core metrics on the first `heldout_contexts` held-out contexts (the two CE runs cost ~1 s a
    context on 2 cores), and when asked first-letter absorption (~55 s an SAE) and SAEBench sparse
    probing (params.yaml `probing`, ~90 s an SAE, almost all of it encoding the probe texts). Writes
    the full records to `sae_dir/eval/`; returns the compact figures. Raises BrokenSAE."""
    sae = SAE.load(sae_dir).eval()
    hs = HeldoutSet.load(HELDOUT).contexts(0, heldout_contexts)
    if sae.cfg.hook_name != hs.manifest["hook_name"]:
        raise ValueError(
            f"SAE {sae_dir} was trained at {sae.cfg.hook_name}, held-out set is {hs.manifest['hook_name']}"
        )
    records: dict[str, dict] = {}
    with torch.no_grad():
        core = core_metrics(sae, model, hs, p.core, progress_bar, kl_contexts=KL_CONTEXTS)
    core.pop("per_context")
    records["core"] = core
    fails = science_failures(core)
    out: dict = {"core": {k: round(float(core[k]), 5) for k in CORE_KEYS}}
    if with_absorption:
        with warnings.catch_warnings():  # sklearn: letters whose k-sparse probe predicts no positive (F1 0)
            warnings.filterwarnings("ignore", message=".*ill-defined.*")
            records["absorption"] = absorption_result(sae.to_saelens(), LETTERS, p.absorption, sae_dir.name)
        out["absorption"] = {k: records["absorption"][k] for k in ABSORPTION_KEYS}
    if with_probing:  # at the llm_cache's k values (its LLM-residual probes are cached with them)
        with warnings.catch_warnings():  # sae_bench passes sklearn's deprecated `penalty`: once per probe
            warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")
            probing = sae_probe_results(sae, PROBE_ACTS, p)
        records["probing"] = probing
        fails += check_probing_sanity(probing)
        sae_acc = probing["eval_result_metrics"]["sae"]
        out["probing"] = {f"top_{k}": round(sae_acc[f"sae_top_{k}_test_accuracy"], 5) for k in p.probing.k_values}
    eval_dir = sae_dir / "eval"
    eval_dir.mkdir(exist_ok=True)
    for name, record in records.items():
        (eval_dir / f"{name}.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    if fails:
        raise BrokenSAE("; ".join(fails))
    return out


def pair_stability(sae_dir: Path, d_sae: int, null_draws: int = 2, seed: int = 0) -> dict | None:
    """Jaccard of the penalised pair sets of the training log at a lag of one log and of 10% / 50% of
    the run, against the degree-preserving null (sae_ortho/analysis/stability.py); the curve against lag goes
    to `sae_dir/eval/pairs.json`. None for arms without a pair penalty."""
    path = sae_dir / "pairs.parquet"
    if not path.exists():
        return None
    _, sets = st.log_sets(pq.read_table(verified(path)).to_pandas(), d_sae)
    if len(sets) < 2:
        return None
    nulls = st.null_sets(sets, d_sae, null_draws, np.random.default_rng(seed))
    table = st.lag_table(sets, nulls, st.lags_for(len(sets), (0.1, 0.5)))
    (sae_dir / "eval").mkdir(exist_ok=True)
    (sae_dir / "eval" / "pairs.json").write_text(
        json.dumps({"lags": table, "curve": st.lag_curve(sets, nulls)}, indent=1) + "\n"
    )
    # The curve goes into the committed metrics too: the report reads only committed files.
    return (
        {f"jaccard_lag_{name}": row["jaccard"] for name, row in table.items()}
        | {f"null_lag_{name}": row["null"] for name, row in table.items()}
        | {"curve": st.lag_curve(sets, nulls)}
    )
