"""A/B of the GPU neighbour lists of one 8B layer (bf16 keys: 8 kv heads x --tokens x 128; 32 query heads x
--queries training queries): the torch path (score matrix in memory) against the fused chunk top-2 kernel
(_knn_triton), each timed as the median of --repeats, alternated. Also: the kernel alone, and how far the fused lists
are from the torch ones (set overlap; rank-by-rank distance or score equality). Keys drift slowly along positions
(neighbouring tokens alike) on top of anisotropic noise and a common offset. One JSON line.
    PYTHONPATH=python python3 scripts/dev/fused_knn_time.py
"""
import argparse
import json
import statistics
import time

import torch

import retrieval_attention.index as I
from retrieval_attention import _knn_triton


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def overlap(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    hits = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum().item()
    return hits / a.numel()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=130432)
    ap.add_argument("--queries", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    G, H, n, d = 8, 32, a.tokens, 128
    noise = torch.randn((G, n, d), device="cuda", generator=g) * torch.linspace(0.2, 3, d, device="cuda")
    drift = torch.cumsum(torch.randn((G, n, d), device="cuda", generator=g) * 0.05, 1)
    keys = (noise + drift + 4 * torch.randn((G, 1, d), device="cuda", generator=g)).bfloat16()
    queries = torch.randn((H, a.queries, d), device="cuda", generator=g) * 2 + keys[:, :1].float().repeat_interleave(H // G, 0)
    res = {"bench": "fused_knn_time", "tokens": n, "kv_heads": G, "q_heads": H, "train_queries": a.queries}
    fused_on = I._use_fused
    times = {k: [] for k in ("key_torch", "key_fused", "knn_torch", "knn_fused")}
    lists = {}
    for r in range(a.repeats):
        for name, use in (("torch", lambda *x: False), ("fused", fused_on)):
            I._use_fused = use
            lists["key_" + name], t = timed(lambda: I.exact_key_knn(keys, 16))
            times["key_" + name].append(t)
            lists["knn_" + name], t = timed(lambda: I.exact_knn(keys, queries, 100))
            times["knn_" + name].append(t)
    I._use_fused = fused_on
    for k, v in times.items():
        res[k + "_s"] = round(statistics.median(v), 4)
    # the kernel alone over one block of rows, scaled to all rows
    x = torch.zeros((G, 4096, 128), dtype=torch.float16, device="cuda")
    perm, c = _knn_triton.column_order(n, "cuda")
    right = torch.randn((G, c, 128), device="cuda", generator=g).half()
    bias = torch.zeros((G, c), device="cuda")
    _knn_triton.chunk_top2(x, right, bias)
    kt = [timed(lambda: _knn_triton.chunk_top2(x, right, bias))[1] for _ in range(3)]
    res["kernel_all_key_rows_s"] = round(statistics.median(kt) * n / 4096, 4)
    res["kernel_tflops"] = round(2 * G * 4096 * c * 128 / statistics.median(kt) / 1e12, 1)
    res["key_lists_set_overlap"] = round(overlap(lists["key_fused"][:, :20000], lists["key_torch"][:, :20000]), 5)
    kf = keys.float()
    dt = lambda L: torch.linalg.vector_norm(kf.gather(1, L[:, :2000].reshape(G, -1, 1).expand(-1, -1, d)).view(G, 2000, -1, d) - kf[:, :2000].unsqueeze(2), dim=-1)
    res["key_lists_rank_distance_equal"] = round(torch.isclose(dt(lists["key_fused"]), dt(lists["key_torch"]), rtol=1e-6, atol=0).double().mean().item(), 5)
    res["knn_set_overlap"] = round(overlap(lists["knn_fused"][:, :500], lists["knn_torch"][:, :500]), 5)
    kr = kf.repeat_interleave(H // G, 0)
    sc = lambda L: torch.einsum("hmd,hmkd->hmk", queries[:, :500].float(), kr.gather(1, L[:, :500].reshape(H, -1, 1).expand(-1, -1, d)).view(H, 500, -1, d))
    s_f, s_t = sc(lists["knn_fused"]), sc(lists["knn_torch"])
    res["knn_fused_score_sum_minus_torch"] = round((s_f.sum() - s_t.sum()).item() / s_t.abs().sum().item(), 7)
    res["knn_rank_score_equal"] = round(torch.isclose(s_f, s_t, rtol=1e-6, atol=0).double().mean().item(), 5)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
