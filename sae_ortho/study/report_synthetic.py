"""The report's synthetic sections (metrics/report.md): the declared test and its verdicts, effects per
regime and hierarchy, the secondary measures, parent recall, tau, absorption against training samples,
efficiency within the benchmark, and the evaluation's own reseed noise (numbers: synthetic_stats.py)."""

from __future__ import annotations

import math

import numpy as np

from sae_ortho.study.power import paired_difference
from sae_ortho.study.report import StudyResults
from sae_ortho.study.synthetic_stats import CELL, decide


def num(v, digits: int = 4) -> str:
    """A figure for a markdown table: n/a for None and non-finite."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    line = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    return [line(head), line(["---"] * len(head)), *(line(r) for r in rows)]


def _ci(ci) -> str:
    return f"[{num(ci[0])}, {num(ci[1])}]"


def by_slice(arm: dict, base: dict, measure: str) -> dict[str, dict]:
    """'regime/hierarchy' -> paired difference over (instance, seed) runs of that slice."""
    pairs: dict[str, tuple[list, list]] = {}
    for cell, hierarchies in arm["cells"].items():
        regime = CELL.fullmatch(cell)["regime"]
        for name, h in hierarchies.items():
            a, b = pairs.setdefault(f"{regime}/{name}", ([], []))
            a += h[measure]["per_seed"]
            b += base["cells"][cell][name][measure]["per_seed"]
    as_array = lambda xs: np.array([np.nan if x is None else x for x in xs], dtype=float)  # noqa: E731
    return {k: paired_difference(as_array(a), as_array(b)) for k, (a, b) in sorted(pairs.items())}


def findings(d: dict, primary: str, guard: str) -> list[str]:
    """Per tested arm: the finding, its evidence, and what result would have changed it."""
    out = ["", "### Findings, their evidence, and what would change them", ""]
    for arm, row in d["arms"].items():
        if not row["in_family"]:
            continue
        p, g, pw = row[primary], row[guard], row.get("power", {})
        evidence = (
            f"paired difference {num(p['mean'])} {_ci(p['ci95'])} ({num(p['relative'], 3)} relative), "
            f"p {num(p['p'])}, Holm {'rejects' if row['holm_rejects'] else 'does not reject'}; "
            f"guard {num(g['mean'])}"
        )
        mde = num(pw.get("minimum_detectable_effect"))
        change = {
            "reduces absorption": "a guard drop beyond the declared limit, or a CI reaching the smallest effect",
            "forgets parents": "a guard within the declared limit at the same effect",
            "increases absorption": "a CI that crosses zero on more seeds",
            "below the smallest effect": "a relative reduction reaching the smallest effect",
            "not distinguishable from the baseline": f"a true effect of at least {mde} (the 80%-power MDE) would "
            "most likely have been detected; a smaller one is not excluded",
        }[row["verdict"]]
        out.append(f"- **{arm}: {row['verdict']}.** Evidence: {evidence}. Would change with: {change}.")
    return out


def declared_sections(r: StudyResults) -> list[str]:
    if "baseline" not in r.synthetic_headline:
        return []
    d = decide(r.study, r.synthetic_headline)
    m, g = r.study.measures, r.study.synthetic_grid
    base = r.synthetic_headline["baseline"]
    out = [
        "",
        f"## The declared test (study/params.yaml `measures`): {m.primary} on the synthetic grid",
        "",
        f"{len(g.instances)} benchmark instances x {len(g.seeds)} fresh SAE seeds = "
        f"{len(g.instances) * len(g.seeds)} paired units, each unit's arm - baseline difference averaged over "
        f"its {len(g.regimes)} regimes x hierarchies; paired t and a bootstrap 95% CI of the mean difference. "
        f"Holm over {', '.join(m.holm_family)} at alpha {r.study.alpha:g}. An arm reduces absorption when Holm "
        f"rejects, the primary falls by >= {m.smallest_effect:.0%} (relative) and the guard ({m.guard}) by <= "
        f"{m.guard_max_drop:g}. Power: at Holm's most stringent level (alpha / {len(m.holm_family)}) for the "
        "smallest effect, from the observed sd of the paired differences.",
        "",
    ]
    head = ["arm", "mean", "baseline", "paired diff", "95% CI", "relative", "p (paired t)", "Holm rejects",
            "guard diff", "power", "units needed", "MDE (80%)", "verdict"]  # fmt: skip
    rows = []
    for arm, row in d["arms"].items():
        p, gd, pw = row[m.primary], row[m.guard], row.get("power", {})
        rows.append([
            arm, num(p["arm_mean"]), num(p["baseline_mean"]), num(p["mean"]), _ci(p["ci95"]),
            num(p["relative"], 3), num(p["p"]), str(row["holm_rejects"]), num(gd["mean"]),
            num(pw.get("power_reached"), 2), str(pw.get("units_needed", "n/a")),
            num(pw.get("minimum_detectable_effect")), f"**{row['verdict']}**" if row["in_family"] else row["verdict"],
        ])  # fmt: skip
    out += table(head, rows)
    out += findings(d, m.primary, m.guard)
    out += ["", "### Secondary and cost measures (pooled paired differences, not tested)", ""]
    names = [n for n in dict.fromkeys([*m.secondary, *m.cost]) if n != m.primary]
    out += table(
        ["arm", *names],
        [[a, *(f"{num(row[n]['mean'])} {_ci(row[n]['ci95'])}" for n in names)] for a, row in d["arms"].items()],
    )
    out += ["", f"### {m.primary}: paired difference per regime and hierarchy (over instances x seeds)", ""]
    slices = {a: by_slice(r.synthetic_headline[a], base, m.primary) for a in d["arms"]}
    keys = list(next(iter(slices.values()))) if slices else []
    out += table(
        ["arm", *keys], [[a, *(f"{num(s[k]['mean'])} {_ci(s[k]['ci95'])}" for k in keys)] for a, s in slices.items()]
    )
    out += ["", f"### Parent recall ({m.guard}) and tau per arm (mean over the grid)", ""]
    rows = []
    for arm, syn in r.synthetic_headline.items():
        hs = [h for c in syn["cells"].values() for h in c.values()]
        taus = [t for h in hs for t in h.get("tau", {}).get("per_seed", []) if t is not None]
        rows.append([arm, num(float(np.mean([h[m.guard]["mean"] for h in hs]))),
                     num(float(np.mean(taus))) if taus else "n/a (no penalty)"])  # fmt: skip
    out += table(["arm", m.guard, "final tau (synthetic runs)"], rows)
    out += ["", f"### {m.primary} against training samples (first {g.curve_seeds} seeds, all cells)", ""]
    curves = d["curves"]
    samples = sorted({n for c in curves.values() for n in c})
    out += table(
        ["arm", *(f"{n:,}" for n in samples)], [[a, *(num(c.get(n)) for n in samples)] for a, c in curves.items()]
    )
    eff, noise = d["efficiency"], d["reseed_noise"][m.primary]
    out += [
        "",
        "Efficiency within the synthetic benchmark (primary removed per unit of synthetic FVU added; n/a where "
        "the FVU change's 95% CI holds 0 or FVU fell, so there is no cost): "
        + "; ".join(f"{a} {num(v, 3)}" for a, v in eff.items())
        + ".",
        "",
        f"Evaluation reseed noise of the primary (the baseline's runs on a second evaluation draw; sd per run): "
        f"{num(noise['sd'])} over {noise['n']} runs.",
    ]
    return out
