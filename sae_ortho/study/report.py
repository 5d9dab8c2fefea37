"""The study's results (stage `report` of study/dvc.yaml): loading, headline table, tests between arms
(the markdown: sae_ortho/study/report_md.py; the plots: sae_ortho/study/report_plots.py).

Every figure is read from the study's metrics files (metrics/study/...), which the committed
study/dvc.lock pins. The declared test is the synthetic one (synthetic_stats.py). On the LM figures
(secondary), a difference from the baseline *counts* only when both hold:
  1. a paired t-test over SAE seeds, Holm-corrected over every (arm, figure) pair tested, rejects;
  2. it exceeds the figure's noise that seeds do not show: the evaluation's reseed noise (first-letter:
     the letter-cache seeds' range) and the hardware noise (the largest difference of the default run
     across kernel paths on one machine: metrics/hardware_noise.json, bench/hardware_noise.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_ortho.base.stats import holm
from sae_ortho.base.study_params import StudyParams
from sae_ortho.study.power import paired_difference
from sae_ortho.study.synthetic_stats import per_unit

METRICS = Path("metrics/study")
HARDWARE_NOISE = Path("metrics/hardware_noise.json")

# LM figures compared with the baseline over SAE seeds (secondary; first-letter absorption has one seed)
LM_COMPARED = ("first_letter_absorption", "probing_top_1", "probing_top_5", "fvu", "ce_recovered")
# Headline figures per arm: key -> (label, lower is better?)
FIGURES = {
    "synthetic_absorption": ("synthetic absorption (declared primary measure, pooled over the grid)", True),
    "first_letter_absorption": ("first-letter mean absorption fraction", True),
    "probing_top_1": ("sparse probing top-1", False),
    "probing_top_5": ("sparse probing top-5", False),
    "fvu": ("FVU (held-out)", True),
    "l0": ("L0", None),
    "ce_recovered": ("CE loss recovered (BOS kept)", False),
    "ce_recovered_all_positions": ("CE loss recovered (SAELens: zero-ablate BOS too)", False),
    "dead_fraction_training": ("dead fraction (training-time count)", True),
    "train_seconds": ("training seconds", True),
    "penalty_share": ("penalty share of the step", True),
    "pair_jaccard_lag1": ("kept-pair Jaccard, lag 1 log", None),
}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class StudyResults:
    study: StudyParams
    selection: dict
    sweep: dict[str, dict]  # arm -> {"lm": ..., "synthetic": ...}
    ablation: dict[str, dict]
    headline: dict[str, list[dict]]  # arm -> per-seed LM metrics
    synthetic_headline: dict[str, dict]  # arm -> synthetic metrics on fresh seeds (not the sweep's)
    scaling: dict[str, dict[int, dict]]  # arm -> tokens -> LM metrics
    cross_seed: dict[str, dict]  # arm -> feature matching across its LM seeds (stage lm_cross_seed)

    @classmethod
    def load(cls, study: StudyParams, root: Path = METRICS) -> StudyResults:
        selection = _read(root / "selection.json") or {}

        def group(name: str, arms) -> dict[str, dict]:
            out = {}
            for arm in arms:
                lm, syn = _read(root / name / f"{arm}.json"), _read(root / "synthetic" / name / f"{arm}.json")
                if lm or syn:
                    out[arm] = {"lm": lm, "synthetic": syn}
            return out

        headline = {}
        for arm in study.headline_arms:
            runs = [_read(root / "headline" / f"{arm}_s{s}.json") for s in study.headline_seeds]
            if any(runs):
                headline[arm] = [r for r in runs if r]
        synthetic_headline = {}
        for arm in study.headline_arms:
            if (found := _read(root / "synthetic" / "headline" / f"{arm}.json")) is not None:
                synthetic_headline[arm] = found
        scaling: dict[str, dict[int, dict]] = {}
        for arm in study.scaling_arms:
            points = {}
            for tokens in study.scaling_tokens:
                if m := _read(root / "scaling" / f"{arm}_t{tokens}.json"):
                    points[tokens] = m
            if m := _read(root / "headline" / f"{arm}_s{study.headline_seeds[0]}.json"):
                points[m["train_tokens"]] = m
            scaling[arm] = dict(sorted(points.items()))
        cross = {arm: m for arm in study.headline_arms if (m := _read(root / "cross_seed" / f"{arm}.json"))}
        return cls(
            study,
            selection,
            group("sweep", study.sweep),
            group("ablation", study.ablation),
            headline,
            synthetic_headline,
            scaling,
            cross,
        )


def lm_figures(m: dict) -> dict[str, float | None]:
    """The per-run LM figures of one metrics file (None where the run has no such figure: the cheap
    sweep SAEs have no absorption or probing; first-letter absorption runs on the first headline seed only)."""
    absorption, probing = m.get("absorption") or {}, m.get("probing") or {}
    pairs = m.get("pair_stability") or {}
    return {
        "first_letter_absorption": absorption.get("mean_absorption_fraction"),
        "first_letter_reseed": absorption.get("mean_absorption_fraction_reseed_range"),
        "first_letter_meaningful": absorption.get("meaningful"),
        "letters_carried": absorption.get("letters_carried_by_one_latent"),
        "probing_top_1": probing.get("top_1"),
        "probing_top_5": probing.get("top_5"),
        "fvu": m["core"]["fvu"],
        "l0": m["core"]["l0"],
        "ce_recovered": m["core"]["ce_recovered_vs_zero"],
        "ce_recovered_all_positions": m["core"].get("ce_recovered_vs_zero_all_positions"),
        "dead_fraction_training": m["train"].get("dead_fraction"),  # the trainer's count, not 2k held-out tokens
        "train_seconds": m["train"].get("seconds"),
        "penalty_share": m["train"].get("penalty_overhead"),
        "pair_jaccard_lag1": pairs.get("jaccard_lag_1"),
        "tau_final": m["train"].get("tau"),
    }


def synthetic_per_seed(syn: dict) -> list[float]:
    """Per (benchmark instance, seed) unit: the declared primary measure averaged over that instance's
    cells (regime x hierarchy), the unit the declared test pairs on (synthetic_stats.py)."""
    units = per_unit(syn, syn["measures"]["primary"])
    return [units[u] for u in sorted(units)]


def mean_std(values: list[float | None]) -> tuple[float, float, int] | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan, len(vals)


def headline_table(r: StudyResults) -> dict[str, dict[str, dict]]:
    """arm -> figure -> {mean, std, n, values}: LM figures over SAE seeds, synthetic over its seeds."""
    table: dict[str, dict[str, dict]] = {}
    for arm in r.study.headline_arms:
        row: dict[str, dict] = {}
        runs = [lm_figures(m) for m in r.headline.get(arm, [])]
        for key in FIGURES:
            values = (
                synthetic_per_seed(r.synthetic_headline[arm])
                if key == "synthetic_absorption" and arm in r.synthetic_headline
                else [run.get(key) for run in runs]
            )
            if (ms := mean_std(values)) is not None:
                row[key] = {"mean": ms[0], "std": ms[1], "n": ms[2], "values": [v for v in values if v is not None]}
        lettered = [run for run in runs if run["first_letter_meaningful"] is not None]  # the seeds it ran on
        if lettered:
            row["first_letter_meaningful"] = {"all": all(run["first_letter_meaningful"] for run in lettered)}
            row["first_letter_reseed"] = {"mean": float(np.mean([run["first_letter_reseed"] or 0 for run in lettered]))}
            row["letters_carried"] = {"values": [run["letters_carried"] for run in lettered]}
        table[arm] = row
    return table


def hardware_noise(path: Path = HARDWARE_NOISE) -> dict[str, float]:
    """Per headline figure, the largest difference of the default run across kernel paths on one machine
    (AVX2 vs AVX-512, 1 vs 2 threads: bench/hardware_noise.py); empty where it was never measured."""
    if not path.exists():
        return {}
    return {k: float(v) for k, v in json.loads(path.read_text())["noise_by_metric"].items()}


def comparisons(
    table: dict[str, dict[str, dict]], alpha: float, hardware: dict[str, float] | None = None
) -> list[dict]:
    """Every arm against the baseline on the LM figures (secondary: the declared test is the synthetic one,
    synthetic_stats.py): paired over SAE seeds (a seed gives every arm the same init and token stream),
    paired t, Holm over the (arm, figure) pairs tested here; a difference counts only if Holm rejects and
    it exceeds both the figure's reseed noise (first-letter absorption: the letter cache's reseeds) and its
    hardware noise (`hardware`, from hardware_noise())."""
    hardware = hardware or {}
    base = table.get("baseline", {})
    rows, p_values = [], {}
    for arm, row in table.items():
        if arm == "baseline":
            continue
        for metric in LM_COMPARED:
            if metric not in row or metric not in base:
                continue
            a, b = np.array(row[metric]["values"]), np.array(base[metric]["values"])
            n = min(len(a), len(b))
            paired = paired_difference(a[:n], b[:n])
            p = paired["p"] if paired["p"] is not None else math.nan
            if metric == "first_letter_absorption":
                meaningful = row.get("first_letter_meaningful", {}).get("all") and base.get(
                    "first_letter_meaningful", {}
                ).get("all")
                reseed = max(row["first_letter_reseed"]["mean"], base["first_letter_reseed"]["mean"])
            else:
                meaningful, reseed = True, 0.0
            key = f"{arm}:{metric}"
            if meaningful and math.isfinite(p):
                p_values[key] = p
            diff = paired["mean"] if paired["mean"] is not None else math.nan
            rows.append(
                {
                    "key": key,
                    "arm": arm,
                    "metric": metric,
                    "n": n,
                    "difference": diff,
                    "ci95": paired["ci95"],
                    "relative": diff / b[:n].mean() if n and b[:n].mean() else math.nan,
                    "p_paired": p,
                    "reseed_noise": reseed,
                    "hardware_noise": hardware.get(metric, 0.0),
                    "meaningful": bool(meaningful),
                }
            )
    rejected = holm(p_values, alpha) if p_values else {}
    for row in rows:
        row["holm_rejects"] = rejected.get(row["key"], False)
        noise = max(row["reseed_noise"], row["hardware_noise"])
        row["counts"] = bool(row["holm_rejects"] and abs(row["difference"]) > noise)
    return rows


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else 0.0


def stage_times(r: StudyResults) -> dict[str, tuple[int, float]]:
    """group -> (stages, seconds): LM stages record their whole run (training, evaluation), synthetic
    stages their training and evaluation of every hierarchy and seed."""
    groups: dict[str, list[float]] = {}
    for name, arms in (("sweep", r.sweep), ("ablation", r.ablation)):
        for pair in arms.values():
            if pair.get("lm"):
                groups.setdefault(f"lm {name}", []).append(pair["lm"]["stage_seconds"])
            if pair.get("synthetic"):
                groups.setdefault(f"synthetic {name}", []).append(pair["synthetic"]["seconds"])
    for runs in r.headline.values():
        groups.setdefault("lm headline", []).extend(m["stage_seconds"] for m in runs)
    for syn in r.synthetic_headline.values():
        groups.setdefault("synthetic headline", []).append(syn["seconds"])
    for points in r.scaling.values():  # the headline's point is counted there
        groups.setdefault("lm scaling", []).extend(
            m["stage_seconds"] for t, m in points.items() if t in r.study.scaling_tokens
        )
    out = {g: (len(v), float(sum(v))) for g, v in groups.items() if v}
    out["total"] = (sum(n for n, _ in out.values()), sum(t for _, t in out.values()))
    return out


def headline_json(r: StudyResults) -> dict:
    """Compact headline figures (mean over seeds) per arm: the first metrics `dvc exp show` lists."""
    table = headline_table(r)
    keys = ("synthetic_absorption", "first_letter_absorption", "probing_top_1", "probing_top_5", "fvu", "ce_recovered")
    return {arm: {k: round(row[k]["mean"], 5) for k in keys if k in row} for arm, row in table.items()}
