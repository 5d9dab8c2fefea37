"""metrics/report.md of the study (stage `report`): the markdown tables built from sae_ortho/study/report.py's
results and statistics."""

from __future__ import annotations

import math

import numpy as np

from sae_ortho.study.report import (
    FIGURES,
    StudyResults,
    comparisons,
    efficiency,
    headline_table,
    lm_figures,
    stage_times,
    synthetic_per_seed,
)
from sae_ortho.study.synthetic_stats import decide


def fmt(cell: dict | None, digits: int = 4) -> str:
    if not cell or "mean" not in cell:
        return "n/a"
    if cell.get("n", 1) > 1 and math.isfinite(cell.get("std", math.nan)):
        return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"
    return f"{cell['mean']:.{digits}f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows)]


def _num(v, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


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
        "(the sweep chose `best` on others). SAEBench probing: the first SAE seed only (~90 s an SAE). "
        "(nm) marks first-letter absorption with fewer than absorption.min_carried_letters letters carried "
        "by one latent: not meaningful.",
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
    eff = efficiency(table)
    if eff:
        out += [
            "Absorption reduction efficiency (synthetic absorption removed per unit of relative FVU increase; "
            "n/a where the FVU increase is within seed sd): " + "; ".join(f"{a} {_num(v, 3)}" for a, v in eff.items()),
            "",
        ]
    return out


def _comparisons(r: StudyResults) -> list[str]:
    """Which differences from the baseline count (Holm over the family actually tested)."""
    out: list[str] = []
    s, table = r.study, headline_table(r)
    comps = comparisons(table, s.alpha)
    out += [
        "## Which differences from the baseline count",
        "",
        f"Welch t-test across seeds, Holm-corrected over every (arm, primary metric) pair at alpha {s.alpha}; "
        "a difference counts only if Holm rejects AND it exceeds the larger seed sd AND the metric's reseed noise.",
        "",
    ]
    out += _table(
        ["arm", "metric", "difference", "relative", "p (Welch)", "Holm rejects", "seed sd", "reseed noise", "counts"],
        [
            [
                c["arm"],
                c["metric"],
                _num(c["difference"]),
                _num(c["relative"], 3),
                _num(c["p_welch"], 4),
                str(c["holm_rejects"]),
                _num(c["seed_spread"]),
                _num(c["reseed_noise"]),
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
    out += _table(["arm", "tokens", "first-letter absorption", "meaningful", "FVU"], rows)
    return out


def _declared(r: StudyResults) -> list[str]:
    """The declared test on the synthetic grid: per arm the pooled paired difference of the primary and
    the guard, Holm, the verdict by the declared rule, and the power reached."""
    if "baseline" not in r.synthetic_headline:
        return []
    d = decide(r.study, r.synthetic_headline)
    m, g = r.study.measures, r.study.synthetic_grid
    units = len(g.instances) * len(g.seeds)
    out = [
        "",
        f"## The declared test (study/params.yaml `measures`): {m.primary} on the synthetic grid",
        "",
        f"Paired units: {units} (benchmark instance x SAE seed; each unit's difference averaged over "
        f"{len(g.regimes)} regimes x the hierarchies). Holm over "
        f"{', '.join(m.holm_family)} at alpha {r.study.alpha:g}; an arm reduces absorption when Holm rejects, the "
        f"primary falls by >= {m.smallest_effect:.0%} relative and the guard ({m.guard}) by <= {m.guard_max_drop:g}.",
        "",
    ]
    rows = []
    for arm, row in d["arms"].items():
        p, gd, pw = row[m.primary], row[m.guard], row.get("power", {})
        rows.append([
            arm, _num(p["arm_mean"]), _num(p["baseline_mean"]), _num(p["mean"]),
            f"[{_num(p['ci95'][0])}, {_num(p['ci95'][1])}]", _num(p["relative"], 3), _num(p["p"]),
            str(row["holm_rejects"]), _num(gd["mean"]), _num(pw.get("power_reached"), 2),
            str(pw.get("units_needed", "n/a")), _num(pw.get("minimum_detectable_effect")), row["verdict"],
        ])  # fmt: skip
    head = ["arm", "mean", "baseline", "paired diff", "95% CI", "relative", "paired t p", "Holm rejects",
            "guard diff", "power at smallest effect", "units needed", "MDE (80%)", "verdict"]  # fmt: skip
    out += _table(head, rows)
    noise = d["reseed_noise"][m.primary]
    out += ["", f"Evaluation reseed noise of the primary (baseline, second draw; sd per run): {_num(noise['sd'])} "
            f"over {noise['n']} runs."]  # fmt: skip
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
    for section in (_selection, _sweep, _declared, _headline, _comparisons, _scaling, _wall_time):
        out += section(r)
    out += ["", "## Plots", ""] + [f"![{p}](study/plots/{p})" for p in plots] + [""]
    return "\n".join(out)
