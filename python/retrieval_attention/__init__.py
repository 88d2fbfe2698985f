"""retrieval_attention: RetrievalAttention (Liu et al., 2024) for HuggingFace decoder models.

The KV cache beyond a small static set (first n_sink + last n_window tokens, kept on the model's device) lives in
CPU memory, searched per query head by a vector index; the two partial attentions are merged exactly by log-sum-exp.
"""
from ._version import __version__
from . import _ext  # noqa: F401  (loads the C++ extension and registers the torch ops)
from .ops import sparse_attention, dense_attention, merge_attention
from .index import FlatIndex, QueryGuidedIndex, load_index, rope_shift
from .compat import rope_inv_freq
from .config import RetrievalConfig
from .cache import RetrievalCache, RetrievalLayer
from .hf import enable, retrieval_attention_forward
from .plotting import plot_stats

__all__ = [
    "__version__",
    "sparse_attention",
    "dense_attention",
    "merge_attention",
    "FlatIndex",
    "QueryGuidedIndex",
    "load_index",
    "rope_shift",
    "rope_inv_freq",
    "RetrievalConfig",
    "RetrievalCache",
    "RetrievalLayer",
    "enable",
    "retrieval_attention_forward",
    "plot_stats",
]
