"""sae_ortho: SAEs with an instantaneous top-k orthogonality loss, and their evaluations.

The library behind the DVC stages in `stages/`; importable on its own, e.g.
`from sae_ortho.training.ortho import select_pairs` to use the loss in another trainer.
"""
