"""SAEBench sparse probing, LLM side (stage `llm_cache`): the probing examples' per-token residuals,
cached once for all SAEs, and the LLM-residual probe baseline. The SAE side (`probing@<sae>`, one run
per SAE on this cache, no model needed) is evaluation/probing.py.

Reused from sae_bench, unchanged, so the numbers mean what SAEBench's mean:
- `activation_collection.get_llm_activations`: the forward up to the hook (`stop_at_layer=layer+1`)
  with BOS/pad/EOS positions zeroed (`get_bos_pad_eos_mask`, also used to pick the stored tokens);
- `activation_collection.create_meaned_model_activations` / `get_sae_meaned_activations`: mean
  pooling of residuals / SAE latents over each example's unmasked tokens;
- `probe_training.train_probe_on_activations`: one-vs-rest probes with balanced negatives; top-k
  dims by |mean(pos) - mean(neg)| and sklearn logistic regression; the all-dims probes with
  `use_sklearn=False, batch_size=250, epochs=100, lr=1e-2`, as `sparse_probing/main.py` calls it
  (SAEBench's all-dims accuracy is the best test accuracy over epochs; kept for comparability);
- hub tasks: `dataset_utils.get_multi_label_train_test_data` + `dataset_info.chosen_classes_per_dataset`.

Hand-written, and why:
- Tokenisation: SAEBench calls the tokenizer directly, which gives Gemma a BOS but not SmolLM2 (its
  tokenizer adds none; transformer_lens prepends it in `to_tokens`). We truncate to context_len - 1 and
  prepend BOS, so every example starts the way SAEBench's Gemma examples do.
- Storage: SAEBench torch.saves [n, 128, d] per dataset (tens of GB at full size). We keep only the
  unmasked tokens, fp16, one safetensors file per task plus an index, and re-pack them zero-padded
  before calling SAEBench's pooling functions; those skip all-zero positions, so the result is the same.
- Sampling of the offline tasks (data/probing/<task>.parquet): exactly train/test_per_class examples
  per class, pandas `sample(random_state=seed)` as SAEBench's `gather_dataset_from_df` does.
- Batching: forward passes and pooling run on length-sorted batches cut to their longest example;
  trailing padding cannot change earlier positions (causal attention), so only the work changes.
- Seeding: torch is seeded before every train_probe_on_activations call (it draws the negatives with
  torch.randperm), so a task's probes do not depend on which tasks ran before it.
- train_probe_on_activations is called undecorated (`__wrapped__`): with beartype 0.23 its jaxtyping
  scope makes every top-k probe raise a dimension mismatch (see probe_accuracies).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sae_ortho.base import dist
from sae_ortho.base.device import HOST
from sae_ortho.base.io import atomic_dir, atomic_write_text, sha256_file, verified
from sae_ortho.base.params import OFFLINE_TASKS, SAEBENCH_HUB_TASKS, Params

MANIFEST = "manifest.json"
INDEX = "index.parquet"
LLM_RESULTS = "llm_results.json"
SPLITS = ("train", "test")
Texts = dict[str, dict[str, list[str]]]  # split -> class -> texts


def task_file(task: str) -> str:
    return task.replace("/", "__") + ".safetensors"


# --------------------------------------------------------------------------------------------
# Texts


def _hub_error(task: str, problem: str, err: Exception | None = None) -> ValueError:
    first = (str(err).strip().splitlines() or [""])[0][:200] if err else ""
    why = f" ({type(err).__name__}: {first})" if err else ""
    return ValueError(
        f"probing task {task!r} {problem}{why}; use the offline tasks ({', '.join(OFFLINE_TASKS)}) in probing.tasks"
    )


def _check_hub(task: str) -> None:
    import huggingface_hub

    # Read the variable now, not at import: several of SAEBench's loaders stream, which no cache can serve.
    if (
        os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
        or huggingface_hub.constants.HF_HUB_OFFLINE
    ):
        raise _hub_error(task, "needs the Hugging Face hub, which is unreachable (HF_HUB_OFFLINE is set)")
    try:
        huggingface_hub.HfApi().dataset_info(task, timeout=15)
    except Exception as err:  # noqa: BLE001 - DNS, proxy, HTTP: every failure means the same to the user
        raise _hub_error(task, "needs the Hugging Face hub, which is unreachable", err) from None


def _take(task: str, texts: Texts, p: Params) -> Texts:
    """Exactly train/test_per_class texts per class: sae_bench asserts balanced negatives."""
    if len(texts["train"]) < 2:
        raise ValueError(f"probing task {task!r} has {len(texts['train'])} class(es); a probing task needs >= 2")
    for split in SPLITS:
        want = getattr(p.probing, f"{split}_per_class")
        for label, items in texts[split].items():
            if len(items) < want:
                counts = ", ".join(f"{s} {len(texts[s].get(label, []))}" for s in SPLITS)
                raise ValueError(
                    f"probing task {task!r}: class {label!r} has {len(items)} {split} examples ({counts}), "
                    f"fewer than probing.{split}_per_class={want}; lower probing.{split}_per_class"
                )
    return {s: {lab: items[: getattr(p.probing, f"{s}_per_class")] for lab, items in texts[s].items()} for s in SPLITS}


def _offline_texts(task: str, p: Params, probing_dir: Path) -> Texts:
    path = probing_dir / f"{task}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run dvc repro corpus (or drop {task!r} from probing.tasks)")
    df = pd.read_parquet(path, columns=["text", "label", "split"])
    out: Texts = {}
    for split in SPLITS:
        want = getattr(p.probing, f"{split}_per_class")
        out[split] = {}
        for label in sorted(df["label"].unique()):
            rows = df[(df["label"] == label) & (df["split"] == split)]
            out[split][label] = rows["text"].sample(n=min(want, len(rows)), random_state=p.probing.seed).tolist()
    return out


def _hub_texts(task: str, p: Params) -> Texts:
    import datasets
    from sae_bench.sae_bench_utils import dataset_info, dataset_utils

    datasets.config.TORCHVISION_AVAILABLE = False  # datasets 3.6 imports a VideoReader our torchvision lacks
    # SAEBench's loaders take the size of a binary task (two classes, or two quadrants per class).
    train_size, test_size = (4 * math.ceil(getattr(p.probing, f"{s}_per_class") / 2) for s in SPLITS)
    try:
        train, test = dataset_utils.get_multi_label_train_test_data(task, train_size, test_size, p.probing.seed)
    except Exception as err:  # noqa: BLE001 - network errors surface as many types
        raise _hub_error(task, "could not be loaded from the Hugging Face hub", err) from None
    chosen = dataset_info.chosen_classes_per_dataset[task]
    return {"train": dataset_utils.filter_dataset(train, chosen), "test": dataset_utils.filter_dataset(test, chosen)}


def check_tasks_available(p: Params, probing_dir: Path) -> None:
    """Fail in one line, before any model work: missing task files, too-small classes, hub unreachable."""
    for task in p.probing.tasks:
        if task in SAEBENCH_HUB_TASKS:
            _check_hub(task)
        else:
            _take(task, _offline_texts(task, p, probing_dir), p)


def load_texts(p: Params, probing_dir: Path) -> dict[str, Texts]:
    check_tasks_available(p, probing_dir)
    return {
        t: _take(t, _hub_texts(t, p) if t in SAEBENCH_HUB_TASKS else _offline_texts(t, p, probing_dir), p)
        for t in p.probing.tasks
    }


def tokenize(tokenizer, texts: list[str], context_len: int) -> torch.Tensor:
    """SAEBench's `tokenizer(padding="max_length", truncation=True)`, with BOS first as transformer_lens puts it."""
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    prepend = bos is not None and not adds_bos
    ids = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=context_len - prepend,
        padding_side="right",  # right padding keeps each text's positions (and activations) as unpadded
        return_tensors="pt",
    )["input_ids"]
    if prepend:
        ids = torch.cat([torch.full((len(texts), 1), bos, dtype=ids.dtype), ids], dim=1)
    return ids


# --------------------------------------------------------------------------------------------
# The cache: unmasked per-token activations of every example


@dataclass
class TaskActs:
    """One task's examples: unmasked token activations back to back, and where each example lies."""

    acts: torch.Tensor  # [n_tokens, d] fp16
    token_ids: torch.Tensor  # [n_tokens] int32
    index: pd.DataFrame  # label, split, example, offset, length

    def pooled(
        self, split: str, pool: Callable[[dict], dict], chunk: int, device: torch.device = HOST
    ) -> dict[str, torch.Tensor]:
        """class -> pool({class: zero-padded fp32 [b, len, d]}) rows, in index order, on the host.

        `pool` is one of SAEBench's pooling functions (they skip all-zero positions); it runs on `device`
        (an SAE's, so that its [b, len, d_sae] codes never cross to the host). Examples go in length-sorted
        chunks, each padded only to its own longest, which changes nothing but the work.
        """
        out = {}
        for label, rows in self.index[self.index["split"] == split].groupby("label", sort=False):
            order = torch.from_numpy(np.argsort(-rows["length"].to_numpy(), kind="stable"))
            parts = []
            for start in range(0, len(order), chunk):
                sel = rows.iloc[order[start : start + chunk].numpy()]
                block = torch.zeros(len(sel), int(sel["length"].max()), self.acts.shape[1])
                for i, (o, n) in enumerate(zip(sel["offset"], sel["length"], strict=True)):
                    block[i, :n] = self.acts[o : o + n].float()
                parts.append(pool({str(label): block.to(device)})[str(label)].float().to(HOST))
            pooled = torch.cat(parts)
            out[str(label)] = torch.empty_like(pooled).index_copy_(0, order, pooled)
        return out

    @classmethod
    def load(cls, acts_dir: Path, task: str, index: pd.DataFrame) -> TaskActs:
        tensors = load_file(str(verified(acts_dir / task_file(task))))
        rows = index[index["task"] == task].drop(columns="task").reset_index(drop=True)
        return cls(tensors["activations"], tensors["token_ids"], rows)


def probe_accuracies(
    train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], k_values: tuple[int, ...], prefix: str, seed: int
) -> dict[str, dict[str, float]]:
    """{f"{prefix}_test_accuracy" | f"{prefix}_top_{k}_test_accuracy": {class: accuracy}} via sae_bench."""
    from sae_bench.evals.sparse_probing.probe_training import train_probe_on_activations

    # Its @jaxtyped scope binds train_dataset_size to the per-class count (beartype 0.23 checks dict
    # values), and the @beartype-only train_sklearn_probe it calls sees 2x that: every top-k probe
    # raises. The undecorated function is the same code without that outer scope.
    train_probe_on_activations = getattr(train_probe_on_activations, "__wrapped__", train_probe_on_activations)
    runs: dict[str, dict] = {f"{prefix}_test_accuracy": dict(use_sklearn=False, batch_size=250, epochs=100, lr=1e-2)}
    runs.update({f"{prefix}_top_{k}_test_accuracy": dict(select_top_k=k) for k in k_values})
    out = {}
    # sae_bench prints per probe and switches grad on globally; keep both out of our run.
    with contextlib.redirect_stdout(io.StringIO()), torch.enable_grad():
        for key, kwargs in runs.items():
            torch.manual_seed(seed)
            _, acc = train_probe_on_activations(train, test, **kwargs)
            out[key] = {str(c): float(a) for c, a in acc.items()}
    return out


def mean_accuracies(per_class: dict[str, dict[str, float]]) -> dict[str, float]:
    return {key: sum(v.values()) / len(v) for key, v in per_class.items()}


def cache_meta(p: Params) -> dict:
    pp = p.probing
    return {
        "model": p.model,
        "hook_name": p.hook_name,
        "layer": p.layer,
        "tasks": list(pp.tasks),
        "train_per_class": pp.train_per_class,
        "test_per_class": pp.test_per_class,
        "context_len": pp.context_len,
        "k_values": list(pp.k_values),
        "seed": pp.seed,
    }


def save_probe_cache(out_dir: Path, tasks: dict[str, TaskActs], p: Params, progress_bar: bool = True) -> dict:
    """Write the task files, index, LLM-residual baseline and manifest into a temporary directory, then
    rename it to `out_dir` (replacing it), so an interrupted run leaves nothing DVC could cache."""
    from sae_bench.sae_bench_utils.activation_collection import create_meaned_model_activations

    with atomic_dir(out_dir, digests=True) as tmp:
        files, llm = {}, {}
        for task, ta in tqdm(tasks.items(), desc="LLM-residual probes", disable=not progress_bar):
            path = tmp / task_file(task)
            save_file({"activations": ta.acts.contiguous(), "token_ids": ta.token_ids.contiguous()}, str(path))
            files[task] = {
                "file": path.name,
                "n_tokens": len(ta.acts),
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
            # Pooled from the stored fp16 values, so the LLM baseline sees exactly what the SAEs see.
            pooled = {s: ta.pooled(s, create_meaned_model_activations, p.probing.batch_size) for s in SPLITS}
            llm[task] = probe_accuracies(pooled["train"], pooled["test"], p.probing.k_values, "llm", p.probing.seed)
        index = pd.concat([ta.index.assign(task=t) for t, ta in tasks.items()], ignore_index=True)
        index.to_parquet(tmp / INDEX, index=False)
        per_task = {t: mean_accuracies(v) for t, v in llm.items()}
        overall = {key: sum(m[key] for m in per_task.values()) / len(per_task) for key in next(iter(per_task.values()))}
        results = {"eval_result_metrics": {"llm": overall}, "per_task": per_task, "per_class": llm}
        atomic_write_text(tmp / LLM_RESULTS, json.dumps(results, indent=1) + "\n")
        d_in = next(iter(tasks.values())).acts.shape[1]
        manifest = {
            **cache_meta(p),
            "d_in": int(d_in),
            "dtype": "float16",
            "stored_tokens": "unmasked only (BOS, pad and EOS dropped, as SAEBench masks them)",
            "n_examples": len(index),
            "n_tokens": int(index["length"].sum()),
            "bytes": sum(f["bytes"] for f in files.values()),
            "files": files,
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return {**manifest, "llm": overall}


@torch.no_grad()
def collect_probe_activations(model, p: Params, probing_dir: Path, out_dir: Path, progress_bar: bool = True) -> dict:
    """Tokenise every task's examples, run the model once up to the hook, store the unmasked per-token
    activations and the LLM-residual probe baseline under `out_dir`; return small metrics.

    Under torchrun the length-sorted batches go to ranks round-robin (the same batches as one process, so
    the same activations); rank 0 gathers them, writes the cache and returns the metrics, the others {}."""
    from sae_bench.sae_bench_utils.activation_collection import get_bos_pad_eos_mask, get_llm_activations

    pp = p.probing
    texts = load_texts(p, probing_dir)
    t0 = time.perf_counter()
    tokens, rows = {}, {}
    for task, by_split in texts.items():
        rows[task] = [(lab, s, i) for s in SPLITS for lab, items in by_split[s].items() for i in range(len(items))]
        flat = [t for s in SPLITS for items in by_split[s].values() for t in items]
        tokens[task] = tokenize(model.tokenizer, flat, pp.context_len)
    n_examples = sum(len(t) for t in tokens.values())
    bar = tqdm(total=n_examples, desc="probing activations", unit="ex", disable=not (progress_bar and dist.is_main()))
    task_acts, total = {}, 0
    world, rank = dist.world_size(), dist.rank()
    for task, toks in tokens.items():
        keep_all = get_bos_pad_eos_mask(toks, model.tokenizer)
        lengths = keep_all.sum(1)
        if lengths.min() == 0:
            raise ValueError(f"probing task {task!r}: an example has no tokens besides BOS/pad/EOS (empty text?)")
        # Length-sorted batches cut to their longest example: trailing pads cannot change earlier
        # positions (causal attention), so this only saves the forward passes over padding.
        order = torch.argsort(lengths, descending=True, stable=True)
        acts: list[torch.Tensor] = [torch.empty(0)] * len(toks)
        for number, start in enumerate(range(0, len(toks), pp.batch_size)):
            if number % world != rank:
                continue
            idx = order[start : start + pp.batch_size]
            keep = keep_all[idx]
            width = int(keep.any(0).nonzero().max()) + 1
            batch, keep = toks[idx, :width], keep[:, :width]
            x = get_llm_activations(
                batch, model, len(batch), p.layer, p.hook_name, mask_bos_pad_eos_tokens=True, show_progress=False
            )
            for j, i in enumerate(idx.tolist()):
                acts[i] = x[j][keep[j]].half()
            total += batch.numel()
            bar.update(len(batch) * world)
        if world > 1:  # rank 0 collects every rank's examples
            parts = dist.gather_to_main({i: a for i, a in enumerate(acts) if a.numel()})
            if parts is None:
                continue
            for part in parts:
                for i, a in part.items():
                    acts[i] = a
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        index = pd.DataFrame(rows[task], columns=["label", "split", "example"])
        index = index.assign(offset=offsets.numpy(), length=lengths.numpy())
        task_acts[task] = TaskActs(torch.cat(acts), toks[keep_all].int(), index)
    bar.close()
    forward_s = time.perf_counter() - t0
    total = int(dist.all_reduce_sum(torch.tensor([total])).item())
    if not dist.is_main():
        return {}
    manifest = save_probe_cache(out_dir, task_acts, p, progress_bar)
    return {
        "tasks": len(task_acts),
        "classes": sum(ta.index["label"].nunique() for ta in task_acts.values()),
        "examples": manifest["n_examples"],
        "tokens_forward": total,  # after trimming padding: the stored ones, BOS and inner pads
        "tokens_stored": manifest["n_tokens"],
        "bytes": manifest["bytes"],
        "seconds_forward": round(forward_s, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "tokens_per_s": round(total / forward_s, 1),
        "llm": {k: round(v, 4) for k, v in manifest["llm"].items()},
    }
