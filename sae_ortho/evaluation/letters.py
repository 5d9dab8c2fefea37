"""First-letter absorption, LLM side (stage `letter_cache`): everything that needs the model, once for all SAEs.

SAEBench's absorption evaluation (Chanin et al., "A is for Absorption") on a vocabulary sample, per
seed (the seed draws the vocabulary sample, the probe's train/test split and every in-context prompt):

1. `get_alpha_tokens` (single-token alphabetic words), `n_words` of them sampled;
2. sae_bench's `create_dataset_probe_training` (in-context prompts "{word} has the first letter: W",
   80/20 train/test split of the words), residuals at the word position (`prompt_token_pos`), the
   26-way letter probe (`train_linear_probe_for_task`), saved with `save_probe_and_data` in the
   folder layout sae_bench's loaders read (`<seed>/probes/<model_name>/layer_<L>/`);
3. the prompts sae_bench's `FeatureAbsorptionCalculator` would build for the words it examines (test
   words of each letter the probe scores positive), built by that class itself under the seed, and
   their residuals at the word position, so the SAE side (sae_ortho/evaluation/absorption.py) never runs the model.

Why by hand: sae_bench's `run_eval` loads the model from the hub, runs all 30 layers, and trains the
probe on the full 47k-word vocabulary when its files are missing (hours on CPU). The pieces it calls
are reused as they are; only the forward pass is stopped after the hooked block (same activations).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from sae_ortho.base.io import atomic_dir
from sae_ortho.base.params import LettersParams, Params

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MANIFEST = "manifest.json"
PROMPTS = "absorption_prompts.parquet"
PROMPT_ACTS = "absorption_acts.safetensors"
TOKENIZER = "tokenizer"


def check_hook(p: Params) -> None:
    """sae_bench's absorption code reads `blocks.{L}.hook_resid_post`: anything else would be a wrong number."""
    if p.hook != "resid_post":
        hint = f" (blocks.{p.layer}.hook_resid_pre is blocks.{p.layer - 1}.hook_resid_post)" if p.layer > 0 else ""
        raise ValueError(
            f"first-letter absorption needs hook: resid_post (sae_bench hard-codes blocks.<layer>.hook_resid_post), "
            f"got hook: {p.hook}{hint}"
        )


def hook_point(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


class StopAtLayer:
    """The model as sae_bench uses it, with `run_with_cache` stopped after the hooked block: the same
    activations at a fraction of the cost (sae_bench would run all 30 layers)."""

    def __init__(self, model, layer: int):
        self.model, self.layer = model, layer
        self.cfg, self.tokenizer = model.cfg, model.tokenizer

    def run_with_cache(self, prompts, names_filter=None, **kwargs):
        return self.model.run_with_cache(prompts, names_filter=names_filter, stop_at_layer=self.layer + 1, **kwargs)

    def to_tokens(self, *args, **kwargs):
        return self.model.to_tokens(*args, **kwargs)


def vocabulary(tokenizer) -> list[str]:
    """sae_bench's single-token alphabetic words, sorted so a seed means the same sample everywhere."""
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    return sorted(set(get_alpha_tokens(tokenizer)))


def first_letter(word: str) -> str:
    return word.strip()[0].lower()


def sample_words(vocab: list[str], n_words: int, min_per_letter: int) -> list[str]:
    """`n_words` words in the vocabulary's letter proportions, each letter at least `min_per_letter`
    (or all it has). A letter without training words would make sae_bench's class weight 1/0 and
    the whole 26-way probe NaN; SAEBench itself uses all ~47k words, where this cannot happen."""
    by_letter: dict[str, list[str]] = {letter: [] for letter in LETTERS}
    for word in vocab:
        by_letter[first_letter(word)].append(word)
    words = []
    for pool in by_letter.values():
        want = max(min_per_letter, round(n_words * len(pool) / len(vocab)))
        words += random.sample(pool, min(want, len(pool)))
    random.shuffle(words)
    return words


def check_prompts(model, prompts: list[str], words: list[str], pos: int) -> int:
    """All prompts one length (sae_bench batches them unpadded) with the word's token at `pos`; their length."""
    lengths = set()
    for prompt, word in zip(prompts, words, strict=True):
        tokens = model.to_tokens(prompt)[0]
        lengths.add(len(tokens))
        word_tokens = model.to_tokens(word, prepend_bos=False)[0]
        if len(word_tokens) != 1 or tokens[pos] != word_tokens[0]:
            raise ValueError(f"prompt {prompt[-60:]!r}: the word {word!r} is not the single token at position {pos}")
    if len(lengths) != 1:
        raise ValueError(f"first-letter prompts have {len(lengths)} different lengths {sorted(lengths)}; need one")
    return lengths.pop()


@torch.no_grad()
def residuals_at(model, prompts: list[str], hook: str, pos: int, batch_size: int, desc: str) -> torch.Tensor:
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        _, cache = model.run_with_cache(prompts[start : start + batch_size], names_filter=[hook])
        out.append(cache[hook][:, pos, :].float())
    return torch.cat(out) if out else torch.empty(0, model.cfg.d_model)


def probe_letter_f1(probe, acts: torch.Tensor, labels: list[int]) -> dict[str, float]:
    """Per-letter F1 of the 26-way probe on the test words, as SAEBench scores it (logit > 0)."""
    from sklearn.metrics import f1_score

    with torch.no_grad():
        scores = probe(acts.float()).float()
    y = np.asarray(labels)
    return {
        letter: float(f1_score(y == i, (scores[:, i] > 0).numpy(), zero_division=0.0))
        for i, letter in enumerate(LETTERS)
    }


def build_seed(model, p: Params, seed: int, out_dir: Path, vocab: list[str]) -> dict:
    """One seed's probe, probe data and absorption prompts with their residuals, under out_dir."""
    from sae_bench.evals.absorption.common import load_probe_data_split
    from sae_bench.evals.absorption.feature_absorption import (
        ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS,
        ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
        ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
        FULL_ABSORPTION_PROBE_COS_THRESHOLD,
    )
    from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator
    from sae_bench.evals.absorption.probing import (
        create_dataset_probe_training,
        gen_and_save_df_acts_probing,
        save_probe_and_data,
        train_linear_probe_for_task,
    )
    from sae_bench.evals.absorption.prompting import first_letter_formatter

    lp: LettersParams = p.letters
    hook = hook_point(p.layer)
    wrapped = StopAtLayer(model, p.layer)
    probe_dir = out_dir / "probes" / model.cfg.model_name / f"layer_{p.layer}"
    random.seed(seed)  # sae_bench samples words, splits and in-context examples with the `random` module
    words = sample_words(vocab, lp.n_words, lp.min_words_per_letter)
    train, test = create_dataset_probe_training(
        vocab=words,
        formatter=first_letter_formatter(),
        num_prompts_per_token=1,
        base_template=lp.prompt_template,
        max_icl_examples=lp.max_icl_examples,
    )
    n_ctx = check_prompts(
        model, [pr.base for pr, _ in train + test], [pr.word for pr, _ in train + test], lp.prompt_token_pos
    )
    torch.manual_seed(seed)
    train_df, test_df, train_acts, test_acts = gen_and_save_df_acts_probing(
        model=wrapped,
        train_dataset=train,
        test_dataset=test,
        path=probe_dir,
        hook_point=hook,
        batch_size=lp.batch_size,
        position_idx=lp.prompt_token_pos,
    )
    probe, probe_data = train_linear_probe_for_task(
        train_df=train_df,
        test_df=test_df,
        device=p.torch_device,
        train_activations=train_acts,
        test_activations=test_acts,
        num_classes=26,
        batch_size=lp.probe_batch_size,
        num_epochs=lp.probe_epochs,
        lr=lp.probe_lr,
    )
    if not all(torch.isfinite(t).all() for t in probe.parameters()):
        raise ValueError(f"letter probe (seed {seed}) has non-finite weights: a letter without training words?")
    save_probe_and_data(probe, probe_data, probe_dir)
    for memmap in probe_dir.glob("*_act_tensor.dat"):  # duplicates of data.npz
        memmap.unlink()

    # The words sae_bench's absorption step examines: test words the probe puts in their own letter.
    test_acts_parsed, test_labels = load_probe_data_split(
        wrapped, p.layer, "test", out_dir / "probes", dtype=torch.float32, device=p.torch_device
    )
    with torch.no_grad():
        scores = probe(test_acts_parsed)
    examined = {
        letter: [w for (w, y), s in zip(test_labels, scores, strict=True) if y == i and s[i] > 0]
        for i, letter in enumerate(LETTERS)
    }
    calculator = FeatureAbsorptionCalculator(
        model=wrapped,
        icl_word_list=vocab,
        max_icl_examples=lp.max_icl_examples,
        base_template=lp.prompt_template,
        answer_formatter=first_letter_formatter(),
        word_token_pos=lp.prompt_token_pos,
        full_absorption_probe_cos_sim_threshold=FULL_ABSORPTION_PROBE_COS_THRESHOLD,
        absorption_fraction_probe_cos_sim_threshold=ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
        probe_projection_proportion_threshold=ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
        absorption_fraction_max_absorbing_latents=ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS,
        batch_size=lp.batch_size,
    )
    random.seed(seed + 1_000_003)
    rows = []
    for letter, letter_words in examined.items():
        for prompt in calculator._build_prompts(letter_words):
            rows.append({"letter": letter, "word": prompt.word, "prompt": prompt.base})
    prompts = pd.DataFrame(rows, columns=["letter", "word", "prompt"])
    if len(prompts):
        check_prompts(model, prompts["prompt"].tolist(), prompts["word"].tolist(), lp.prompt_token_pos)
    acts = residuals_at(
        wrapped, prompts["prompt"].tolist(), hook, lp.prompt_token_pos, lp.batch_size, "absorption prompts"
    )
    prompts.to_parquet(out_dir / PROMPTS, index=False)
    save_file({"acts": acts.contiguous()}, str(out_dir / PROMPT_ACTS))

    f1 = probe_letter_f1(probe, test_acts_parsed, [y for _, y in test_labels])
    return {
        "seed": seed,
        "words": len(words),
        "train_words": len(train),
        "test_words": len(test),
        "prompt_tokens": n_ctx,
        "absorption_prompts": len(prompts),
        "probe_f1": {k: round(v, 4) for k, v in f1.items()},
        "probe_macro_f1": round(float(np.mean(list(f1.values()))), 4),
    }


def build_letter_cache(model, p: Params, out_dir: Path) -> dict:
    """All seeds, written to a temporary folder and moved into place whole (an interrupted run leaves nothing)."""
    check_hook(p)
    with atomic_dir(out_dir, digests=True) as tmp:
        vocab = vocabulary(model.tokenizer)
        per_seed = [build_seed(model, p, seed, tmp / f"seed_{seed}", vocab) for seed in p.letters.seeds]
        model.tokenizer.save_pretrained(tmp / TOKENIZER)  # the SAE side parses words without loading the model
        manifest = _manifest(model, p, vocab, per_seed)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _manifest(model, p: Params, vocab, per_seed: list) -> dict:
    import importlib.metadata

    return {
        "model_name": model.cfg.model_name,
        "d_model": model.cfg.d_model,
        "layer": p.layer,
        "hook_name": hook_point(p.layer),
        "vocabulary_size": len(vocab),
        "letters": asdict(p.letters),
        "sae_bench_version": importlib.metadata.version("sae-bench"),
        "seeds": per_seed,
    }
