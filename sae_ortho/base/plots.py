"""PNG plots of the stages' metrics (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sae_ortho.base.io import atomic_file


def save_png(fig, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def jaccard_lag(result: dict, path: Path) -> None:
    """Kept-pair Jaccard against lag: the ortho run's training log, and both SAEs' snapshots."""
    fig, (ax_log, ax_snap) = plt.subplots(1, 2, figsize=(11, 4))
    within = result.get("within_run")
    if within:
        lag = within["curves"]["lag"]
        log_every = (within["steps_logged"][1] - within["steps_logged"][0]) / max(1, within["logs"] - 1)
        steps = [x * log_every for x in lag["lag"]]
        ax_log.plot(steps, lag["jaccard"], "o-", label="ortho: kept pairs")
        ax_log.plot(steps, lag["null"], "--", color="gray", label="null (re-paired, same per-latent counts)")
        ax_log.set_xscale("log")
    ax_log.set(title="Training pair log", xlabel="lag (steps)", ylabel="mean Jaccard", ylim=(0, None))
    ax_log.legend(fontsize=8)
    for name, snap in result.get("snapshots", {}).items():
        curve = snap["curve"]
        (line,) = ax_snap.plot(curve["lag_steps"], curve["jaccard"], "o-", label=name)
        ax_snap.plot(curve["lag_steps"], curve["null"], "--", color=line.get_color(), alpha=0.6, label=f"{name} null")
    ax_snap.set(title="Selector on fixed held-out batches, per snapshot", xlabel="lag (steps)", ylabel="mean Jaccard")
    ax_snap.set_ylim(0, None)
    ax_snap.legend(fontsize=8)
    save_png(fig, path)


def persistence(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    within = result.get("within_run")
    if within:
        for key, label, style in (
            ("persistence_histogram", "ortho: kept pairs", "o-"),
            ("persistence_histogram_null", "null", "--"),
        ):
            hist = within[key]
            ax.plot([int(k) for k in hist], list(hist.values()), style, label=label)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title(f"Persistence over {within['logs']} logged steps (budget {within['pair_budget']} pairs)")
    else:
        ax.text(0.5, 0.5, "no orthogonality pair log", ha="center", va="center")
    ax.set(xlabel="logs in which a pair was kept", ylabel="number of pairs")
    save_png(fig, path)


def seed_match(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    arms = result.get("cross_seed", {}).get("arms", {})
    for arm, res in arms.items():
        for entry in res["pairs"]:
            t = [float(x) for x in entry["shared"]]
            (line,) = ax.plot(t, list(entry["shared"].values()), "o-", label=f"{arm} seed {entry['seed']}")
            for null, style in (("null_rotation", ":"), ("null_covariance", "--")):
                ax.plot(t, list(entry[null]["shared"].values()), style, color=line.get_color(), alpha=0.6)
    if arms:
        ax.plot([], [], ":", color="gray", label="null: rotated decoder")
        ax.plot([], [], "--", color="gray", label="null: data covariance")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, result.get("cross_seed", {}).get("skipped", "skipped"), ha="center", va="center", wrap=True)
    ax.set(xlabel="decoder cosine threshold", ylabel="fraction of features matched above it", ylim=(0, 1))
    ax.set_title("Features shared across SAE seeds (Hungarian matching)")
    save_png(fig, path)
