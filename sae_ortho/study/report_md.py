"""metrics/report.md of the study (stage `report`): the markdown tables built from sae_ortho/study/report.py's
results and statistics."""

from __future__ import annotations

import math

import numpy as np

from sae_ortho.study.report import (
    FIGURES,
    StudyResults,
    comparisons,
    hardware_noise,
    headline_table,
    lm_figures,
    stage_times,
    synthetic_per_seed,
)
from sae_ortho.study.report_synthetic import declared_sections
from sae_ortho.study.report_synthetic import num as _num
from sae_ortho.study.report_synthetic import table as _table


def fmt(cell: dict | None, digits: int = 4) -> str:
    if not cell or "mean" not in cell:
        return "n/a"
    if cell.get("n", 1) > 1 and math.isfinite(cell.get("std", math.nan)):
        return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"
    return f"{cell['mean']:.{digits}f}"


def _selection(r: StudyResults) -> list[str]:
    """The rule, the chosen arm and every candidate's figures."""
    out: list[str] = []
    sel = r.selection
    out += [
        "## Selection (rule declared in study/params.yaml before the headline runs)",
        "",
        f"Rule: {sel.get('rule', 'n/a')}.",
        "",
    ]
    for remedy, chosen in sel.get("remedies", {}).items():
        out += [
            f"Selected for {remedy}: **{chosen['selected']}** (any admissible: {chosen['any_admissible']}; "
            f"baseline primary {_num(sel['baseline_synthetic_primary'])}).",
            "",
        ]
        out += _table(
            ["arm", "primary", "guard drop", "cheap-LM FVU increase", "CE-recovered drop", "admissible"],
            [
                [
                    a,
                    _num(c["synthetic_primary"]),
                    _num(c["guard_drop"]),
                    _num(c["fvu_increase"]),
                    _num(c["ce_recovered_drop"]),
                    str(c["admissible"]),
                ]
                for a, c in chosen["candidates"].items()
            ],
        ) + [""]
    return out


def _sweep(r: StudyResults) -> list[str]:
    """Every sweep and ablation arm: synthetic absorption and the cheap LM SAE's costs."""
    out: list[str] = []
    s = r.study
    out += [
        f"## Sweep (cost: cheap LM SAEs, {s.sweep_tokens:,} tokens; absorption: the synthetic benchmark, "
        "the default's seeds)",
        "",
    ]
    rows = []
    for arm, pair in {**r.sweep, **{f"ablation {k}": v for k, v in r.ablation.items()}}.items():
        lm, syn = pair.get("lm"), pair.get("synthetic")
        f = lm_figures(lm) if lm else {}
        rows.append(
            [
                arm,
                _num(float(np.mean(synthetic_per_seed(syn)))) if syn else "n/a",
                _num(f.get("fvu")),
                _num(f.get("ce_recovered")),
                _num(f.get("tau_final"), 3),
                _num(f.get("pair_jaccard_lag1"), 3),
                _num(f.get("penalty_share"), 3),
            ]
        )
    out += _table(
        [
            "arm",
            "synthetic absorption",
            "FVU",
            "CE recovered",
            "final tau",
            "pair Jaccard lag 1",
            "penalty share",
        ],
        rows,
    )
    return out


def _headline(r: StudyResults) -> list[str]:
    """The headline table over seeds, letters carried, efficiency."""
    out: list[str] = []
    s, table = r.study, headline_table(r)
    seeds = s.synthetic_grid.seeds
    out += [
        "",
        f"## Headline ({len(s.headline_seeds)} SAE seeds, full size; mean ± sd over seeds)",
        "",
        f"Synthetic absorption: every headline arm on fresh training seeds {', '.join(map(str, seeds))} "
        "(the sweep chose `best` on others). SAEBench probing and core metrics: every SAE seed. First-letter "
        "absorption: the first SAE seed only; (nm) marks it where fewer than absorption.min_carried_letters "
        "letters are carried by one latent: not meaningful.",
        "",
    ]
    keys = list(FIGURES)
    rows = [[arm, *(fmt(table[arm].get(k), 3 if k in ("train_seconds",) else 4) for k in keys)] for arm in table]
    for row, arm in zip(rows, table, strict=True):
        if not table[arm].get("first_letter_meaningful", {}).get("all", True):
            row[1 + keys.index("first_letter_absorption")] += " (nm)"
    out += _table(["arm", *(FIGURES[k][0] for k in keys)], rows)
    carried = {arm: table[arm].get("letters_carried", {}).get("values") for arm in table}
    out += [
        "",
        "Letters carried by one latent per seed (first-letter figures count only where every seed reaches the bar): "
        + "; ".join(f"{a} {v}" for a, v in carried.items() if v),
        "",
    ]
    return out


def _comparisons(r: StudyResults) -> list[str]:
    """Which differences from the baseline count (Holm over the family actually tested)."""
    out: list[str] = []
    s, table = r.study, headline_table(r)
    hardware = hardware_noise()
    comps = comparisons(table, s.alpha, hardware)
    out += [
        "## Which differences from the baseline count",
        "",
        f"LM figures (secondary): paired t-test over SAE seeds, Holm-corrected over every (arm, figure) pair "
        f"tested here at alpha {s.alpha}; a difference counts only if Holm rejects AND it exceeds the figure's "
        "reseed noise and its hardware noise (the default run's largest difference across kernel paths on one "
        "machine: AVX2 vs AVX-512, 1 vs 2 threads; `make hardware-noise`"
        + ("" if hardware else ", not measured: counted as 0")
        + "). The study's conclusion is the declared synthetic test above.",
        "",
    ]
    out += _table(
        [
            "arm",
            "metric",
            "seeds",
            "paired diff",
            "95% CI",
            "relative",
            "p (paired t)",
            "Holm rejects",
            "reseed noise",
            "hardware noise",
            "counts",
        ],
        [
            [
                c["arm"],
                c["metric"],
                str(c["n"]),
                _num(c["difference"]),
                f"[{_num(c['ci95'][0])}, {_num(c['ci95'][1])}]",
                _num(c["relative"], 3),
                _num(c["p_paired"], 4),
                str(c["holm_rejects"]),
                _num(c["reseed_noise"]),
                _num(c["hardware_noise"]),
                ("**yes**" if c["counts"] else "no") if c["meaningful"] else "not meaningful",
            ]
            for c in comps
        ],
    )
    return out


def _scaling(r: StudyResults) -> list[str]:
    """First-letter absorption against training tokens."""
    out: list[str] = []
    out += ["", "## Absorption against training tokens", ""]
    rows = [
        [
            arm,
            f"{t:,}",
            _num(m["absorption"]["mean_absorption_fraction"]),
            str(m["absorption"]["meaningful"]),
            _num(m["core"]["fvu"]),
        ]
        for arm, points in r.scaling.items()
        for t, m in points.items()
    ]
    if not rows:  # study/params.yaml scaling_arms: [] cuts the axis; an empty table would read as a failure
        return out + ["Not run: study/params.yaml `scaling_arms` is empty (the LM scaling axis is cut)."]
    out += _table(["arm", "tokens", "first-letter absorption", "meaningful", "FVU"], rows)
    return out


def _cross_seed(r: StudyResults) -> list[str]:
    """Feature matching across each headline arm's LM seeds and the mapped kept-pair overlap, against nulls."""
    if not r.cross_seed:
        return []
    out = ["", "## Features and kept pairs across LM seeds (each extra seed matched to the first)", ""]
    rows = []
    for arm, res in r.cross_seed.items():
        for e in res["pairs"]:
            shared = e["shared"]
            t = max(shared, key=float) if shared else None
            rows.append([
                arm, f"{res['seeds'][0]} vs {e['seed']}", _num(e["mean_cos"]),
                _num(e["null_rotation"]["mean_cos"]), _num(e["null_covariance"]["mean_cos"]),
                f"{_num(shared[t])} (cos >= {t})" if t else "n/a",
                _num(e["kept_pair_overlap"]["jaccard"]), _num(e["kept_pair_overlap"]["null"]),
            ])  # fmt: skip
    out += _table(["arm", "seeds", "matched mean cos", "null: rotation", "null: covariance", "shared",
                   "kept-pair Jaccard (mapped)", "null (re-paired)"], rows)  # fmt: skip
    return out


def _wall_time(r: StudyResults) -> list[str]:
    """Wall time of the study's stages per group."""
    out: list[str] = []
    out += ["", "## Wall time of the study's stages (seconds, as each stage recorded it)", ""]
    out += _table(
        ["group", "stages", "seconds", "minutes"],
        [[g, str(n), f"{t:.0f}", f"{t / 60:.1f}"] for g, (n, t) in stage_times(r).items()],
    )
    return out


def render(r: StudyResults, plots: list[str]) -> str:
    """metrics/report.md."""
    out = [
        "# The study: report",
        "",
        "Generated by the `report` stage of study/dvc.yaml from metrics/study/ (pinned by study/dvc.lock).",
        "",
    ]
    for section in (_selection, _sweep, declared_sections, _headline, _comparisons, _cross_seed, _scaling, _wall_time):
        out += section(r)
    out += ["", "## Plots", ""] + [f"![{p}](study/plots/{p})" for p in plots] + [""]
    return "\n".join(out)
