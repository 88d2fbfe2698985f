"""HuggingFace integration: the "retrieval_attention" attention function and `enable(model, cfg)`."""
from __future__ import annotations

import functools

import torch

from .cache import RetrievalCache
from .compat import cache_kwarg, register_attention, sdpa_attention_forward, set_attn_implementation, warn_if_rope_parameters_ignored
from .config import RetrievalConfig

ATTN_NAME = "retrieval_attention"


def _left_padding(attention_mask, kv_length: int):
    """Per batch row, the number of leading key positions the prompt's last query may not see (left padding),
    read from the 4D mask transformers built; None when nothing is padded. Other padding patterns are rejected."""
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return None
    last_row = attention_mask[:, 0, -1, :kv_length]
    visible = last_row if last_row.dtype == torch.bool else last_row == 0
    if bool(visible.all()):
        return None
    pad = (~visible).int().cumprod(dim=-1).sum(dim=-1)  # length of the invisible prefix
    if not bool((visible.sum(dim=-1) == kv_length - pad).all()):
        raise NotImplementedError("RetrievalCache supports left padding only (pad tokens before the prompt), as generate() uses")
    return pad.to("cpu", torch.int64)


def retrieval_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention function registered as "retrieval_attention" (same signature as transformers' sdpa_attention_forward).

    With a RetrievalCache the layer is reached through the key tensor the cache returned; prefill is exact and builds
    the CPU indexes, decode merges static-set attention with retrieved CPU attention. Without one (e.g. a DynamicCache
    or no cache) this is plain exact SDPA attention.
    """
    ref = getattr(key, "_ra_layer", None)
    layer = ref() if ref is not None else None
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if layer.phase == "prefill_pending":
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        layer.finish_prefill(query, left_padding=_left_padding(attention_mask, key.shape[-2]))
        return out
    return layer.decode_attention(query, scaling), None


register_attention(ATTN_NAME, retrieval_attention_forward)


def enable(model, cfg: RetrievalConfig | None = None):
    """Switch a loaded model to retrieval attention. Returns the model.

    Afterwards `model.generate(...)` without `past_key_values` creates a fresh RetrievalCache with `cfg` for each call,
    so everything that calls `generate` uses retrieval attention too, e.g.
    `transformers.pipeline("text-generation", model=model, tokenizer=tok)`. After each call that used a
    RetrievalCache (made here or passed in), `model.retrieval_stats` holds that cache's `stats()` (per-layer figures;
    the cache itself is not kept, so its CPU memory is freed)."""
    cfg = cfg or RetrievalConfig()
    if not isinstance(cfg, RetrievalConfig):
        raise TypeError(f"cfg must be a RetrievalConfig, got {type(cfg).__name__}")
    if not hasattr(model, "generate") or not hasattr(model, "config"):
        raise TypeError(f"enable() expects a transformers generative model, got {type(model).__name__}")
    warn_if_rope_parameters_ignored(model.config)
    set_attn_implementation(model, ATTN_NAME)
    model._retrieval_config = cfg
    if not getattr(model, "_retrieval_generate_wrapped", False):
        original = model.generate

        @functools.wraps(original)
        def generate(*args, **kwargs):
            cache = kwargs.get("past_key_values")
            if cache is None:
                cache = kwargs.get("cache")
            if cache is None:
                cache = RetrievalCache(model.config, model._retrieval_config)
                kwargs[cache_kwarg(model)] = cache
            out = original(*args, **kwargs)
            if isinstance(cache, RetrievalCache):
                model.retrieval_stats = cache.stats()
            return out

        model.generate = generate
        model._retrieval_generate_wrapped = True
    return model
