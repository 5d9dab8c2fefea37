"""Pipeline step 6: the study's arms and selection rule, its per-arm evaluation, and the report."""
