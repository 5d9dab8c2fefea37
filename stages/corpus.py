"""Stage `corpus`: training text and labelled probing datasets (library: sae_ortho/corpus.py)."""

from __future__ import annotations

import sys

from sae_ortho.corpus import CorpusError, run
from sae_ortho.params import load_or_exit


def main() -> None:
    params = load_or_exit()
    try:
        run(params)
    except CorpusError as err:
        print(f"error: corpus: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
