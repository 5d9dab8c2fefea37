"""Stage `stability`: how stable the selected pairs and the features are, within a run and across seeds
(library: sae_ortho/analysis/stability_analysis.py) -> metrics/stability.json and metrics/stability/*.png.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sae_ortho.analysis import stability_analysis as sa
from sae_ortho.base import params as params_mod
from sae_ortho.base import plots
from sae_ortho.base.io import atomic_write_text, verified
from sae_ortho.base.paths import HELDOUT
from sae_ortho.evaluation.heldout import HeldoutSet
from sae_ortho.training.sae import CONFIG_FILE, SAE

MODELS = Path("models")
ABSORPTION = Path("metrics/absorption")
SYNTHETIC = MODELS / "synthetic" / "ortho"
OUT = Path("metrics/stability.json")
PLOTS = Path("metrics/stability")
ARMS = ("baseline", "ortho")


def arm_dirs(arm: str, p: params_mod.Params) -> dict[int, Path]:
    return {p.sae_seed: MODELS / arm, **{s: MODELS / "seeds" / f"{arm}_s{s}" for s in p.stability.extra_seeds}}


def main() -> None:
    p = params_mod.load_or_exit()
    sp = p.stability
    t0 = time.perf_counter()
    dirs = {arm: arm_dirs(arm, p) for arm in ARMS}
    missing = [str(d) for by_seed in dirs.values() for d in by_seed.values() if not (d / CONFIG_FILE).exists()]
    if missing or not (HELDOUT / "manifest.json").exists():
        sys.exit(f"error: missing inputs: {', '.join(missing or [str(HELDOUT)])}")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    hs = HeldoutSet.load(HELDOUT)
    token_acts = hs.token_acts()
    batches = sa.heldout_batches(token_acts, p.core.pair_batch_size, sp.heldout_batches)
    fraction = p.topk_fraction
    result: dict = {"settings": {"topk_fraction": fraction, "heldout_batches": len(batches), **vars(sp)}}

    ortho = SAE.load(MODELS / "ortho")
    pairs_file = MODELS / "ortho" / "pairs.parquet"
    within = (
        sa.within_run(pd.read_parquet(verified(pairs_file)), ortho.W_dec.detach(), fraction, sp, rng)
        if pairs_file.exists()
        else None
    )
    log_sets = within.pop("_sets") if within else None
    result["within_run"] = within

    snap_sets, result["snapshots"] = {}, {}
    for arm in ARMS:
        print(f"stability: {arm} snapshots", file=sys.stderr)
        snap_sets[arm] = sa.snapshot_sets(MODELS / arm, batches, fraction)
        result["snapshots"][arm] = sa.snapshot_stability(snap_sets[arm], ortho.cfg.d_sae, sp, rng)

    if sp.extra_seeds:
        centered = token_acts.float() - token_acts.float().mean(0)
        cov = centered.T @ centered / (len(centered) - 1)
        result["cross_seed"] = {"null_covariance_from": f"{len(token_acts)} held-out token activations", "arms": {}}
        for arm in ARMS:
            print(f"stability: {arm} across seeds {list(dirs[arm])}", file=sys.stderr)
            result["cross_seed"]["arms"][arm] = sa.cross_seed(dirs[arm], batches, cov, fraction, sp, rng)
    else:
        result["cross_seed"] = {
            "skipped": "stability.extra_seeds is empty (make repro's default); the study sets seeds"
        }

    links = {}
    for arm in ARMS:
        absorption = ABSORPTION / f"{arm}.json"
        if absorption.exists():
            flagged = sa.flagged_letter_latents(absorption)
            sets = [s for per_batch in snap_sets[arm].values() for s in per_batch]
            links[f"{arm}_snapshots"] = sa.link(sets, flagged, ortho.cfg.d_sae, sp.top_pairs, sp.null_draws, rng)
            if arm == "ortho" and log_sets:
                links["ortho_training_log"] = sa.link(
                    log_sets, flagged, ortho.cfg.d_sae, sp.top_pairs, sp.null_draws, rng
                )
    synthetic = {}
    for run_dir in sorted(SYNTHETIC.glob("*/seed_*")):
        res = sa.synthetic_link(run_dir, sp.top_pairs, sp.null_draws, rng)
        if res:
            synthetic.setdefault(run_dir.parent.name, {})[run_dir.name] = res
    for runs in synthetic.values():  # the mean over training seeds, per hierarchy
        runs["mean"] = {
            kind: {
                stat: round(float(np.nanmean([r[kind][stat] for r in runs.values()])), 5)
                for stat in ("fraction", "null")
            }
            for kind in ("parent_child", "siblings")
        }
    result["absorption_link"] = {"first_letter": links, "synthetic": synthetic}
    result["seconds"] = round(time.perf_counter() - t0, 1)

    plots.jaccard_lag(result, PLOTS / "jaccard_lag.png")
    plots.persistence(result, PLOTS / "persistence.png")
    plots.seed_match(result, PLOTS / "seed_match.png")
    atomic_write_text(OUT, json.dumps(result, indent=2) + "\n")
    print(json.dumps(_headline(result)))


def _headline(result: dict) -> dict:
    within = result.get("within_run") or {}
    return {
        "jaccard_at_lag": {k: (v["jaccard"], v["null"]) for k, v in within.get("jaccard_at_lag", {}).items()},
        "distinct_pairs": within.get("distinct_pairs"),
        "snapshots": {
            a: {k: (v["jaccard"], v["null"]) for k, v in s["jaccard_at_lag"].items()}
            for a, s in result["snapshots"].items()
        },
        "seconds": result["seconds"],
    }


if __name__ == "__main__":
    main()
