"""The attention operators (also reachable as torch.ops.retrieval_attention.*).

Shapes (GQA: query head h uses kv head h // (Hq // Hkv)):
    q (Hq, m, d); keys (Hkv, n, d); values (Hkv, n, dv); ids (Hq, m, k) int64 with -1 as padding.
    -> out (Hq, m, dv) float32, lse (Hq, m) float32 (natural log of sum_j exp(scale * q.k_j)).
"""
from __future__ import annotations

import torch

from . import _ext
from ._checks import check_float, check_rank

_ops = torch.ops.retrieval_attention


def _attention_args(q, keys, values):
    for t, name in ((q, "q"), (keys, "keys"), (values, "values")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_rank(q, 3, "q", "(q_heads, queries, head_dim)")
    check_rank(keys, 3, "keys", "(kv_heads, n_keys, head_dim)")
    check_rank(values, 3, "values", "(kv_heads, n_keys, value_dim)")
    check_float(q, "q")
    check_float(keys, "keys")
    check_float(values, "values")
    # Checked here as well as in C++ so bad input never reaches a kernel (see the closing note of issue 2).
    if values.dtype != keys.dtype:
        raise TypeError(f"values dtype {values.dtype} differs from keys dtype {keys.dtype}")
    hq, _, d = q.shape
    hkv, n, _ = keys.shape
    if keys.shape[2] != d:
        raise ValueError(f"keys head_dim {keys.shape[2]} != q head_dim {d}")
    if values.shape[0] != hkv or values.shape[1] != n:
        raise ValueError(f"values shape {tuple(values.shape)} does not match keys {tuple(keys.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q_heads ({hq}) must be a positive multiple of kv_heads ({hkv})")
    if d == 0 or values.shape[2] == 0:
        raise ValueError("head dims must be positive")
    if not (q.device == keys.device == values.device):
        raise ValueError(f"q, keys and values must be on one device, got {q.device}, {keys.device}, {values.device}")


def sparse_attention(q, keys, values, ids, scale: float):
    """Exact attention of each query over the keys named by `ids` only (-1 entries are skipped)."""
    _attention_args(q, keys, values)
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    check_rank(ids, 3, "ids", "(q_heads, queries, k)")
    if ids.dtype != torch.int64:
        raise TypeError(f"ids must be int64, got {ids.dtype}")
    if ids.shape[0] != q.shape[0] or ids.shape[1] != q.shape[1]:
        raise ValueError(f"ids shape {tuple(ids.shape)} does not match q {tuple(q.shape)}")
    if ids.device != q.device:
        raise ValueError(f"ids must be on {q.device}, got {ids.device}")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= keys.shape[1]:
            bad = lo if lo < -1 else hi
            raise ValueError(f"ids: key id {bad} is out of range [0, {keys.shape[1]}) (-1 marks padding)")
    return _ops.sparse_attention(q, keys, values, ids, float(scale))


def dense_attention(q, keys, values, scale: float, causal: bool = False):
    """Exact attention over all keys; with causal=True the m queries are the last m key positions."""
    _attention_args(q, keys, values)
    if causal and q.shape[1] > keys.shape[1]:
        raise ValueError(f"causal attention needs at least as many keys ({keys.shape[1]}) as queries ({q.shape[1]})")
    return _ops.dense_attention(q, keys, values, float(scale), bool(causal))


def merge_attention(out_a, lse_a, out_b, lse_b, out_dtype: torch.dtype | None = None):
    """Exact log-sum-exp merge of two partial attention results over disjoint key sets -> (out, lse), both float32,
    or out in `out_dtype` (float16 / bfloat16: rounded from the float32 result, as `.to(out_dtype)` would)."""
    for t, name in ((out_a, "out_a"), (lse_a, "lse_a"), (out_b, "out_b"), (lse_b, "lse_b")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_float(t, name, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if out_a.dim() < 1 or out_a.shape != out_b.shape:
        raise ValueError(f"out_a {tuple(out_a.shape)} and out_b {tuple(out_b.shape)} must have the same shape (..., value_dim)")
    if lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_a.shape[:-1]:
        raise ValueError(f"lse_a {tuple(lse_a.shape)} and lse_b {tuple(lse_b.shape)} must have shape out.shape[:-1] = {tuple(out_a.shape[:-1])}")
    if len({t.device for t in (out_a, lse_a, out_b, lse_b)}) != 1:
        raise ValueError("merge_attention inputs must be on one device")
    if out_dtype is not None and out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}")
    return _ops.merge_attention(out_a, lse_a, out_b, lse_b, out_dtype)


# Fake (meta) kernels so the ops trace under torch.compile / torch.export.
@torch.library.register_fake("retrieval_attention::sparse_attention")
def _sparse_attention_fake(q, keys, values, ids, scale):
    hq, m, _ = q.shape
    return q.new_empty((hq, m, values.shape[2]), dtype=torch.float32), q.new_empty((hq, m), dtype=torch.float32)


@torch.library.register_fake("retrieval_attention::dense_attention")
def _dense_attention_fake(q, keys, values, scale, causal=False):
    hq, m, _ = q.shape
    return q.new_empty((hq, m, values.shape[2]), dtype=torch.float32), q.new_empty((hq, m), dtype=torch.float32)


@torch.library.register_fake("retrieval_attention::merge_attention")
def _merge_attention_fake(out_a, lse_a, out_b, lse_b, out_dtype=None):
    return out_a.new_empty(out_a.shape, dtype=out_dtype or torch.float32), lse_a.new_empty(lse_a.shape, dtype=torch.float32)


@torch.library.register_fake("retrieval_attention::chunk_top_candidates")
def _chunk_top_candidates_fake(scores, chunk, kc, m):
    return scores.new_empty((scores.shape[0], m), dtype=torch.int64)


@torch.library.register_fake("retrieval_attention::rerank_l2")
def _rerank_l2_fake(keys, row_start, cand, k, check_ids=True):
    return cand.new_empty((cand.shape[0], cand.shape[1], k), dtype=torch.int64)


@torch.library.register_fake("retrieval_attention::projection_prune")
def _projection_prune_fake(keys, per, begin, counts, pivot, near, near_dist, mips, degree, cap, check_ids=True):
    return keys.new_empty((keys.shape[0] * per, keys.shape[1], degree), dtype=torch.int32)


def dense_attention_any_device(q, keys, values, scale: float, causal: bool, key_start=None):
    """dense_attention on the tensors' device: the extension kernel where there is one, else torch math.

    key_start (kv_heads,) int64, optional: keys [0, key_start[h]) of kv head h are masked (left padding); this rare
    case and CUDA builds of torch without the package's CUDA kernels use the torch math below.
    """
    if key_start is None and (q.device.type == "cpu" or _ext.HAS_CUDA_KERNELS):
        return _ops.dense_attention(q, keys, values, float(scale), bool(causal))
    hq, m, _ = q.shape
    group = hq // keys.shape[0]
    k = keys.float().repeat_interleave(group, dim=0)
    v = values.float().repeat_interleave(group, dim=0)
    s = torch.matmul(q.float(), k.transpose(1, 2)) * scale
    n = k.shape[1]
    if causal:
        allowed = torch.arange(n, device=q.device)[None, :] <= (n - m + torch.arange(m, device=q.device))[:, None]
        s = s.masked_fill(~allowed, float("-inf"))
    if key_start is not None:
        start = key_start.to(q.device).repeat_interleave(group)
        s = s.masked_fill(torch.arange(n, device=q.device)[None, None, :] < start[:, None, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.softmax(s, dim=-1), v)
    return out, lse


def merge_attention_any_device(out_a, lse_a, out_b, lse_b):
    if out_a.device.type == "cpu" or _ext.HAS_CUDA_KERNELS:
        return _ops.merge_attention(out_a, lse_a, out_b, lse_b)
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a.float() - lse_safe).nan_to_num(0.0).unsqueeze(-1)
    wb = torch.exp(lse_b.float() - lse_safe).nan_to_num(0.0).unsqueeze(-1)
    return wa * out_a.float() + wb * out_b.float(), lse
