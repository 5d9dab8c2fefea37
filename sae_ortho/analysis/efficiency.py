"""Absorption reduction efficiency (stage `efficiency@<arm>`): what an arm buys against the cached baseline.

Reductions (relative, 1 - arm / baseline), each with a paired bootstrap 95% interval:
- first-letter (metrics/absorption): mean absorption fraction and full-absorption rate, over the
  (seed, letter) units both SAEs evaluate; a difference inside the metric's reseed range is flagged;
- synthetic (models/synthetic/<arm>/<hierarchy>/seed_<s>/matching.json): absorption rate and
  partial absorption per hierarchy, over the (seed, parent/child pair) units.
Costs, each with an interval: FVU increase and CE-recovered decrease on the held-out set (paired
bootstrap over held-out contexts, from data/core/<sae>.safetensors), and the training overhead (the
penalty's own timed share of the step, metrics/train/<arm>.json).
Efficiency = reduction / cost; where the cost's interval includes 0 the ratio means nothing, and the
entry says "reduction at no measurable cost" with the interval instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from sae_ortho.base.io import verified
from sae_ortho.base.stats import bootstrap_indices, percentile_ci

N_BOOT = 2000


def relative_reduction(base: np.ndarray, arm: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """1 - mean(arm) / mean(base) over paired units, resampling units jointly."""
    keep = np.isfinite(base) & np.isfinite(arm)
    base, arm = base[keep], arm[keep]
    out = {"units": int(len(base)), "baseline": None, "arm": None, "relative_reduction": None, "ci95": [None, None]}
    if len(base) == 0:
        return out
    out.update(baseline=round(float(base.mean()), 5), arm=round(float(arm.mean()), 5))
    if base.mean() <= 0:
        out["note"] = "baseline shows no absorption on these units: a relative reduction is undefined"
        return out
    idx = bootstrap_indices(len(base), n_boot, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = 1 - arm[idx].mean(1) / base[idx].mean(1)
    out["relative_reduction"] = round(float(1 - arm.mean() / base.mean()), 5)
    out["ci95"] = percentile_ci(boots)
    return out


def first_letter_reductions(base: dict, arm: dict, n_boot: int = N_BOOT) -> dict:
    out = {}
    for key in ("mean_absorption_fraction", "full_absorption_rate"):
        b_vals, a_vals = [], []
        for b_seed, a_seed in zip(base["per_seed"], arm["per_seed"], strict=True):
            for letter, b_row in b_seed["per_letter"].items():
                a_row = a_seed["per_letter"][letter]
                # The LLM probe gate does not depend on the SAE; a letter without examined words has no value.
                if b_row["probe_f1"] > base["settings"]["probe_f1_gate"] and key in b_row and key in a_row:
                    b_vals.append(b_row[key])
                    a_vals.append(a_row[key])
        r = relative_reduction(np.array(b_vals, float), np.array(a_vals, float), n_boot)
        noise = [x for x in (base.get(f"{key}_reseed_range"), arm.get(f"{key}_reseed_range")) if x is not None]
        if noise and base[key] is not None and arm[key] is not None:
            r["absolute_difference"] = round(arm[key] - base[key], 5)
            r["reseed_range"] = max(noise)
            r["beyond_reseed_noise"] = abs(arm[key] - base[key]) > max(noise)
        r["meaningful"] = bool(base["meaningful"] and arm["meaningful"])
        out[key] = r
    return out


def _matching(directory: Path) -> dict[str, dict[int, dict]]:
    """hierarchy -> seed -> per_pair arrays, from one synthetic arm's output directory."""
    out: dict[str, dict[int, dict]] = {}
    for path in sorted(directory.glob("*/seed_*/matching.json")):
        per_pair = json.loads(path.read_text())["per_pair"]
        seed = int(path.parent.name.removeprefix("seed_"))
        out.setdefault(path.parent.parent.name, {})[seed] = {
            k: np.array([np.nan if v is None else v for v in vals], float)
            for k, vals in per_pair.items()
            if isinstance(vals, list)
        }
    return out


def synthetic_reductions(base_dir: Path, arm_dir: Path, n_boot: int = N_BOOT) -> dict:
    base, arm = _matching(base_dir), _matching(arm_dir)
    out: dict = {}
    for hierarchy in sorted(set(base) & set(arm)):
        seeds = sorted(set(base[hierarchy]) & set(arm[hierarchy]))
        out[hierarchy] = {}
        for key in ("absorption", "partial"):
            b = np.concatenate([base[hierarchy][s][key] for s in seeds])
            a = np.concatenate([arm[hierarchy][s][key] for s in seeds])
            out[hierarchy][key] = {**relative_reduction(b, a, n_boot), "seeds": seeds}
    return out


def _load_context_sums(path: Path) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_file(str(verified(path))).items()}


def _fvu(c: dict, idx) -> np.ndarray:
    return c["sq_err"][idx].sum(-1) / c["variance"][idx].sum(-1)


def _ce_recovered(c: dict, idx) -> np.ndarray:
    zero, clean, sae = (c[k][idx].sum(-1) for k in ("ce_zero", "ce_clean", "ce_sae"))
    return (zero - sae) / (zero - clean)


def cost_deltas(base_path: Path, arm_path: Path, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """FVU increase and CE-recovered (vs zero-ablation) decrease, arm minus baseline, with intervals
    from resampling held-out contexts jointly for both SAEs."""
    base, arm = _load_context_sums(base_path), _load_context_sums(arm_path)
    n = len(base["sq_err"])
    everything = np.arange(n)
    idx = bootstrap_indices(n, n_boot, seed)
    out = {}
    for name, fn, sign in (("fvu_increase", _fvu, 1), ("ce_recovered_decrease", _ce_recovered, -1)):
        point = sign * (fn(arm, everything) - fn(base, everything))
        boots = sign * (fn(arm, idx) - fn(base, idx))
        out[name] = {"value": round(float(point), 6), "ci95": percentile_ci(boots), "contexts": n}
    return out


def efficiency_table(reductions: dict[str, dict], costs: dict[str, dict]) -> dict:
    """reduction / cost for every pair, or "reduction at no measurable cost" where the cost's interval includes 0."""
    table: dict = {}
    for measure, r in reductions.items():
        table[measure] = {}
        for cost_name, c in costs.items():
            lo, hi = c["ci95"]
            if r["relative_reduction"] is None or lo is None:
                table[measure][cost_name] = None
            elif lo <= 0 <= hi:
                table[measure][cost_name] = {"reduction at no measurable cost": True, "cost_ci95": c["ci95"]}
            else:
                table[measure][cost_name] = round(r["relative_reduction"] / c["value"], 4)
    return table


def arm_efficiency(
    arm: str,
    absorption: tuple[dict, dict],
    context_sums: tuple[Path, Path],
    synthetic_dirs: tuple[Path, Path] | None,
    train_metrics: dict,
) -> dict:
    """Everything for one arm; each pair is (baseline, arm)."""
    reductions = {f"first_letter.{k}": v for k, v in first_letter_reductions(*absorption).items()}
    if synthetic_dirs is not None:
        for hierarchy, measures in synthetic_reductions(*synthetic_dirs).items():
            reductions.update({f"synthetic.{hierarchy}.{k}": v for k, v in measures.items()})
    costs = cost_deltas(*context_sums)
    if "penalty_overhead" in train_metrics:
        costs["training_overhead"] = {
            "value": train_metrics["penalty_overhead"],
            "ci95": train_metrics["penalty_overhead_ci95"],
            "definition": "penalty seconds / other seconds of the training step (timed around its calls)",
        }
    return {"arm": arm, "reductions": reductions, "costs": costs, "efficiency": efficiency_table(reductions, costs)}
