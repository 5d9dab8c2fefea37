"""bench/hardware_noise.py's summary: outputs compared byte for byte, headline noise per metric."""

from bench.hardware_noise import summarise


def _run(outs: dict[str, str], probing: float, seconds: float) -> dict:
    return {
        "env": {},
        "wall_s": 1.0,
        "outs": outs,
        "headline": {"baseline": {"probing_top_5": probing, "train_seconds": seconds, "meaningful": True}},
    }


def test_summary_names_differing_outputs_and_the_largest_metric_difference():
    # The default comes from a full `dvc repro`: it has an output past the variants' target, left out.
    default = _run({"data/corpus": "a", "models/baseline": "b", "metrics/study": "z"}, 0.7605, 100.0)
    runs = {
        "default": default,
        "avx2_haswell": _run({"data/corpus": "a", "models/baseline": "b"}, 0.7605, 300.0),
        "one_thread": _run({"data/corpus": "a", "models/baseline": "c"}, 0.7443, 900.0),
    }
    summary = summarise(runs)
    assert summary["bit_identical_everywhere"] == ["data/corpus"]
    assert summary["differ_somewhere"] == ["models/baseline"]
    assert summary["outputs_identical"]["models/baseline"] == {"avx2_haswell": True, "one_thread": False}
    # Timings and flags are not noise figures; the metric's noise is the largest difference from the default.
    assert set(summary["noise_by_metric"]) == {"probing_top_5"}
    assert abs(summary["noise_by_metric"]["probing_top_5"] - 0.0162) < 1e-12
