"""Stage `corpus`: training text and labelled probing datasets.

Library: sae_ortho/data/corpus.py (assembly, outputs), sources.py (pinned archives), probing_tasks.py.
"""

from __future__ import annotations

import sys

from sae_ortho.base.params import load_or_exit
from sae_ortho.data.corpus import run
from sae_ortho.data.sources import CorpusError


def main() -> None:
    params = load_or_exit()
    try:
        run(params)
    except CorpusError as err:
        print(f"error: corpus: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
