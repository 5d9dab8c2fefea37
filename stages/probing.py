"""Stage `probing@<sae>`: SAEBench sparse probing of one SAE (library: sae_ortho/evaluation/probing.py).

`python -m stages.probing --sae NAME --dir SAE_DIR` -> metrics/sparse_probing/NAME.json, from the
activations cached by `llm_cache` in data/probe_acts (no model needed). Exits non-zero when the SAE's
top-5 probes sit at chance on a task where the LLM residual's do not (a broken SAE or pipeline).
"""

from __future__ import annotations

import sys
from pathlib import Path

from sae_ortho.base.paths import PROBE_ACTS
from sae_ortho.evaluation.probing import check_probing_sanity, load_cache_manifest, sae_probe_results
from sae_ortho.evaluation.stage_io import SAEStage

METRICS = Path("metrics/sparse_probing")


def table(result: dict) -> str:
    """One line per task and a mean line: LLM / SAE accuracy with all dims and with each top-k."""
    keys = ["test_accuracy"] + [f"top_{k}_test_accuracy" for k in result["eval_config"]["k_values"]]
    heads = ["all"] + [f"top{k}" for k in result["eval_config"]["k_values"]]
    rows = [("task (llm/sae)", *heads)]
    mean = {"dataset_name": "mean", **result["eval_result_metrics"]["llm"], **result["eval_result_metrics"]["sae"]}
    for d in [*result["eval_result_details"], mean]:
        rows.append((d["dataset_name"], *(f"{d[f'llm_{k}']:.2f}/{d[f'sae_{k}']:.2f}" for k in keys)))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  " + "  ".join(f"{c:>9}" for c in r[1:]) for r in rows)


def main() -> None:
    stage = SAEStage.from_argv(__doc__, METRICS)
    p = stage.params
    try:
        manifest = load_cache_manifest(PROBE_ACTS, p)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    sae = stage.load_sae(PROBE_ACTS, manifest["hook_name"], manifest["d_in"])
    result = stage.write(sae_probe_results(sae, PROBE_ACTS, p))
    print(table(result))
    stage.fail_on("probing", check_probing_sanity(result))


if __name__ == "__main__":
    main()
