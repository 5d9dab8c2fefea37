"""The study's plots (PNG, matplotlib Agg): one function per figure of metrics/report.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sae_ortho.base.plots import plt, save_png
from sae_ortho.study.report import StudyResults, lm_figures, synthetic_per_seed


def _schedule(name: str, settings: dict) -> str | None:
    """The top-k arms' schedule, "baseline" for the baseline; None for the other remedies (not tau curves)."""
    if name == "baseline":
        return "baseline"
    if settings.get("penalty", "topk") != "topk" or settings.get("matryoshka"):
        return None
    return settings.get("schedule") or "fixed"


def final_tau(pair: dict, source: str) -> float:
    if source == "lm":
        return pair["lm"]["train"]["tau"]
    taus = [t for c in pair["synthetic"]["cells"].values() for h in c.values() for t in h["tau"]["per_seed"]]
    return float(np.mean(taus))


def absorption_vs_tau(r: StudyResults, path: Path) -> None:
    """The declared primary measure (synthetic) and the cost (cheap LM SAE's held-out FVU) of the top-k sweep
    arms against tau, per schedule; adaptive and decaying arms sit at their own runs' final tau (synthetic
    runs' on the left, the LM run's on the right). The baseline is a horizontal line."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (
        ("synthetic", "synthetic absorption (declared primary, pooled)"),
        ("lm", "FVU, held-out (cheap LM SAEs)"),
    )
    for ax, (source, label) in zip(axes, panels, strict=True):
        by_schedule: dict[str, list[tuple[float, float]]] = {}
        for name, pair in r.sweep.items():
            if not pair.get("lm") or not pair.get(source):
                continue
            m = pair["lm"]
            schedule = _schedule(name, m["settings"])
            if schedule is None:
                continue
            y = float(np.mean(synthetic_per_seed(pair["synthetic"]))) if source == "synthetic" else m["core"]["fvu"]
            if schedule == "baseline":
                ax.axhline(y, color="gray", ls="--", label="baseline")
                continue
            # adaptive / decay: the final tau of the runs plotted (synthetic runs' own, not the LM run's)
            tau = m["settings"]["tau"] if schedule == "fixed" else final_tau(pair, source)
            by_schedule.setdefault(schedule, []).append((tau, y))
        for schedule, points in sorted(by_schedule.items()):
            points.sort()
            ax.plot(*zip(*points, strict=True), "o-" if schedule == "fixed" else "s", label=schedule, ms=7)
        ax.set(xscale="log", xlabel="tau (adaptive / decay: final tau)", ylabel=label, title=label)
        ax.legend(fontsize=8)
    save_png(fig, path)


def absorption_vs_fvu(r: StudyResults, path: Path) -> None:
    """The trade-off frontier: every arm's absorption against its FVU, on the synthetic benchmark
    (all arms) and on the LM (headline arms, mean +- std over seeds)."""
    fig, (ax_syn, ax_lm) = plt.subplots(1, 2, figsize=(11, 4.5))
    synthetic = {f"sweep:{a}": p["synthetic"] for a, p in r.sweep.items() if p.get("synthetic")}
    synthetic |= {f"ablation:{a}": p["synthetic"] for a, p in r.ablation.items() if p.get("synthetic")}
    synthetic |= {f"headline:{a}": s for a, s in r.synthetic_headline.items()}  # fresh seeds

    def fvu_of(syn: dict) -> float:
        ev = [h["explained_variance"]["mean"] for c in syn["cells"].values() for h in c.values()]
        return 1 - float(np.mean(ev))

    base = synthetic.get("sweep:baseline")
    for name, syn in synthetic.items():
        fvu, y = fvu_of(syn), float(np.mean(synthetic_per_seed(syn)))
        headline = name.startswith("headline")
        ax_syn.plot(fvu, y, "o", color="C1" if headline else "C0")
        # The cheap arms crowd the baseline: name the headline arms and the sweep arms that pay a cost.
        if headline or base is None or fvu > 1.25 * fvu_of(base):
            ax_syn.annotate(name.split(":")[1], (fvu, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax_syn.plot([], [], "o", color="C1", label="headline arms (fresh seeds)")
    ax_syn.plot([], [], "o", color="C0", label="sweep and ablation arms (selection seeds)")
    ax_syn.legend(fontsize=7)
    ax_syn.set(xlabel="FVU (synthetic, evaluation samples)", ylabel="synthetic absorption", title="Synthetic benchmark")
    for arm, runs in r.headline.items():  # first-letter absorption runs on the first seed only
        figs = [f for f in map(lm_figures, runs) if f["first_letter_absorption"] is not None]
        if not figs:
            continue
        x, y = [f["fvu"] for f in figs], [f["first_letter_absorption"] for f in figs]
        ax_lm.errorbar(np.mean(x), np.mean(y), xerr=np.std(x), yerr=np.std(y), fmt="o", capsize=3, label=arm)
    lettered = [m["absorption"] for runs in r.headline.values() for m in runs if m.get("absorption")]
    meaningful = all(a.get("meaningful") for a in lettered)
    title = "LM, headline arms (mean ± sd)"
    if not meaningful:
        title += "\nfirst-letter: not meaningful (< 10 letters carried)"
    ax_lm.set(xlabel="FVU (held-out)", ylabel="first-letter absorption", title=title)
    if r.headline:
        ax_lm.legend(fontsize=8)
    save_png(fig, path)


def probing_vs_k(r: StudyResults, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, all_runs in r.headline.items():
        runs = [m for m in all_runs if m.get("probing")]  # the first SAE seed
        if not runs:
            continue
        ks = sorted(int(k.split("_")[1]) for k in runs[0]["probing"])
        acc = np.array([[m["probing"][f"top_{k}"] for k in ks] for m in runs])
        ax.errorbar(ks, acc.mean(0), yerr=acc.std(0), marker="o", capsize=3, label=arm)
    ax.set(xscale="log", xlabel="k (latents per probe)", ylabel="test accuracy (mean of tasks)")
    ax.set_title("SAEBench sparse probing, headline arms (first seed)")
    ax.legend(fontsize=8)
    save_png(fig, path)


def jaccard_vs_lag(r: StudyResults, path: Path) -> None:
    """Kept-pair Jaccard against lag (in logged steps) from the headline runs' pair logs, with the
    degree-preserving null, for the arms that log pairs."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, runs in r.headline.items():
        curve = (runs[0].get("pair_stability") or {}).get("curve")
        if curve is None:
            continue
        (line,) = ax.plot(curve["lag"], curve["jaccard"], "o-", label=arm)
        ax.plot(curve["lag"], curve["null"], "--", color=line.get_color(), alpha=0.6, label=f"{arm} null")
    ax.set(xscale="log", xlabel="lag (logs of the pair set)", ylabel="mean Jaccard", ylim=(0, None))
    ax.set_title("Penalised pair sets over training (seed 0)")
    ax.legend(fontsize=8)
    save_png(fig, path)


def topk_ablation(r: StudyResults, path: Path) -> None:
    """Synthetic absorption and cheap-LM FVU against the top-k fraction at the selected setting."""
    chosen = r.selection.get("remedies", {}).get("topk", {}).get("selected")
    points = []
    for pair in [*r.ablation.values(), r.sweep.get(chosen, {})]:
        if pair.get("lm") and pair.get("synthetic"):
            s = pair["lm"]["settings"]
            fraction = s.get("topk_fraction") or 0.001
            points.append((fraction, float(np.mean(synthetic_per_seed(pair["synthetic"]))), pair["lm"]["core"]["fvu"]))
    fig, (ax_a, ax_f) = plt.subplots(1, 2, figsize=(10, 4))
    if points:
        points.sort()
        x, a, f = zip(*points, strict=True)
        ax_a.plot(x, a, "o-")
        ax_f.plot(x, f, "o-")
    base = r.sweep.get("baseline", {})
    if base.get("synthetic"):
        ax_a.axhline(float(np.mean(synthetic_per_seed(base["synthetic"]))), color="gray", ls="--", label="baseline")
        ax_a.legend(fontsize=8)
    if base.get("lm"):
        ax_f.axhline(base["lm"]["core"]["fvu"], color="gray", ls="--", label="baseline")
        ax_f.legend(fontsize=8)
    ax_a.set(xscale="log", xlabel="top-k fraction of pairs", ylabel="synthetic absorption", title=f"at {chosen}")
    ax_f.set(xscale="log", xlabel="top-k fraction of pairs", ylabel="FVU (cheap LM SAE)", title=f"at {chosen}")
    save_png(fig, path)


def absorption_vs_tokens(r: StudyResults, path: Path) -> None:
    fig, (ax_a, ax_f) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, points in r.scaling.items():
        if not points:
            continue
        tokens = list(points)
        ax_a.plot(tokens, [points[t]["absorption"]["mean_absorption_fraction"] for t in tokens], "o-", label=arm)
        ax_f.plot(tokens, [points[t]["core"]["fvu"] for t in tokens], "o-", label=arm)
    ax_a.set(xscale="log", xlabel="training tokens", ylabel="first-letter absorption", title="Absorption vs tokens")
    ax_f.set(xscale="log", xlabel="training tokens", ylabel="FVU (held-out)", title="FVU vs tokens")
    ax_a.legend(fontsize=8)
    ax_f.legend(fontsize=8)
    save_png(fig, path)


PLOTS = {
    "absorption_vs_tau.png": absorption_vs_tau,
    "absorption_vs_fvu.png": absorption_vs_fvu,
    "probing_vs_k.png": probing_vs_k,
    "jaccard_vs_lag.png": jaccard_vs_lag,
    "topk_ablation.png": topk_ablation,
    "absorption_vs_tokens.png": absorption_vs_tokens,
}
