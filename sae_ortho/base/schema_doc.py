"""`python -m sae_ortho.base.schema_doc`: every key of params.yaml and study/params.yaml with its type,
default and meaning, as the markdown tables in README's "Parameters" (tests/test_params.py checks that
README holds exactly this output)."""

from __future__ import annotations

from sae_ortho.base.params import PARAMS_FILE, Params
from sae_ortho.base.schema import markdown_table
from sae_ortho.base.study_params import STUDY_PARAMS, StudyParams


def main() -> None:
    print("#### params.yaml\n")
    print(markdown_table(Params, PARAMS_FILE))
    print("\n#### study/params.yaml\n")
    print(markdown_table(StudyParams, STUDY_PARAMS))


if __name__ == "__main__":
    main()
