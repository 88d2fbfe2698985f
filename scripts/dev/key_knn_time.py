"""Where exact_key_knn's time goes on a GPU: one 8B layer's keys (8 kv heads x --tokens x 128, bf16). Times the whole
call (float16 candidate scores, float32 re-ranking) and, over the same key blocks, the score matmul alone and the
matmul plus the chunk maxima, in float32 (TF32), bf16 and float16, and float16 with the chunk maxima in two steps
as exact_key_knn takes them (median of --repeats each); and exact_key_knn with its candidates from the chunk-top
kernel against the torch ops (alternated, with the share of equal list entries; the kernels are chunk_top_candidates and rerank_l2), and the
matmul plus the chunk-top kernel alone. One JSON line.
    bash scripts/gpu_run.sh keyknn   (or PYTHONPATH=python python3 scripts/dev/key_knn_time.py)
"""
import argparse
import json
import statistics
import time

import torch

import retrieval_attention.index as index
from retrieval_attention.index import exact_key_knn


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=130432)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    keys = torch.randn((a.kv_heads, a.tokens, 128), device="cuda", generator=g).bfloat16()
    G, n, d = keys.shape
    n_pad, chunk = -(-n // 128) * 128, 128
    left = torch.randn((G, n, 136), device="cuda", generator=g)
    right = torch.randn((G, 136, n_pad), device="cuda", generator=g)
    block = max(1, min(n, (1 << 30) // (G * n_pad * 4)))  # float32 scores: the block rows of the TF32 variants
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False  # as exact_key_knn runs it
    halves = {torch.bfloat16: (left.bfloat16(), right.bfloat16()), torch.float16: (left.half(), right.half())}

    def mm_only(amax=False, dtype=torch.float32, step=1):
        lft, rgt = halves.get(dtype, (left, right))
        rows = block * 4 // lft.element_size()  # the same score bytes per block
        for s in range(0, n, rows):
            sc = torch.bmm(lft[:, s : s + rows], rgt)
            if amax:  # step 4: a max over strided groups of 4 columns, then over the 4 (as exact_key_knn on a GPU)
                sc.view(-1, chunk // step, step).amax(1).amax(-1)

    def key_lists(kernel):  # kernel=False: the torch ops the package falls back to without its CUDA kernels
        had = index._ext.HAS_CUDA_KERNELS
        index._ext.HAS_CUDA_KERNELS = had and kernel
        try:
            return exact_key_knn(keys, 16)
        finally:
            index._ext.HAS_CUDA_KERNELS = had

    kern, ref = key_lists(True), key_lists(False)
    same = float((kern == ref).double().mean())
    t_kern, t_torch = [], []
    for _ in range(a.repeats):  # alternated: the host's noise falls on both
        t_kern.append(timed(lambda: key_lists(True), 1))
        t_torch.append(timed(lambda: key_lists(False), 1))
    res = {"bench": "key_knn_time", "tokens": n, "kv_heads": G, "block_rows_fp32": block,
           "exact_key_knn_s": statistics.median(t_kern), "exact_key_knn_torch_topk_s": statistics.median(t_torch),
           "times": {"kernel": t_kern, "torch_topk": t_torch}, "same_entries": round(same, 5)}

    def mm_kernel():
        lft, rgt = halves[torch.float16]
        rows = block * 2
        for s in range(0, n, rows):
            sc = torch.bmm(lft[:, s : s + rows], rgt)
            torch.ops.retrieval_attention.chunk_top_candidates(sc.view(-1, n_pad), chunk, 32, 64)

    res["matmul_fp16_plus_chunk_top_kernel_s"] = timed(mm_kernel, a.repeats)
    for name, dt in (("", torch.float32), ("_bf16", torch.bfloat16), ("_fp16", torch.float16)):
        res[f"matmul{name}_s"] = timed(lambda: mm_only(dtype=dt), a.repeats)
        res[f"matmul{name}_plus_chunk_max_s"] = timed(lambda: mm_only(True, dt), a.repeats)
    res["matmul_fp16_plus_chunk_max_2step_s"] = timed(lambda: mm_only(True, torch.float16, 4), a.repeats)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
