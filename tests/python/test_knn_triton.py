"""The fused chunk top-2 kernel behind the GPU neighbour lists of the graph builds (retrieval_attention/_knn_triton.py,
used by index.exact_knn / exact_key_knn on CUDA keys from 16K keys up). On the CPU it runs under Triton's interpreter
(TRITON_INTERPRET=1, read when the kernel is defined, hence a child process); on a GPU compiled, in the gpu test."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

CHILD = r"""
import json, os, torch
from retrieval_attention import _knn_triton, index as I

res = {}
# 1. the kernel against the same scores in float32 torch: rows not a multiple of the row tile, a self column per row,
#    a padding column (-inf bias), and columns 3 and 7 (both in chunk 0) with equal scores far above the rest
dev = os.environ.get("RA_TEST_FUSED_DEVICE", "cpu")
g = torch.Generator().manual_seed(0)
r, c, D = 150, 256, 16
left = torch.randn(2, r, D, generator=g).half()
right = torch.randn(2, c, D, generator=g).half()
right[:, 7] = right[:, 3]
bias = torch.randn(2, c, generator=g)
bias[:, 3] = bias[:, 7] = 1000.0
bias[:, -1] = float("-inf")
own = torch.randint(0, c, (2, r), generator=g, dtype=torch.int32)
vals, cols = (t.cpu() for t in _knn_triton.chunk_top2(left.to(dev), right.to(dev), bias.to(dev), own.to(dev)))
s = left.float() @ right.float().transpose(1, 2) + bias[:, None, :]
s.scatter_(2, own.long().unsqueeze(-1), float("-inf"))
top = s.view(2, r, c // 32, 32).topk(2, dim=-1)
ref_vals = torch.cat([top.values[..., 0], top.values[..., 1]], dim=-1)
ref_cols = torch.cat([top.indices[..., 0], top.indices[..., 1]], dim=-1) + (torch.arange(c // 32) * 32).repeat(2)
res["kernel_vals_close"] = bool(torch.allclose(vals, ref_vals, rtol=1e-5, atol=1e-5))
top3 = s.view(2, r, c // 32, 32).sort(-1, descending=True).values[..., :3]
clear = ((top3[..., 0] - top3[..., 1]).abs() > 1e-3) & ((top3[..., 1] - top3[..., 2]).abs() > 1e-3)
res["kernel_cols_equal_where_no_tie"] = bool(((cols.long() == ref_cols) | ~clear.repeat(1, 1, 2)).all())
free = (own != 3) & (own != 7)
res["kernel_tie_smaller_column_first"] = bool((cols[..., 0][free] == 3).all() and (cols[..., c // 32][free] == 7).all())
res["kernel_self_and_padding_never_kept"] = bool(not (cols.long() == own.long().unsqueeze(-1)).any() and not (cols == c - 1).any())

# 2. whole lists: keys drifting along positions (neighbouring tokens alike), anisotropic, with an offset
g = torch.Generator().manual_seed(1)
n, d = 4096, 32
keys = (torch.randn(2, n, d, generator=g) * torch.linspace(0.2, 3, d) + torch.cumsum(torch.randn(2, n, d, generator=g) * 0.05, 1) + 5).bfloat16()
kf = keys.float()
got, want = I._fused_key_knn(keys.to(dev), 16, 1 << 22).cpu(), I.exact_key_knn(keys, 16)  # small blocks: several launches
res["key_shape"] = list(got.shape)
res["key_valid"] = bool(((got >= 0) & (got < n)).all() and not (got == torch.arange(n)[None, :, None]).any())
srt = got.sort(-1).values
res["key_no_repeats"] = not bool((srt[..., 1:] == srt[..., :-1]).any())
dist = lambda L: torch.linalg.vector_norm(kf.gather(1, L.reshape(2, -1, 1).expand(-1, -1, d)).view(2, n, -1, d) - kf.unsqueeze(2), dim=-1)
dg, dw = dist(got), dist(want)
res["key_nearest_first"] = bool((dg[..., 1:] >= dg[..., :-1] * (1 - 1e-6)).all())
res["key_rank_distance_equal"] = torch.isclose(dg, dw, rtol=1e-6, atol=0).double().mean().item()
res["key_overlap"] = (got.unsqueeze(-1) == want.unsqueeze(-2)).any(-1).double().mean().item()

q = torch.randn(4, 200, d, generator=g) * 2 + kf[:, :1].repeat_interleave(2, 0)
got, want = I._fused_knn(keys.to(dev), q.to(dev), 16, 1 << 22).cpu(), I.exact_knn(keys, q, 16)
res["knn_shape"] = list(got.shape)
kr = kf.repeat_interleave(2, 0)
score = lambda L: torch.einsum("hmd,hmkd->hmk", q, kr.gather(1, L.reshape(4, -1, 1).expand(-1, -1, d)).view(4, 200, -1, d))
sg, sw = score(got), score(want)
res["knn_best_first"] = bool((sg[..., 1:] <= sg[..., :-1] + 1e-5 * sg.abs().amax()).all())  # up to float32 sum order
res["knn_rank_score_equal"] = torch.isclose(sg, sw, rtol=1e-6, atol=0).double().mean().item()
res["knn_overlap"] = (got.unsqueeze(-1) == want.unsqueeze(-2)).any(-1).double().mean().item()
print(json.dumps(res))
"""


def _run_child(env_extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), **env_extra)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(res):
    assert res["kernel_vals_close"] and res["kernel_cols_equal_where_no_tie"], res
    assert res["kernel_tie_smaller_column_first"] and res["kernel_self_and_padding_never_kept"], res
    assert res["key_shape"] == [2, 4096, 16] and res["knn_shape"] == [4, 200, 16], res
    assert res["key_valid"] and res["key_no_repeats"] and res["key_nearest_first"] and res["knn_best_first"], res
    # 128 chunks of 32 keys: a neighbour is lost where three of a key's 32 candidates share one (measured 99.9%
    # overlap here; at 128K keys' 4,096 chunks such triples are ~1,000x rarer)
    assert res["key_overlap"] >= 0.995 and res["key_rank_distance_equal"] >= 0.98, res
    assert res["knn_overlap"] >= 0.99 and res["knn_rank_score_equal"] >= 0.95, res


def test_fused_lists_in_the_triton_interpreter():
    """The kernel's chunk top-2 equal float32 torch's (ties to the smaller column; self and padding never kept); the
    lists built on it are valid, ordered, and keep >= 99.5% of the exact lists' entries at 4,096 keys."""
    pytest.importorskip("triton", reason="requirements-dev.txt installs triton: the test must run in CI")
    res = _run_child({"TRITON_INTERPRET": "1"})
    print(res)
    _check(res)


@pytest.mark.gpu
def test_fused_lists_compiled_on_cuda():
    """The same checks with the kernel compiled for the GPU: the child moves every tensor to CUDA."""
    _check(_run_child({"RA_TEST_FUSED_DEVICE": "cuda"}))
