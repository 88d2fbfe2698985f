"""Everything that differs between transformers versions lives here (supported: transformers >= 4.56)."""
from __future__ import annotations

import warnings

import transformers
from packaging.version import Version
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: F401  (re-exported)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: F401
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: F401

TRANSFORMERS_VERSION = Version(transformers.__version__)
MIN_TRANSFORMERS = Version("4.56")
if TRANSFORMERS_VERSION < MIN_TRANSFORMERS:
    raise ImportError(f"retrieval_attention needs transformers >= {MIN_TRANSFORMERS}, found {transformers.__version__}")


def model_attention_shape(config) -> tuple[int, int, int, int]:
    """(layers, query heads, kv heads, head_dim) of a decoder config (Llama, Mistral, Qwen2 and alike)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    try:
        n_layers = config.num_hidden_layers
        q_heads = config.num_attention_heads
    except AttributeError as exc:
        raise TypeError(f"expected a decoder model config with num_hidden_layers/num_attention_heads, got {type(config).__name__}") from exc
    kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    return n_layers, q_heads, kv_heads, head_dim


def cache_kwarg(model) -> str:
    """Name of the cache argument of forward/generate: "cache" in the newest transformers, else "past_key_values"."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def register_attention(name: str, fn) -> None:
    AttentionInterface.register(name, fn)
    # Without a mask function registered under the same name, transformers would pass no causal mask at all.
    AttentionMaskInterface.register(name, sdpa_mask)


def set_attn_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older releases
        model.config._attn_implementation = name


def ignored_rope_parameters(config) -> str | None:
    """A message when this transformers silently ignores the config's RoPE settings, else None.

    transformers >= 5 writes RoPE settings as `rope_parameters` ({"rope_theta": ..., "rope_type": ...}); transformers 4.x
    reads only `rope_theta`/`rope_scaling`, keeps `rope_parameters` as an unused attribute and builds the rotary
    embedding with its default base (10,000), so a model saved by transformers 5 (e.g. the bundled one) generates
    garbage at long context under 4.x, with full attention as well."""
    if TRANSFORMERS_VERSION >= Version("5.0.0.dev0"):
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        return None
    theta = getattr(config, "rope_theta", None)
    try:
        if theta is not None and float(theta) == float(params["rope_theta"]):
            return None
    except (TypeError, ValueError):
        pass
    return (f"this model config was written by transformers >= 5 (rope_parameters={params}); transformers "
            f"{transformers.__version__} ignores that and uses rope_theta={theta}, so the model's RoPE is wrong even with "
            f"full attention. Load it with from_pretrained(..., rope_theta={params['rope_theta']!r}) or add "
            f"\"rope_theta\": {params['rope_theta']!r} to its config.json.")


def warn_if_rope_parameters_ignored(config, stacklevel: int = 3) -> None:
    msg = ignored_rope_parameters(config)
    if msg is not None:
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)


# RoPE types whose inverse frequencies depend on the sequence length: no fixed rotation moves a query by a distance
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
# model types whose attention applies RoPE as transformers' Llama does (rotate_half over the head's first dimensions);
# others (e.g. GPT-J's interleaved pairs) would be rotated in the wrong planes
_ROTATE_HALF_MODELS = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2")


def rope_inv_freq(config):
    """The model's RoPE inverse frequencies as a float64 tensor (rotary_dim / 2,), or None when it has no RoPE of a fixed
    frequency set (none configured, or a type whose frequencies depend on the sequence length: dynamic, longrope) or is
    not a model type known to apply it in transformers' rotate_half layout (Llama, Mistral, Mixtral, Qwen2/3, Gemma).

    Read from the config as this transformers builds the rotary embedding: `rope_parameters` (transformers >= 5) or
    `rope_theta`/`rope_scaling` (4.x), the default formula theta^(-2i/rotary_dim) or transformers' own
    ROPE_INIT_FUNCTIONS for the scaled types (linear, llama3, yarn, ...)."""
    import torch

    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if getattr(config, "model_type", None) not in _ROTATE_HALF_MODELS:
        return None
    if TRANSFORMERS_VERSION >= Version("5.0.0.dev0"):
        params = dict(getattr(config, "rope_parameters", None) or {})
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", None))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        return None
    if rope_type == "default":
        theta = params.get("rope_theta")
        if theta is None:
            return None
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        dim = int(head_dim * partial)
        return 1.0 / float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    init = ROPE_INIT_FUNCTIONS.get(rope_type)
    if init is None:
        return None
    inv_freq, _ = init(config, torch.device("cpu"))
    return inv_freq.to(torch.float64)
