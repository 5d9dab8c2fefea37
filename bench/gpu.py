"""Benchmark on a CUDA GPU, when there is one: writes metrics/bench_gpu.json with the device name and
three ratios, each measured side by side in one run with CUDA events (the work, not the launches):

- extraction (our capture of the hooked layer) against the bare forward pass to the same layer: target >= 0.9x;
- the SAE training step against the dense encoder matmuls it cannot avoid (forward and W_enc gradient,
  2 x [batch, d_in] @ [d_in, d_sae]): target <= 1.5x;
- the torch pair selection against the step at d_sae 65536: target <= 5%.

Without a GPU it records that none was present and measures nothing (this project's machines have none).

    python -m bench.gpu [--batch 4096] [--sizes 16384 65536] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import UTC, datetime
from pathlib import Path

import torch

from sae_ortho.base.device import resolve
from sae_ortho.base.io import atomic_write_text
from sae_ortho.base.params import Params, TrainParams
from sae_ortho.base.paths import ACTIVATIONS, CORPUS

OUT = Path("metrics/bench_gpu.json")
TARGETS = {"extraction_over_bare": 0.9, "step_over_encoder_matmuls": 1.5, "selection_over_step_65k": 0.05}


def cuda_seconds(fn, repeats: int, warmup: int = 3) -> float:
    """Median seconds of fn() by CUDA events, synchronised once after all repeats."""
    for _ in range(warmup):
        fn()
    pairs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) / 1000 for a, b in pairs)


def extraction_ratio(device: torch.device, repeats: int, corpus: Path = CORPUS) -> dict:
    from sae_ortho.data.extract import capture_fn, document_tokens
    from sae_ortho.data.lm import load_model

    p = Params()
    model = load_model(p.model, device, torch.float32, p.hook_name)
    docs = zip(range(256), document_tokens(corpus, model.tokenizer), strict=False)
    ids = [t for _, (_, doc) in docs for t in doc]
    if len(ids) < 16 * 127:
        raise ValueError(f"{corpus} holds {len(ids)} tokens in its first 256 documents; the benchmark needs 2,032")
    body = torch.tensor(ids[: 16 * 127]).view(16, 127)
    tokens = torch.cat([torch.full((16, 1), model.tokenizer.bos_token_id), body], 1).to(device)
    run = capture_fn(model, p.hook_name, stop_at_layer=p.layer + 1)
    with torch.inference_mode():
        ours = cuda_seconds(lambda: run(tokens)[:, 1:].half().cpu(), repeats)
        bare = cuda_seconds(lambda: model(tokens, stop_at_layer=p.layer + 1), repeats)
    return {"model": p.model, "tokens": tokens.numel(), "ours_s": ours, "bare_s": bare, "ratio": bare / ours}


def step_ratios(device: torch.device, shards, d_sae: int, batch: int, repeats: int) -> dict:
    from sae_ortho.training.ortho import select_pairs_csr
    from sae_ortho.training.run_config import RunConfig
    from sae_ortho.training.trainer import Trainer

    x = shards.load(0).float()[:batch].to(device)
    t = TrainParams(d_sae=d_sae, k=32, batch_size=batch, train_tokens=batch * 1000)
    trainer = Trainer(RunConfig(train=t, seed=0, tau=0.1), shards, device=device)
    step = cuda_seconds(lambda: trainer.train_step(x), repeats)
    w = trainer.sae.W_enc.detach().clone().requires_grad_(True)

    def encoder_matmuls():
        pre = x @ w
        pre.backward(torch.ones_like(pre))

    matmuls = cuda_seconds(encoder_matmuls, repeats)
    with torch.no_grad():
        codes, _, _ = trainer.encode_decode(x * trainer.sae.cfg.input_scale)
    select = cuda_seconds(
        lambda: select_pairs_csr(codes.offsets, codes.cols, codes.values, d_sae, 0.001, "torch"), repeats
    )
    return {
        "d_sae": d_sae,
        "batch": batch,
        "step_s": step,
        "encoder_matmuls_s": matmuls,
        "selection_torch_s": select,
        "step_over_encoder_matmuls": step / matmuls,
        "selection_over_step": select / step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    out: dict = {"timestamp": datetime.now(UTC).isoformat(timespec="seconds"), "targets": TARGETS}
    if not torch.cuda.is_available():
        out.update(device=None, measured=False, note="no CUDA GPU on this machine: nothing measured")
    else:
        device = resolve("auto")  # the first CUDA GPU
        out.update(device=torch.cuda.get_device_name(device), measured=True, torch=torch.__version__)
        out["extraction"] = extraction_ratio(device, args.repeats)
        from sae_ortho.data.shards import ActivationShards

        shards = ActivationShards(ACTIVATIONS)
        out["training"] = [step_ratios(device, shards, d, args.batch, args.repeats) for d in args.sizes]
        largest = out["training"][-1]
        ratios = {
            "extraction_over_bare": out["extraction"]["ratio"],
            "step_over_encoder_matmuls": max(r["step_over_encoder_matmuls"] for r in out["training"]),
            "selection_over_step_65k": largest["selection_over_step"] if largest["d_sae"] >= 65536 else None,
        }
        out["ratios"] = ratios
        out["meets_targets"] = {
            "extraction_over_bare": ratios["extraction_over_bare"] >= TARGETS["extraction_over_bare"],
            "step_over_encoder_matmuls": ratios["step_over_encoder_matmuls"] <= TARGETS["step_over_encoder_matmuls"],
            "selection_over_step_65k": None
            if ratios["selection_over_step_65k"] is None
            else ratios["selection_over_step_65k"] <= TARGETS["selection_over_step_65k"],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("extraction", "training")}))


if __name__ == "__main__":
    main()
