"""Time OffloadedLayer.build(index_now=False), i.e. the C++ stores' copy of a prompt's CPU rows (the finite check and
the copy into fresh huge-page memory), without a GPU. Median of --repeats, one JSON line.

    python scripts/dev/store_copy_time.py [--tokens 65536] [--kv-heads 8] [--threads N]
"""
import argparse
import json
import statistics
import time

import torch

import retrieval_attention as ra


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    shape = (a.kv_heads, a.tokens, a.head_dim)
    k = torch.randn(shape, generator=g).bfloat16()
    v = torch.randn(shape, generator=g).bfloat16()
    train = torch.randn((a.kv_heads * 4, 16, a.head_dim), generator=g)
    times = []
    for _ in range(a.repeats):
        layer = ra._ext._C.OffloadedLayer(torch.bfloat16, a.kv_heads * 4, a.kv_heads, a.head_dim, a.head_dim, "flat", {}, 4096, "per_kv_head")
        t = time.perf_counter()
        layer.build(k, v, train, None, index_now=False)
        times.append(time.perf_counter() - t)
        del layer
    print(json.dumps({"bench": "store_copy", "tokens": a.tokens, "kv_heads": a.kv_heads, "mb": round(2 * k.numel() * 2 / 2**20, 1),
                      "threads": torch.get_num_threads(), "store_s": round(statistics.median(times), 4),
                      "times": [round(x, 4) for x in times]}))


if __name__ == "__main__":
    main()
