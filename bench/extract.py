"""Benchmark the extract stage against the bare forward pass and SAELens's CacheActivationsRunner.

All three run in one process, on the same model object, the same hook and the same token rows
(contexts of `context_len` tokens, BOS first, batches of 16):

  bare_forward  `model(tokens, stop_at_layer=layer + 1)` under inference_mode, nothing stored
  ours          `stages.extract.extract(...)` for real into a temp dir, timed by its own
                `tokens_per_s` (tokenisation, forward, fp16 cast and shard writing; not model
                loading, the corpus pre-count/hash or the manifest); the whole call's rate is
                recorded too, as `ours_whole_call`
  saelens       `CacheActivationsRunner(cfg, override_dataset=rows).run()` into a temp dir, fp16,
                BOS dropped with seqpos_slice=(1, None) so it stores what we store; timed from
                construction to the consolidated dataset (its model loading is patched out)

bare_forward and saelens get the rows pre-tokenised; ours tokenises the corpus itself (~1% of its time).
Throughput is stored tokens per second, contexts x (context_len - 1) / seconds, the same numerator
for all three. After a warm-up of each, `--rounds` rounds run the three in alternating order; the
ratios of the medians are the headline, with the median of each round's own ratio (`paired_ratios`,
less sensitive to drift) and the best rounds beside them. Each measurement also records the share of
the machine's CPU that other processes used meanwhile: above ~0.1 the figures are not to be trusted.
Even on an idle 2-core machine single measurements vary by ~±8%, so differences of a few % are noise.

Peak RSS: fresh `python -m stages.extract` runs at N and 4N tokens; the high-water mark after model
loading is compared (ratio ~1.0: memory does not grow with n_tokens).

Usage: python -m bench.extract [--rounds 3] [--tokens 18000] [--out metrics/bench_extract.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from bench.saelens_runner import BATCH_SIZE, CONTEXT_LEN, bench_saelens
from sae_ortho.base.io import atomic_write_text
from sae_ortho.base.params import ExtractParams, Params
from sae_ortho.data import extract as extract_mod
from sae_ortho.data.lm import load_model

REPO = Path(__file__).resolve().parents[1]
OUT = Path("metrics/bench_extract.json")
RSS_SHARD_TOKENS = 4096  # small shards, so both RSS runs are well past the allocator's warm-up (~5 shards)
TARGETS = {"ours_over_bare": 0.97, "ours_over_saelens": 1.0}
NOISY_LOAD = 0.1  # share of the machine's CPU used by other processes above which a round is flagged

# A measurement returns (seconds for its throughput, seconds for the whole call).
Measure = Callable[[], tuple[float, float]]


# ---------------------------------------------------------------- inputs


def stdlib_docstring_corpus(path: Path, min_chars: int) -> None:
    """Real English text without the network: docstrings of standard-library sources (parsed, not imported)."""
    texts: list[str] = []
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in source.parts or "tests" in source.parts:
            continue
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    texts.append(doc)
        if sum(map(len, texts)) >= min_chars:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"doc_id": range(len(texts)), "source": "stdlib-docs", "text": texts}).to_parquet(path)


def token_bodies(corpus: Path, tokenizer, n_contexts: int, tmp: Path) -> np.ndarray | None:
    """The first `n_contexts` context bodies exactly as the extract stage builds them; None if too short."""
    work = Path(tempfile.mkdtemp(dir=tmp))
    try:
        token_ids, _ = extract_mod.tokenise(corpus, tokenizer, CONTEXT_LEN - 1, n_contexts, work)
        return np.array(token_ids)
    except ValueError:
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def choose_corpus(tokenizer, tmp: Path, needed_contexts: int) -> tuple[Path, np.ndarray]:
    """data/corpus.parquet when it is there and large enough, else a docstring corpus built in `tmp`;
    with the token bodies of the first `needed_contexts` contexts."""
    if extract_mod.CORPUS.exists():
        bodies = token_bodies(extract_mod.CORPUS, tokenizer, needed_contexts, tmp)
        if bodies is not None:
            return extract_mod.CORPUS, bodies
        print(f"{extract_mod.CORPUS} is too small for this benchmark; using stdlib docstrings", file=sys.stderr)
    path = tmp / "corpus.parquet"
    stdlib_docstring_corpus(path, min_chars=needed_contexts * (CONTEXT_LEN - 1) * 6)
    bodies = token_bodies(path, tokenizer, needed_contexts, tmp)
    if bodies is None:
        sys.exit("error: the stdlib docstring corpus is too small for --tokens; lower it")
    return path, bodies


def token_rows(bodies: np.ndarray, bos: int) -> torch.Tensor:
    """BOS + body, as the extract stage feeds the model."""
    body = torch.from_numpy(bodies).long()
    return torch.cat([torch.full((len(body), 1), bos), body], dim=1)


# ---------------------------------------------------------------- the three measurements


def bench_bare(model, rows: torch.Tensor, stop_at_layer: int) -> tuple[float, float]:
    """The forward pass up to the hooked layer, batch by batch, nothing stored."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(rows), BATCH_SIZE):
            model(rows[b : b + BATCH_SIZE], stop_at_layer=stop_at_layer)
    seconds = time.perf_counter() - t0
    return seconds, seconds


def bench_ours(model, corpus: Path, n_contexts: int, tmp: Path) -> tuple[float, float]:
    """The extract stage's `extract()`: its own loop time (from `tokens_per_s`) and the whole call."""
    ex = ExtractParams(context_len=CONTEXT_LEN, n_tokens=n_contexts * (CONTEXT_LEN - 1), batch_size=BATCH_SIZE)
    work = Path(tempfile.mkdtemp(dir=tmp))
    try:
        t0 = time.perf_counter()
        metrics = extract_mod.extract(
            Params(extract=ex), model, corpus, work / "acts", work / "acts.partial", progress_bar=False
        )
        call_seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(work)
    assert metrics["tokens_this_run"] == n_contexts * (CONTEXT_LEN - 1)
    return metrics["tokens_this_run"] / metrics["tokens_per_s"], call_seconds


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat), None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def measured(measure: Measure) -> tuple[float, float, float | None]:
    """(throughput seconds, whole-call seconds, share of the machine's CPU other processes used meanwhile)."""
    busy0, own0, t0 = busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
    seconds, call_seconds = measure()
    wall, busy1, own1 = time.perf_counter() - t0, busy_cpu_seconds(), sum(os.times()[:2])
    if busy0 is None or busy1 is None:
        return seconds, call_seconds, None
    foreign = (busy1 - busy0) - (own1 - own0)
    return seconds, call_seconds, round(max(foreign, 0.0) / (wall * (os.cpu_count() or 1)), 3)


def interleaved(measures: dict[str, Measure], rounds: int, stored_tokens: int) -> dict[str, dict[str, list]]:
    """Warm up each measure once, then `rounds` rounds in alternating order: tok/s and foreign load per round."""
    for name, measure in measures.items():
        print(f"warm-up {name}: {stored_tokens / measure()[0]:,.0f} tok/s", file=sys.stderr)
    raw: dict[str, dict[str, list]] = {
        n: {"tok_per_s": [], "whole_call_tok_per_s": [], "foreign_load": []} for n in measures
    }
    for r in range(rounds):
        for name in list(measures) if r % 2 == 0 else list(reversed(measures)):
            seconds, call_seconds, load = measured(measures[name])
            raw[name]["tok_per_s"].append(round(stored_tokens / seconds, 1))
            raw[name]["whole_call_tok_per_s"].append(round(stored_tokens / call_seconds, 1))
            raw[name]["foreign_load"].append(load)
        line = ", ".join(f"{n} {v['tok_per_s'][-1]:,.0f} (load {v['foreign_load'][-1]})" for n, v in raw.items())
        print(f"round {r + 1}/{rounds}: {line}", file=sys.stderr)
    return raw


# ---------------------------------------------------------------- memory

# `python -m stages.extract` (run through runpy, as -m does) with load_model wrapped: the peak RSS of
# model loading is read, freed heap is handed back, the peak is reset, and the next peak is the extraction's.
RSS_CHILD = """
import ctypes, json, runpy, sys
from pathlib import Path
import sae_ortho.data.lm

def status_kib(key):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1])

load_model, peaks = sae_ortho.data.lm.load_model, {}

def load_then_reset_peak(*args, **kwargs):
    model = load_model(*args, **kwargs)
    peaks["load"] = status_kib("VmHWM")
    ctypes.CDLL(None).malloc_trim(0)  # return the loader's freed heap to the OS, so that reuse shows as growth
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS (Linux >= 4.0)
    return model

sae_ortho.data.lm.load_model = load_then_reset_peak
runpy.run_module("stages.extract", run_name="__main__", alter_sys=True)
peaks["extract"] = status_kib("VmHWM")
Path(sys.argv[1]).write_text(json.dumps(peaks))
"""


def peak_rss_kib(corpus: Path, n_tokens: int, tmp: Path) -> dict[str, int]:
    """Peak RSS (KiB) of a fresh `python -m stages.extract` storing `n_tokens`: model loading, then extraction."""
    work = Path(tempfile.mkdtemp(dir=tmp))
    (work / "data").mkdir()
    shutil.copy(corpus, work / "data" / "corpus.parquet")
    extract_cfg = {"context_len": CONTEXT_LEN, "n_tokens": n_tokens, "batch_size": BATCH_SIZE}
    (work / "params.yaml").write_text(yaml.safe_dump({"extract": {**extract_cfg, "shard_tokens": RSS_SHARD_TOKENS}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-c", RSS_CHILD, str(work / "peaks.json")]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: stages.extract ({n_tokens} tokens) failed:\n{done.stderr[-2000:]}")
    peaks = json.loads((work / "peaks.json").read_text())
    shutil.rmtree(work)
    return peaks


# ---------------------------------------------------------------- driver


def summarise(raw: dict[str, dict[str, list]]) -> tuple[dict[str, float], dict[str, float]]:
    """Median and best tok/s per measurement, with `ours_whole_call` as a fourth entry."""
    series = {name: v["tok_per_s"] for name, v in raw.items()} | {
        "ours_whole_call": raw["ours"]["whole_call_tok_per_s"]
    }
    medians = {name: round(statistics.median(v), 1) for name, v in series.items()}
    best = {name: max(v) for name, v in series.items()}
    return medians, best


def ratios(tok_per_s: dict[str, float]) -> dict[str, float]:
    return {
        "ours_over_bare": round(tok_per_s["ours"] / tok_per_s["bare_forward"], 4),
        "ours_over_saelens": round(tok_per_s["ours"] / tok_per_s["saelens"], 4),
    }


def paired_ratios(raw: dict[str, dict[str, list]]) -> dict[str, float]:
    """Median over rounds of each round's own ratio: measurements minutes apart drift, neighbours less so."""
    per_round = [
        ratios({name: v["tok_per_s"][r] for name, v in raw.items()}) for r in range(len(raw["ours"]["tok_per_s"]))
    ]
    return {key: round(statistics.median(r[key] for r in per_round), 4) for key in TARGETS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each measurement (default 3)")
    parser.add_argument("--tokens", type=int, default=18_000, help="stored tokens per measurement (default 18000)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"JSON output (default {OUT})")
    args = parser.parse_args()
    if args.rounds < 1 or args.tokens < 1:
        parser.error("--rounds and --tokens must be >= 1")

    p = Params()
    body_len = CONTEXT_LEN - 1
    n_contexts = math.ceil(args.tokens / body_len / BATCH_SIZE) * BATCH_SIZE  # whole batches, for SAELens
    stored_tokens = n_contexts * body_len
    rss_tokens = [stored_tokens, 4 * stored_tokens]

    model = load_model(p.model)
    tokenizer = model.tokenizer
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp_name:
        tmp = Path(tmp_name)
        corpus, bodies = choose_corpus(tokenizer, tmp, math.ceil(rss_tokens[-1] / body_len))
        rows = token_rows(bodies[:n_contexts], tokenizer.bos_token_id)
        measures: dict[str, Measure] = {
            "bare_forward": lambda: bench_bare(model, rows, p.layer + 1),
            "ours": lambda: bench_ours(model, corpus, n_contexts, tmp),
            "saelens": lambda: bench_saelens(model, rows, p.hook_name, tmp),
        }
        raw = interleaved(measures, args.rounds, stored_tokens)
        rss = [peak_rss_kib(corpus, n, tmp) for n in rss_tokens]

    medians, best = summarise(raw)
    loads = [x for v in raw.values() for x in v["foreign_load"] if x is not None]
    median_ratios = ratios(medians)
    result = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": p.model,
        "hook_name": p.hook_name,
        "context_len": CONTEXT_LEN,
        "batch_size": BATCH_SIZE,
        "contexts": n_contexts,
        "tokens_per_measurement": stored_tokens,
        "token_count": "stored tokens = contexts x (context_len - 1), BOS excluded, same for all three",
        "corpus": str(corpus) if corpus == extract_mod.CORPUS else "stdlib docstrings, built in a temp dir",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "rounds": args.rounds,
        "median_tok_per_s": medians,
        "ratios": median_ratios,
        "targets": TARGETS,
        "meets_targets": {k: median_ratios[k] >= v for k, v in TARGETS.items()},
        "paired_ratios": paired_ratios(raw),
        "best_tok_per_s": best,
        "best_ratios": ratios(best),
        "max_foreign_load": max(loads) if loads else None,
        "noisy": bool(loads) and max(loads) > NOISY_LOAD,
        "raw": raw,
        "timing": {
            "ours": "extract()'s tokens_per_s: excludes model loading, the corpus pre-count/hash and the manifest",
            "ours_whole_call": "the whole extract() call (pre-count tokenisation, hashing, manifest, rename)",
            "saelens": "Dataset.from_dict(rows) + CacheActivationsRunner construction + run(); model load patched out",
            "foreign_load": "share of all CPUs used by other processes during the measurement (/proc/stat)",
        },
        "peak_rss": {
            "tokens": rss_tokens,
            "shard_tokens": RSS_SHARD_TOKENS,
            "extraction_kib": [r["extract"] for r in rss],
            "extraction_ratio": round(rss[1]["extract"] / rss[0]["extract"], 4),
            "process_kib": [max(r.values()) for r in rss],
            "process_ratio": round(max(rss[1].values()) / max(rss[0].values()), 4),
            "model_load_kib": [r["load"] for r in rss],
            "what": "fresh `python -m stages.extract` per size; extraction_kib is the RSS high-water mark "
            "after model loading (reset via /proc/self/clear_refs), process_kib the whole process's peak",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")

    print(f"{stored_tokens:,} tokens x {args.rounds} rounds, {result['torch_threads']} torch threads")
    print(f"{'':16}{'median tok/s':>13}{'best':>8}  rounds")
    for name in medians:
        values = raw[name]["tok_per_s"] if name in raw else raw["ours"]["whole_call_tok_per_s"]
        print(f"{name:16}{medians[name]:>13,.0f}{best[name]:>8,.0f}  " + " ".join(f"{v:,.0f}" for v in values))
    print(f"{'':18}{'of medians':>11}{'best':>8}{'paired':>8}")
    for name, value in median_ratios.items():
        best_r, paired_r = result["best_ratios"][name], result["paired_ratios"][name]
        print(f"{name:18}{value:>11.3f}{best_r:>8.3f}{paired_r:>8.3f}  (target >= {TARGETS[name]})")
    if result["noisy"]:
        print(f"warning: other processes used up to {max(loads):.0%} of the CPU during the rounds; rerun when idle")
    mib = [r["extract"] / 1024 for r in rss]
    print(
        f"peak RSS during extraction: {mib[0]:,.0f} MiB at {rss_tokens[0]:,} tok, {mib[1]:,.0f} MiB at "
        f"{rss_tokens[1]:,} tok (ratio {mib[1] / mib[0]:.3f}); model loading peaks at {rss[0]['load'] / 1024:,.0f} MiB"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
