"""Stage `corpus`: training text and labelled probing datasets (library: sae_ortho/data/corpus.py)."""

from __future__ import annotations

import sys

from sae_ortho.base.params import load_or_exit
from sae_ortho.data.corpus import CorpusError, run


def main() -> None:
    params = load_or_exit()
    try:
        run(params)
    except CorpusError as err:
        print(f"error: corpus: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
