"""Feature matching across SAE seeds: Hungarian assignment on decoder cosine, with matched nulls.

A random dictionary is a trivial null (it shares no feature at cosine 0.7). The nulls here keep
what makes two unrelated dictionaries look alike on this data:
- `rotation`: the other seed's decoder under a random rotation of the residual space; its own
  geometry (every cosine between its rows) is kept, its alignment with the data is lost;
- `covariance`: rows drawn from a Gaussian with the training activations' covariance, so they lean
  along the high-variance directions that SAE features lean along too.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from sae_ortho.evaluation.core import unit_rows


def match_decoders(w_a: torch.Tensor, w_b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `w_a`, its matched row of `w_b` (one-to-one, maximising the summed cosine)
    and the matched cosine."""
    cos = (unit_rows(w_a) @ unit_rows(w_b).T).numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    order = np.argsort(rows)
    return cols[order], cos[rows[order], cols[order]]


def shared_curve(matched_cos: np.ndarray, thresholds: tuple[float, ...]) -> dict[str, float]:
    return {f"{t:g}": round(float((matched_cos > t).mean()), 5) for t in thresholds}


def match_summary(matched_cos: np.ndarray, thresholds: tuple[float, ...]) -> dict:
    return {"mean_cos": round(float(matched_cos.mean()), 5), "shared": shared_curve(matched_cos, thresholds)}


def random_rotation(d: int, rng: np.random.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return torch.from_numpy(q * np.sign(np.diag(r))).float()


def rotation_null(w: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    return w.float() @ random_rotation(w.shape[1], rng)


def covariance_null(cov: torch.Tensor, n_rows: int, rng: np.random.Generator) -> torch.Tensor:
    """`n_rows` directions drawn from N(0, cov)."""
    evals, evecs = torch.linalg.eigh(cov.double())
    z = torch.from_numpy(rng.standard_normal((n_rows, cov.shape[0])))
    return ((z * evals.clamp_min(0).sqrt()) @ evecs.T).float()


def inverse_matching(b_for_a: np.ndarray) -> np.ndarray:
    """Latent of A matched to each latent of B."""
    a_for_b = np.empty_like(b_for_a)
    a_for_b[b_for_a] = np.arange(len(b_for_a))
    return a_for_b
