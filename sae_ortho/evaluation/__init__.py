"""Pipeline step 4: held-out core metrics, sparse probing, first-letter and ground-truth (synthetic) absorption."""
