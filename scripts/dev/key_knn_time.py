"""Where exact_key_knn's time goes on a GPU: one 8B layer's keys (8 kv heads x --tokens x 128, bf16). Times the whole
call and, over the same key blocks, the matmul alone and the matmul plus the chunk maxima, in float32 (TF32) and in bf16, (median of --repeats each).
One JSON line. Not run yet.   bash scripts/gpu_run.sh keyknn   (or PYTHONPATH=python python3 scripts/dev/key_knn_time.py)
"""
import argparse
import json
import statistics
import time

import torch

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
    block = max(1, min(n, (1 << 30) // (G * n_pad * 4)))
    torch.backends.cuda.matmul.allow_tf32 = True

    left16, right16 = left.bfloat16(), right.bfloat16()

    def mm_only(amax=False, half=False):
        lft, rgt = (left16, right16) if half else (left, right)
        for s in range(0, n, block):
            sc = torch.bmm(lft[:, s : s + block], rgt)
            if amax:
                sc.view(G, sc.shape[1], n_pad // chunk, chunk).amax(-1)

    full = timed(lambda: exact_key_knn(keys, 16), a.repeats)
    mm = timed(mm_only, a.repeats)
    mm_amax = timed(lambda: mm_only(True), a.repeats)
    mm16 = timed(lambda: mm_only(half=True), a.repeats)
    mm16_amax = timed(lambda: mm_only(True, True), a.repeats)
    print(json.dumps({"bench": "key_knn_time", "tokens": n, "kv_heads": G, "block_rows": block, "blocks": -(-n // block),
                      "exact_key_knn_s": full, "matmul_s": mm, "matmul_plus_chunk_max_s": mm_amax,
                      "matmul_bf16_s": mm16, "matmul_bf16_plus_chunk_max_s": mm16_amax}))


if __name__ == "__main__":
    main()
