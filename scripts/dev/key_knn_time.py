"""Where exact_key_knn's time goes on a GPU: one 8B layer's keys (8 kv heads x --tokens x 128, bf16, every
--column-stride-th key a column as the builds take them). Times exact_key_knn through its three paths, alternated
(median of --repeats each): the fused score + top-m kernel (score_top_candidates, the default on sm_80+), the float16
score matrix with the chunk-top kernel (chunk_top_candidates), and torch ops (the fallback without the package's
kernels); the share of list entries equal to the chunk-top path's, and how many of the fused path's list distances
equal the chunk-top path's rank by rank. One JSON line.
    bash scripts/gpu_run.sh keyknn   (or PYTHONPATH=python python3 scripts/dev/key_knn_time.py)
"""
import argparse
import json
import statistics
import time

import torch

import retrieval_attention.index as index
from retrieval_attention.index import KEY_LIST_COLUMN_STRIDE, exact_key_knn


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, round(time.perf_counter() - t, 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=130432)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--column-stride", type=int, default=KEY_LIST_COLUMN_STRIDE)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paths", default="fused,chunk_top,torch")
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    # keys with a common offset and a drift along positions, as LLM keys have
    n = a.tokens
    drift = torch.linspace(0, 1, n, device="cuda").view(1, n, 1) * torch.randn((a.kv_heads, 1, 128), device="cuda", generator=g)
    keys = (torch.randn((a.kv_heads, n, 128), device="cuda", generator=g) + 3 * drift + 2).bfloat16()
    fused_fits = index._fused_key_knn_fits

    def key_lists(path):
        had = index._ext.HAS_CUDA_KERNELS
        index._ext.HAS_CUDA_KERNELS = had and path != "torch"
        index._fused_key_knn_fits = fused_fits if path == "fused" else (lambda *_: False)
        try:
            return exact_key_knn(keys, 16, column_stride=a.column_stride)
        finally:
            index._ext.HAS_CUDA_KERNELS = had
            index._fused_key_knn_fits = fused_fits

    paths = a.paths.split(",")
    lists = {p: key_lists(p) for p in paths}  # first calls: compile and warm up
    times = {p: [] for p in paths}
    for _ in range(a.repeats):  # alternated: the host's noise falls on every path
        for p in paths:
            times[p].append(timed(lambda: key_lists(p))[1])
    res = {"bench": "key_knn_time", "tokens": n, "kv_heads": a.kv_heads, "column_stride": a.column_stride,
           **{f"{p}_s": statistics.median(times[p]) for p in paths}, "times": times}
    if "chunk_top" in lists:
        ref = lists["chunk_top"]
        for p in paths:
            res[f"{p}_same_entries_as_chunk_top"] = round(float((lists[p] == ref).double().mean()), 5)
        if "fused" in lists:  # distances rank by rank, on a sample of rows (float32)
            rows = torch.randperm(n, device="cuda", generator=g)[:4096]
            kf = keys.float()
            dist = {p: torch.linalg.vector_norm(kf.gather(1, lists[p][:, rows].reshape(a.kv_heads, -1, 1).expand(-1, -1, 128))
                                                .view(a.kv_heads, rows.numel(), -1, 128) - kf[:, rows, None, :], dim=-1)
                    for p in ("fused", "chunk_top")}
            res["fused_distance_le_chunk_top"] = round(float((dist["fused"] <= dist["chunk_top"] * (1 + 1e-6)).double().mean()), 5)
            res["fused_distance_equal_chunk_top"] = round(float(torch.isclose(dist["fused"], dist["chunk_top"], rtol=1e-6).double().mean()), 5)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
