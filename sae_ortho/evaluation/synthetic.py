"""Ground-truth absorption on SAELens's synthetic model (stages `synthetic_baseline`, `synthetic_ortho`).

SAELens's `SyntheticModel` draws sparse activations of known features (unit directions in
`hidden_dim`), with a hierarchy: a child feature fires only when its parent fires. An SAE trained
on `x = sum_f a_f d_f` *absorbs* when the latent that stands for a parent stops firing whenever a
child fires (the child's latent then carries the parent direction instead). SAELens evaluates
MCC and per-latent precision/recall (`eval_sae_on_synthetic_data`) but has no absorption figure;
this module adds it:

- each true feature is matched to one latent (Hungarian on decoder cosine, signed: a latent
  pointing against a feature does not represent it);
- per parent/child pair: absorption = P(parent's latent silent | child active), against the
  control P(parent's latent silent | parent active, none of its children); partial absorption =
  P(0 < parent latent < half its mean when the parent fires alone | child active); the child
  latent's decoder cosine with the true parent direction (control: with the other parents');
- bootstrap CIs resample pairs (the same resampled pairs in every seed, so the interval covers
  the seed-mean).

SAEs are trained by our own trainer (`sae_ortho.training.train.train`, orthogonality loss included)
streaming batches from the synthetic model through `SyntheticSource`, a `BatchSource`; the arms
are run and aggregated in sae_ortho/evaluation/synthetic_arms.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from sae_ortho.base.params import SyntheticHierarchy, SyntheticParams
from sae_ortho.evaluation.synthetic_draws import ReplayedActivations, eval_draw, from_csr, load_or_draw
from sae_ortho.training.sae import SAE

EVAL_BATCH = 8192  # the evaluation draw's chunk: SAELens's evaluation and the absorption figures share it

if TYPE_CHECKING:  # sae_lens takes seconds to import: stages fail on bad params before that
    from sae_lens.synthetic import SyntheticModel


class IsolatedRng:
    """A torch CPU RNG stream of its own. SAELens samples with the global RNG; running each draw
    under this stream's state keeps the data independent of whatever else uses the global RNG
    (so both arms see exactly the same samples for a seed)."""

    def __init__(self, seed: int):
        self.state = torch.Generator().manual_seed(seed).get_state()

    @contextmanager
    def active(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.state)
            yield
            self.state = torch.get_rng_state()


def build_model(s: SyntheticParams, h: SyntheticHierarchy) -> SyntheticModel:
    """The synthetic model of background.md section 6, with hierarchy `h` (no bias, orthogonalised
    directions, probabilities compensated so a child's marginal rate is its Zipfian one)."""
    from sae_lens.synthetic import (
        HierarchyConfig,
        OrthogonalizationConfig,
        SyntheticModel,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    cfg = SyntheticModelConfig(
        num_features=h.num_features,
        hidden_dim=s.hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=s.firing_exponent, max_prob=s.firing_max_prob, min_prob=s.firing_min_prob
        ),
        hierarchy=HierarchyConfig(
            total_root_nodes=h.total_root_nodes,
            branching_factor=h.branching_factor,
            max_depth=h.max_depth,
            compensate_probabilities=True,
        ),
        orthogonalization=OrthogonalizationConfig(num_steps=s.orthogonalization_steps)
        if s.orthogonalization_steps
        else None,
        bias=False,
        seed=s.model_seed,
    )
    return SyntheticModel(cfg)


def parent_child_pairs(model: SyntheticModel) -> np.ndarray:
    """[n_pairs, 2] (parent, child) feature indices: every edge of the hierarchy forest."""
    pairs: list[tuple[int, int]] = []
    stack = list(model.hierarchy.roots) if model.hierarchy is not None else []
    while stack:
        node = stack.pop()
        for child in node.children:
            pairs.append((node.feature_index, child.feature_index))
            stack.append(child)
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def model_fingerprint(model: SyntheticModel) -> str:
    """sha256 of the synthetic model's config: what its samples are a function of (with the seed)."""
    return hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass
class SyntheticSource:
    """SAELens's synthetic model as a trainer BatchSource (sae_ortho.training.batches): endless batches drawn
    under an RNG stream seeded by the training seed; no shards. The first `cached_batches` batches of
    each seed's stream are replayed from the per-machine cache (synthetic_draws.py), bit-identical to
    drawing them; later batches are drawn live from where the stored ones stop."""

    model: SyntheticModel
    norm_mean: float
    fingerprint: str
    cached_batches: int = 0

    @classmethod
    def create(cls, model: SyntheticModel, norm_seed: int = 999_983, cached_batches: int = 0) -> SyntheticSource:
        with IsolatedRng(norm_seed).active():
            norm_mean = float(model.sample(65_536).norm(dim=1).mean())
        return cls(model, norm_mean, model_fingerprint(model), cached_batches)

    @property
    def d_in(self) -> int:
        return self.model.cfg.hidden_dim

    def stream(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        rng = IsolatedRng(seed)
        if self.cached_batches:
            csr = load_or_draw(self.model, self.fingerprint, rng, batch_size, self.cached_batches, seed)
            for b in range(self.cached_batches):
                acts = from_csr(csr, b * batch_size, (b + 1) * batch_size, self.model.cfg.num_features)
                with torch.no_grad():  # not around the yield: the caller would train under no_grad
                    x = self.model.feature_dict(acts)
                yield x
        while True:
            with rng.active():
                x = self.model.sample(batch_size)
            yield x

    def sample(self, n: int, seed: int) -> torch.Tensor:
        with IsolatedRng(seed).active():
            return self.model.sample(n)


def match_features(w_dec: torch.Tensor, features: torch.Tensor) -> np.ndarray:
    """Latent index per true feature: Hungarian assignment maximising total decoder cosine."""
    w = torch.nn.functional.normalize(w_dec.detach().float(), dim=1)
    f = torch.nn.functional.normalize(features.detach().float(), dim=1)
    cos = (f @ w.T).double().numpy()  # [n_features, d_sae]
    rows, cols = linear_sum_assignment(-cos)
    matched = np.empty(len(f), dtype=np.int64)
    matched[rows] = cols
    return matched


def parent_latent_sets(w_dec: torch.Tensor, features: torch.Tensor, matched: np.ndarray, min_cos: float) -> list:
    """Per true feature, the latents that stand for it under the many-to-one reading: its matched latent,
    plus every latent matched to no feature whose decoder cosine with it is at least `min_cos` and whose
    closest true feature it is (the extra halves of a split feature in an over-complete dictionary). A
    child's latent that absorbed the parent direction is matched to the child, so it never joins the
    parent's set: a split parent reads as learned without an absorber reading as its parent."""
    w = torch.nn.functional.normalize(w_dec.detach().float(), dim=1)
    f = torch.nn.functional.normalize(features.detach().float(), dim=1)
    cos = (f @ w.T).numpy()  # [n_features, d_sae]
    closest = cos.argmax(0)
    free = np.ones(w.shape[0], dtype=bool)
    free[matched] = False
    return [
        sorted({int(matched[n]), *np.flatnonzero(free & (cos[n] >= min_cos) & (closest == n)).tolist()})
        for n in range(len(f))
    ]


def firing_rates(fires: np.ndarray, alone: np.ndarray, child_on: np.ndarray, pcol: np.ndarray) -> dict:
    """From per-sample "the parent's latent(s) fire" [samples, parents], "the parent fires with none of its
    children" [samples, parents] and "the child fires" [samples, pairs]: per pair, the parent's recall
    P(fires | parent alone), raw absorption P(silent | child active) and normalised absorption
    1 - P(fires | child active) / P(fires | alone). A parent latent that merely fires less, at random,
    lowers its recall and raises the raw rate, but leaves the normalised one at 0."""
    n_alone, n_child = alone.sum(0), child_on.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(n_alone > 0, (fires & alone).sum(0) / n_alone, np.nan)
        fire_child = np.where(n_child > 0, (fires[:, pcol] & child_on).sum(0) / n_child, np.nan)
        normalised = np.where(recall[pcol] > 0, 1 - fire_child / recall[pcol], np.nan)
    return {"recall": recall[pcol], "absorption": 1 - fire_child, "normalised": normalised}


@torch.no_grad()
def absorption_per_pair(
    sae: SAE,
    model: SyntheticModel,
    pairs: np.ndarray,
    matched: np.ndarray,
    n_samples: int,
    seed: int,
    many_to_one_cos: float = 0.5,
    learned_recall: float = 0.5,
) -> dict[str, np.ndarray]:
    """Per (parent, child) pair, on `n_samples` fresh samples drawn under RNG `seed`."""
    parents = np.unique(pairs[:, 0])
    parent_col = {int(p): n for n, p in enumerate(parents)}
    pcol = np.array([parent_col[int(p)] for p in pairs[:, 0]])
    # Per parent: which pair columns are its children (for "parent active alone").
    children_of = [np.flatnonzero(pcol == n) for n in range(len(parents))]
    sets = parent_latent_sets(sae.W_dec, model.feature_dict.feature_vectors, matched, many_to_one_cos)
    parent_sets = [sets[int(p)] for p in parents]
    x_all, a_all = eval_draw(model, model_fingerprint(model), IsolatedRng, seed, n_samples, EVAL_BATCH)
    z_par, any_par, par_on, child_on = [], [], [], []
    for start in range(0, n_samples, EVAL_BATCH):
        x, a = x_all[start : start + EVAL_BATCH], a_all[start : start + EVAL_BATCH]
        z = sae.encode(x)
        z_par.append(z[:, matched[parents]])
        any_par.append(torch.stack([(z[:, s] > 0).any(1) for s in parent_sets], 1))
        par_on.append(a[:, parents] > 0)
        child_on.append(a[:, pairs[:, 1]] > 0)
    zp, pon, con = torch.cat(z_par).numpy(), torch.cat(par_on).numpy(), torch.cat(child_on).numpy()
    fires_any = torch.cat(any_par).numpy()
    alone = np.stack([pon[:, n] & ~con[:, children_of[n]].any(1) for n in range(len(parents))], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        # Per parent: its latent's mean activation when it fires without any child (the reference).
        ref = np.array([zp[alone[:, n], n].mean() if alone[:, n].any() else np.nan for n in range(len(parents))])
        silent_alone = np.array(
            [(zp[alone[:, n], n] == 0).mean() if alone[:, n].any() else np.nan for n in range(len(parents))]
        )
        weak_alone = np.array(
            [
                ((zp[alone[:, n], n] > 0) & (zp[alone[:, n], n] < 0.5 * ref[n])).mean() if alone[:, n].any() else np.nan
                for n in range(len(parents))
            ]
        )
        out = {k: np.full(len(pairs), np.nan) for k in ("absorption", "partial", "activation_ratio")}
        n_child = con.sum(0)
        for j in range(len(pairs)):
            if n_child[j] == 0:
                continue
            zj, r = zp[con[:, j], pcol[j]], ref[pcol[j]]
            out["absorption"][j] = (zj == 0).mean()
            if r > 0:  # a parent latent that never fires alone has no reference activation
                out["partial"][j] = ((zj > 0) & (zj < 0.5 * r)).mean()
                out["activation_ratio"][j] = zj.mean() / r
    out["absorption_control"] = silent_alone[pcol]
    out["partial_control"] = np.where(ref > 0, weak_alone, np.nan)[pcol]
    one = firing_rates(zp > 0, alone, con, pcol)
    out["parent_recall"] = one["recall"]
    out["absorption_normalised"] = one["normalised"]
    # A parent is "learned" when its matched latent fires on most of its lone firings. With TopK and
    # rare lone firings, some parents never get a latent of their own (their matched latent is
    # unrelated, so absorption and control are both ~1); the *_learned figures leave those out.
    learned = one["recall"] >= learned_recall
    out["parent_learned"] = learned.astype(float)
    out["absorption_learned"] = np.where(learned, out["absorption"], np.nan)
    out["absorption_control_learned"] = np.where(learned, out["absorption_control"], np.nan)
    out["absorption_normalised_learned"] = np.where(learned, one["normalised"], np.nan)
    # Many-to-one: the parent fires when any latent standing for its direction fires (a split parent).
    many = firing_rates(fires_any, alone, con, pcol)
    out["parent_recall_m2o"] = many["recall"]
    out["absorption_m2o"] = many["absorption"]
    out["absorption_normalised_m2o"] = many["normalised"]
    learned_m2o = many["recall"] >= learned_recall
    out["parent_learned_m2o"] = learned_m2o.astype(float)
    out["absorption_normalised_m2o_learned"] = np.where(learned_m2o, many["normalised"], np.nan)
    out["parent_latents_m2o"] = np.array([len(parent_sets[c]) for c in pcol], dtype=float)
    out["n_child_active"] = n_child.astype(np.int64)
    return out


def decoder_cosines(
    w_dec: torch.Tensor, model: SyntheticModel, pairs: np.ndarray, matched: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: cosine of the child's latent with the true parent direction, and its control (the
    mean cosine of that latent with the directions of the other parents)."""
    w = torch.nn.functional.normalize(w_dec.detach().float(), dim=1)
    f = torch.nn.functional.normalize(model.feature_dict.feature_vectors.detach().float(), dim=1)
    parents = np.unique(pairs[:, 0])
    cos = (w[matched[pairs[:, 1]]] @ f[parents].T).numpy()  # [n_pairs, n_parents]
    own = parents[None, :] == pairs[:, :1]  # exactly one own parent per row
    others = np.where(own, np.nan, cos)
    with np.errstate(invalid="ignore"):  # a single parent leaves no other parents (control NaN)
        control = np.nanmean(others, axis=1) if len(parents) > 1 else np.full(len(pairs), np.nan)
    return cos[own].astype(float), control.astype(float)


def evaluate(sae: SAE | Any, model: SyntheticModel, pairs: np.ndarray, s: SyntheticParams) -> dict:
    """Everything measured on one trained SAE: per-pair absorption figures and SAELens's own
    synthetic evaluation (L0, dead latents, explained variance, MCC, precision/recall), both on
    the same `eval_samples` samples (same RNG stream). `sae` is ours or any SAELens SAE (encode,
    W_dec), e.g. one trained by SAELens's own toy trainer."""
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    matched = match_features(sae.W_dec, model.feature_dict.feature_vectors)
    per_pair = absorption_per_pair(
        sae, model, pairs, matched, s.eval_samples, s.eval_seed, s.many_to_one_cos, s.learned_recall
    )
    per_pair["child_parent_cos"], per_pair["child_parent_cos_control"] = decoder_cosines(
        sae.W_dec, model, pairs, matched
    )
    lens_sae = sae.to_saelens() if isinstance(sae, SAE) else sae
    _, acts = eval_draw(model, model_fingerprint(model), IsolatedRng, s.eval_seed, s.eval_samples, EVAL_BATCH)
    lens = eval_sae_on_synthetic_data(
        lens_sae, model.feature_dict, ReplayedActivations(acts), s.eval_samples, batch_size=EVAL_BATCH
    )
    summary = {
        "l0": lens.sae_l0,
        "true_l0": lens.true_l0,
        "dead_latents": lens.dead_latents,
        "explained_variance": lens.explained_variance,
        "mcc": lens.mcc,
        "precision": lens.classification.precision,
        "recall": lens.classification.recall,
        "f1": lens.classification.f1_score,
    }
    return {"matched": matched, "per_pair": per_pair, "summary": summary}


PAIR_KINDS = ("parent_child", "siblings", "other_tree", "other")


def kept_pair_kinds(i: np.ndarray, j: np.ndarray, matched: np.ndarray, pairs: np.ndarray) -> dict[str, float]:
    """What the orthogonality term's kept latent pairs (i, j) stand for, through the matching: a
    parent and its child, two children of one parent, other tree features, or anything else
    (independent features, unmatched latents). Fractions of the pairs given."""
    feature_of = {int(latent): f for f, latent in enumerate(matched)}
    parent_of = {int(c): int(p) for p, c in pairs}
    tree = set(parent_of) | set(parent_of.values())
    counts = dict.fromkeys(PAIR_KINDS, 0)
    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        fa, fb = feature_of.get(a), feature_of.get(b)
        if fa is None or fb is None:
            kind = "other"
        elif parent_of.get(fa) == fb or parent_of.get(fb) == fa:
            kind = "parent_child"
        elif fa in parent_of and parent_of[fa] == parent_of.get(fb):
            kind = "siblings"
        else:
            kind = "other_tree" if fa in tree and fb in tree else "other"
        counts[kind] += 1
    return {k: v / max(1, len(i)) for k, v in counts.items()}
