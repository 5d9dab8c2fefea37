"""The study's logic without training: arm resolution, the selection rule, Holm, which differences count."""

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from sae_ortho.base.params import ParamError, Params, TrainParams
from sae_ortho.base.study_params import Arm, Measures, Selection, StudyParams
from sae_ortho.study.arms import arm_spec, run_config_for
from sae_ortho.study.report import comparisons
from sae_ortho.study.selection import select_arm, within

SWEEP = {
    "baseline": Arm(penalty="none"),
    "fixed_1": Arm(tau=1.0),
    "fixed_10": Arm(tau=10.0),
    "adaptive": Arm(schedule="adaptive", tau=0.1, target=0.05),
    "ortsae_1": Arm(penalty="ortsae", tau=0.1, chunk=8),
    "ortsae_2": Arm(penalty="ortsae", tau=1.0, chunk=8),
    "matryoshka_a": Arm(penalty="none", matryoshka=(0.5, 1.0)),
}
HEADLINE = {
    "baseline": Arm(penalty="none"),
    "best": Arm(from_selection="topk"),
    "control": Arm(from_selection="topk", penalty="random", tau_from="best"),
    "ortsae": Arm(from_selection="ortsae"),
}


def study(**kw) -> StudyParams:
    kw.setdefault("measures", Measures(holm_family=("best", "control", "ortsae")))
    s = StudyParams(sweep=SWEEP, ablation={}, headline=HEADLINE, headline_arms=("baseline", "best", "control"),
                    synthetic_extra=("control",), scaling_arms=("baseline",), **kw)  # fmt: skip
    s.validate()
    return s


def lm(fvu: float, ce: float) -> dict:
    return {"core": {"fvu": fvu, "ce_recovered_vs_zero": ce}}


def _synthetic(primary: dict, guard: dict | None = None, raw: dict | None = None) -> dict:
    guard = guard or {}
    raw = raw or primary
    return {
        k: {"primary_mean": v, "guard_mean": guard.get(k, 0.9), "absorption_mean": raw[k]} for k, v in primary.items()
    }


OTHERS = {"ortsae_1": 0.45, "ortsae_2": 0.40, "matryoshka_a": 0.2}


def test_selection_takes_lowest_absorption_within_the_cost_bounds_per_remedy():
    synthetic = _synthetic({"baseline": 0.5, "fixed_1": 0.45, "fixed_10": 0.30, "adaptive": 0.40, **OTHERS})
    costs = {
        "baseline": lm(0.10, 0.98),
        "fixed_1": lm(0.101, 0.979),
        "fixed_10": lm(0.125, 0.97),
        "adaptive": lm(0.105, 0.975),
        "ortsae_1": lm(0.10, 0.98),
        "ortsae_2": lm(0.10, 0.98),
        "matryoshka_a": lm(0.10, 0.98),
    }
    remedies = select_arm(study(), synthetic, costs)["remedies"]
    topk = remedies["topk"]
    # fixed_10 absorbs least but costs 25% FVU (bound 10%): the adaptive arm wins.
    assert topk["selected"] == "adaptive" and topk["any_admissible"]
    assert not topk["candidates"]["fixed_10"]["admissible"] and set(topk["candidates"]) == {
        "fixed_1",
        "fixed_10",
        "adaptive",
    }
    assert remedies["ortsae"]["selected"] == "ortsae_2" and set(remedies["ortsae"]["candidates"]) == {
        "ortsae_1",
        "ortsae_2",
    }
    assert remedies["matryoshka"]["selected"] == "matryoshka_a"
    strict = study(selection=Selection(max_fvu_increase=0.001, max_ce_drop=0.0))
    none_ok = select_arm(strict, synthetic, costs)["remedies"]["topk"]
    assert not none_ok["any_admissible"] and none_ok["selected"] == "fixed_1"  # the cheapest candidate


def test_arms_from_the_selection_override_only_what_they_set(tmp_path):
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"topk": {"selected": "adaptive", "settings": asdict(SWEEP["adaptive"])}}))
    s = study()
    control = arm_spec(s, "headline", "control", path)
    assert (control.penalty, control.schedule, control.tau, control.target) == ("random", "adaptive", 0.1, 0.05)
    cfg = run_config_for(control, Params(), TrainParams(d_sae=64), seed=3)
    assert cfg.penalty == "random" and cfg.tau_schedule == "adaptive" and cfg.ortho.target == 0.05 and cfg.seed == 3
    base = run_config_for(arm_spec(s, "headline", "baseline", path), Params(), TrainParams(d_sae=64), 0)
    assert not base.uses_ortho and base.tau == 0
    with pytest.raises(FileNotFoundError):
        arm_spec(s, "headline", "best", tmp_path / "missing.json")
    with pytest.raises(ParamError):
        arm_spec(s, "headline", "nope", path)
    with pytest.raises(ParamError, match="chose no ortsae arm"):
        arm_spec(s, "headline", "ortsae", path)


def test_matryoshka_fractions_become_prefix_sizes():
    cfg = run_config_for(Arm(penalty="none", matryoshka=(0.25, 0.5, 1.0)), Params(), TrainParams(d_sae=64), 0)
    assert cfg.matryoshka_prefixes == (16, 32, 64) and not cfg.uses_ortho
    # The paper's Matryoshka by default: BatchTopK codes, summed prefix losses; the TopK variant on request.
    assert cfg.train.architecture == "batchtopk" and cfg.matryoshka_sum
    topk = run_config_for(
        Arm(penalty="none", matryoshka=(0.5, 1.0), matryoshka_variant="topk"), Params(), TrainParams(d_sae=64), 0
    )
    assert topk.train.architecture == "topk" and not topk.matryoshka_sum and topk.matryoshka_prefixes == (32, 64)
    with pytest.raises(ParamError, match="matryoshka"):
        Arm(penalty="none", matryoshka=(0.5, 0.25)).validate("headline.m")
    with pytest.raises(ParamError, match="tau"):
        Arm(penalty="ortsae").validate("headline.o")


def cell(values):
    import numpy as np

    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "n": len(values), "values": values}


def test_a_planted_paired_difference_counts_and_noise_does_not():
    """LM figures are paired by SAE seed: a shift that every seed shows counts, a noisy one does not."""
    table = {
        "baseline": {"probing_top_1": cell([0.50, 0.55, 0.45, 0.52])},
        "planted": {"probing_top_1": cell([0.60, 0.651, 0.549, 0.62])},  # +0.1 on every seed
        "noisy": {"probing_top_1": cell([0.65, 0.45, 0.60, 0.42])},  # higher mean, not paired-consistent
    }
    rows = {r["arm"]: r for r in comparisons(table, alpha=0.05)}
    assert rows["planted"]["counts"] and rows["planted"]["difference"] == pytest.approx(0.1, abs=1e-3)
    assert rows["planted"]["n"] == 4 and rows["planted"]["ci95"][0] > 0
    assert not rows["noisy"]["counts"]


def test_a_planted_difference_within_the_hardware_noise_does_not_count(tmp_path):
    """The same planted shift stops counting once the kernel paths alone move the figure by more; the noise
    is read from make hardware-noise's file (absent: counted as 0)."""
    import json

    from sae_ortho.study.report import hardware_noise

    table = {
        "baseline": {"probing_top_1": cell([0.50, 0.55, 0.45, 0.52])},
        "planted": {"probing_top_1": cell([0.60, 0.651, 0.549, 0.62])},
    }
    path = tmp_path / "hardware_noise.json"
    assert hardware_noise(path) == {}
    path.write_text(json.dumps({"noise_by_metric": {"probing_top_1": 0.15, "fvu": 0.0}}))
    noise = hardware_noise(path)
    assert comparisons(table, 0.05, {"probing_top_1": 0.05})[0]["counts"]
    row = comparisons(table, 0.05, noise)[0]
    assert row["holm_rejects"] and row["hardware_noise"] == 0.15 and not row["counts"]


def test_first_letter_difference_needs_meaningful_figures_and_to_beat_reseed_noise():
    def row(values, meaningful, reseed):
        return {
            "first_letter_absorption": cell(values),
            "first_letter_meaningful": {"all": meaningful},
            "first_letter_reseed": {"mean": reseed},
        }

    table = {"baseline": row([0.10, 0.101, 0.099], True, 0.002), "arm": row([0.05, 0.051, 0.049], True, 0.002)}
    assert comparisons(table, 0.05)[0]["counts"]
    table["arm"] = row([0.05, 0.051, 0.049], True, 0.08)  # the letter cache's reseeds move it more than the arm
    assert not comparisons(table, 0.05)[0]["counts"]
    table["arm"] = row([0.05, 0.051, 0.049], False, 0.002)
    assert not comparisons(table, 0.05)[0]["meaningful"]


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"seeds": [0, 11], "selection_seeds": [0, 1]}, "must not overlap selection_seeds"),
        ({"instances": [100, 11]}, "must differ from the training seeds"),
        ({"seeds": [10, 11]}, "needs at least measures.min_seeds"),
        ({"regimes": {"tiny": {"d_sae": 8, "k": 9}}}, "synthetic_grid.regimes.tiny.k"),
    ],
)
def test_synthetic_grid_rules(tmp_path, grid, message):
    """The headline's seeds are disjoint from those the remedies were chosen on; errors are one line before
    any training; run in a scratch directory, never the live tree."""
    import shutil
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "study").mkdir()
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    raw = yaml.safe_load((root / "study/params.yaml").read_text())
    raw["synthetic_grid"].update(grid)
    (tmp_path / "study/params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "stages.study_synthetic", "--group", "headline", "--arm", "best"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()


def test_efficiency_is_undefined_when_the_cost_is_noise():
    """Within the synthetic benchmark: a cost whose CI holds 0 would make the ratio arbitrarily large."""
    from sae_ortho.study.synthetic_stats import efficiency

    def row(d_primary: float, d_ev: float, ev_ci: list) -> dict:
        return {"p": {"mean": d_primary}, "explained_variance": {"mean": d_ev, "ci95": ev_ci}}

    eff = efficiency(
        {
            "noise": row(-0.1, -0.001, [-0.003, 0.001]),
            "real": row(-0.2, -0.02, [-0.03, -0.01]),
            "no_cost": row(0.02, 0.002, [0.001, 0.003]),  # more absorption and lower FVU: not a gain of 10
        },
        "p",
    )
    assert eff["noise"] is None and eff["no_cost"] is None
    assert eff["real"] == pytest.approx(10.0)  # 0.2 of the primary removed per 0.02 of FVU added


def test_measures_are_validated_against_the_arms_and_the_evaluation():
    from sae_ortho.base.schema import ParamError as SchemaError
    from sae_ortho.base.study_params import PAIR_MEASURES
    from sae_ortho.evaluation.synthetic_arms import PER_PAIR

    assert set(PAIR_MEASURES) <= set(PER_PAIR)  # every nameable measure is one the evaluation writes
    with pytest.raises(SchemaError, match="holm_family"):
        study(measures=Measures(holm_family=("best", "nosuch")))
    with pytest.raises(SchemaError, match="measures.primary"):
        study(measures=Measures(primary="mcc", holm_family=("best",)))


def test_selection_ranks_by_the_declared_primary_and_refuses_arms_that_forget_parents():
    """An arm whose raw absorption is lowest because it forgets parents (guard drop 0.2 > 0.05) is not
    admissible; among the rest the lowest primary measure wins, not the lowest raw rate."""
    costs = {name: lm(0.10, 0.98) for name in SWEEP}
    synthetic = _synthetic(
        primary={"baseline": 0.5, "fixed_1": 0.30, "fixed_10": 0.20, "adaptive": 0.35, **OTHERS},
        guard={"baseline": 0.9, "fixed_1": 0.88, "fixed_10": 0.70, "adaptive": 0.9},
        raw={"baseline": 0.6, "fixed_1": 0.5, "fixed_10": 0.1, "adaptive": 0.4, **OTHERS},
    )
    chosen = select_arm(study(), synthetic, costs)["remedies"]["topk"]
    assert not chosen["candidates"]["fixed_10"]["admissible"]  # forgot parents
    assert chosen["selected"] == "fixed_1"  # lowest primary among the admissible, though adaptive's raw rate is lower


def test_an_arm_exactly_at_a_declared_bound_meets_it():
    """The guard is a share of parents counted in steps of 1/320: a drop of exactly 16/320 = 0.05 computes as
    0.050000000000000044 and was refused under the declared `<= 0.05` (the round close's topk_adaptive_3e-2).
    One step further (17/320) stays refused."""
    costs = {name: lm(0.10, 0.98) for name in SWEEP}
    synthetic = _synthetic(
        primary={"baseline": 0.75, "fixed_1": 0.55, "fixed_10": 0.50, "adaptive": 0.549, **OTHERS},
        guard={"baseline": 0.76875, "fixed_1": 0.72813, "fixed_10": 0.71562, "adaptive": 0.71875},
    )
    assert 0.76875 - 0.71875 > 0.05  # the float error the rule must not act on
    chosen = select_arm(study(), synthetic, costs)["remedies"]["topk"]
    assert chosen["candidates"]["adaptive"]["admissible"] and chosen["selected"] == "adaptive"
    assert not chosen["candidates"]["fixed_10"]["admissible"]  # 0.05313: one count past the bound
    # The declared verdict's effect size: a primary falling by exactly 10% (0.45 vs 0.5) is a 10% fall.
    assert 0.45 / 0.5 - 1 > -0.10 and within(0.45 / 0.5 - 1, -0.10) and not within(0.4501 / 0.5 - 1, -0.10)


def test_a_cut_scaling_axis_reads_as_not_run_not_as_an_empty_table() -> None:
    from types import SimpleNamespace

    from sae_ortho.study import report_md

    cut = "\n".join(report_md._scaling(SimpleNamespace(scaling={})))
    assert "Not run" in cut and "| arm |" not in cut
    point = {"absorption": {"mean_absorption_fraction": 0.1, "meaningful": True}, "core": {"fvu": 0.2}}
    run = "\n".join(report_md._scaling(SimpleNamespace(scaling={"best": {1000: point}})))
    assert "| best | 1,000 |" in run and "Not run" not in run
