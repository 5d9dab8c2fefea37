"""Stage `headline`: the default pipeline's headline figures per SAE in metrics/headline.json (library:
sae_ortho/analysis/headline.py), the one metrics file of the evaluation stages."""

from __future__ import annotations

import json
import sys

from sae_ortho.analysis.headline import METRICS, headline
from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text


def main() -> None:
    p = params_mod.load_or_exit()
    try:
        figures = headline(list(p.saes))
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    atomic_write_text(METRICS / "headline.json", json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
