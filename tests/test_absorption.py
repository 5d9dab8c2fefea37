"""First-letter absorption: the real code path on a small vocabulary sample, with planted answers.

The SAEs here are built from the letter probe itself, so the right answer is known: one latent per
letter along its probe direction has no absorption; the same SAE with half of one letter's words moved
to word-specific latents (the letter latent gated off for them) has exactly those words absorbed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from sae_ortho.base.params import AbsorptionParams, LettersParams, Params
from sae_ortho.evaluation.absorption import CachedModel, absorption_result, load_manifest
from sae_ortho.evaluation.letters import LETTERS, PROMPT_ACTS, PROMPTS, build_letter_cache, check_hook, sample_words

AP = AbsorptionParams(bootstrap=200)


@pytest.fixture(scope="module")
def cache(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("letters") / "letters"
    p = Params(letters=LettersParams(n_words=300, min_words_per_letter=8, seeds=(0,), batch_size=32))
    build_letter_cache(model, p, out)
    return out


def _row_key(x: torch.Tensor) -> bytes:
    return x.float().numpy().tobytes()


class ProbeSAE(torch.nn.Module):
    """Latent i = relu(x . u_i) where the letter probe says i (else 0), decoder row u_i = the unit probe
    direction of letter i. Words in
    `absorbed` fire a latent of their own (decoder u_letter, same activation) and their letter latent stays
    silent: planted full absorption."""

    def __init__(self, cache: Path, absorbed: dict[str, str]):
        super().__init__()
        from sae_bench.evals.absorption.common import load_probe
        from safetensors.torch import load_file

        manifest = load_manifest(cache)
        seed_dir = cache / "seed_0"
        probe_dir = seed_dir / "probes" / manifest["model_name"] / f"layer_{manifest['layer']}"
        probe = load_probe(manifest["model_name"], manifest["layer"], seed_dir / "probes", torch.float32, "cpu")
        self.w, self.b = probe.weights.detach(), probe.biases.detach()
        self.u = self.w / self.w.norm(dim=1, keepdim=True)
        words = list(absorbed)
        self.word_index = {w: 26 + j for j, w in enumerate(words)}
        self.letter_of = absorbed
        self.W_dec = torch.cat([self.u, *(self.u[LETTERS.index(absorbed[w])][None] for w in words)])
        self.W_enc = self.W_dec.T.clone()
        self.cfg = SimpleNamespace(d_sae=len(self.W_dec), d_in=self.u.shape[1])
        self.device, self.dtype = torch.device("cpu"), torch.float32
        # Which word each cached residual belongs to (probe data and absorption prompts).
        self.word_of: dict[bytes, str] = {}
        data = np.load(probe_dir / "data.npz")
        for split in ("train", "test"):
            tokens = pd.read_csv(probe_dir / f"{split}_df.csv", keep_default_na=False)["token"]
            for x, word in zip(torch.from_numpy(data[f"X_{split}"]), tokens, strict=True):
                self.word_of[_row_key(x)] = word
        prompts = pd.read_parquet(seed_dir / PROMPTS)
        for x, word in zip(load_file(str(seed_dir / PROMPT_ACTS))["acts"], prompts["word"], strict=True):
            self.word_of[_row_key(x)] = word

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        f = torch.zeros(len(x), self.cfg.d_sae)
        # Fires only where the probe says "letter i", with the residual's own projection on the probe
        # direction: the latent then explains the whole probe projection (no room for absorption).
        f[:, :26] = (x @ self.w.T + self.b > 0) * (x @ self.u.T).relu()
        for row in range(len(x)):
            word = self.word_of.get(_row_key(x[row]))
            if word in self.word_index:
                letter = LETTERS.index(self.letter_of[word])
                f[row, self.word_index[word]] = f[row, letter]
                f[row, letter] = 0.0
        return f

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec


def _examined(cache: Path) -> pd.DataFrame:
    return pd.read_parquet(cache / "seed_0" / PROMPTS)


def test_hook_other_than_resid_post_is_a_clear_error():
    check_hook(Params(hook="resid_post"))
    with pytest.raises(ValueError, match="resid_post"):
        check_hook(Params(hook="resid_pre", layer=7))


def test_vocabulary_sample_covers_every_letter():
    # 'a' words are 90% of this vocabulary: proportional sampling alone would leave most letters empty.
    vocab = [f" a{c}{d}" for c in LETTERS for d in LETTERS[:9]] + [f" {c}{d}" for c in LETTERS[1:] for d in "xyzw"]
    words = sample_words(sorted(vocab), n_words=60, min_per_letter=3)
    counts = pd.Series([w.strip()[0] for w in words]).value_counts()
    assert set(counts.index) == set(LETTERS) and counts.drop("a").min() >= 3


def test_cache_is_consistent(cache):
    manifest = load_manifest(cache)
    (seed,) = manifest["seeds"]
    assert manifest["hook_name"] == "blocks.6.hook_resid_post"
    assert seed["prompt_tokens"] > 20 and seed["absorption_prompts"] > 0
    prompts = _examined(cache)
    assert prompts["word"].is_unique  # one prompt per examined word
    # Every examined word's prompt ends with the template around that word, so -6 is the word.
    pairs = zip(prompts["prompt"], prompts["word"], strict=True)
    assert all(p.endswith(f"{w} has the first letter:") for p, w in pairs)


def test_cached_model_refuses_unknown_prompts(cache):
    manifest = load_manifest(cache)
    m = CachedModel(manifest, None, ["a"], torch.zeros(1, manifest["d_model"]), 10)
    _, out = m.run_with_cache(["a"], names_filter=[manifest["hook_name"]])
    acts = out[manifest["hook_name"]]
    assert torch.isnan(acts[:, 0]).all() and not torch.isnan(acts[:, -6]).any()
    with pytest.raises(KeyError, match="letter cache"):
        m.run_with_cache(["never built"], names_filter=[manifest["hook_name"]])


def test_probe_sae_has_no_absorption(cache):
    result = absorption_result(ProbeSAE(cache, {}), cache, AP, "probe_sae")
    (seed,) = result["per_seed"]
    # On this small sample the L1 probe that picks each letter's latent sometimes picks another
    # letter's; where it found the letter's own latent, nothing may look absorbed.
    own = [c for c, row in seed["per_letter"].items() if row["main_latent"] == LETTERS.index(c)]
    evaluated = [c for c in own if "mean_absorption_fraction" in seed["per_letter"][c]]
    assert len(own) >= 13 and len(evaluated) >= 5, (own, evaluated)
    for letter in evaluated:
        row = seed["per_letter"][letter]
        assert row["mean_absorption_fraction"] < 1e-3 and row["full_absorption_rate"] == 0.0, (letter, row)
    assert result["letters_carried_by_one_latent"] >= 1


def test_planted_absorber_is_measured_exactly(cache):
    from safetensors.torch import load_file

    prompts = _examined(cache)
    target = prompts["letter"].value_counts().index[0]  # the letter with most examined words
    examined = prompts.loc[prompts["letter"] == target, "word"].tolist()
    absorbed = {w: target for w in examined[::2]}
    sae = ProbeSAE(cache, absorbed)
    result = absorption_result(sae, cache, AP, "planted")
    row = result["per_seed"][0]["per_letter"][target]
    assert row["main_latent"] == LETTERS.index(target), "fixture: the k=1 probe missed the letter's own latent"
    # Expected: an absorbed word counts when its residual projects positively on the probe direction.
    x = load_file(str(cache / "seed_0" / PROMPT_ACTS))["acts"]
    proj = dict(zip(prompts["word"], (x @ sae.u[LETTERS.index(target)]).tolist(), strict=True))
    expected = sum(proj[w] > 0 for w in absorbed) / len(examined)
    assert expected > 0.2, "fixture: too few planted absorptions to test"
    assert row["full_absorption_rate"] == pytest.approx(expected, abs=1e-4)  # stored to 4 decimals
    assert row["mean_absorption_fraction"] == pytest.approx(expected, abs=1e-3)


def test_letters_params_validate():
    with pytest.raises(Exception, match="prompt_token_pos"):
        dataclasses.replace(LettersParams(), prompt_token_pos=3).validate()
