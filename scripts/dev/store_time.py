"""Where a layer's store step goes (OffloadedLayer.build with index_now=False: the checks, the copies of the lists, the
rows into huge-page memory), for one 8B layer at 128K by default: random bf16 rows and random valid lists of the
prefill's shapes. Each variant hands the build fewer inputs; min of --repeats. One JSON line.
    PYTHONPATH=python python3 scripts/dev/store_time.py [--tokens 131072 --kv-heads 8 --q-heads 32]
"""
import argparse
import json
import time

import torch

from retrieval_attention import _C


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--train", type=int, default=2048, help="training queries per query head")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    n, hkv, hq, d, m = a.tokens, a.kv_heads, a.q_heads, a.d, a.train
    g = torch.Generator().manual_seed(0)
    K = torch.randn(hkv, n, d, generator=g).bfloat16()
    V = torch.randn(hkv, n, d, generator=g).bfloat16()
    Q = torch.randn(hq, m, d, generator=g)
    knn = torch.randint(0, n, (hq, m, 100), generator=g)
    key_knn = torch.randint(0, n, (hkv, n, 16), generator=g)
    # per_kv_head: one graph per kv head; rows without repeats or self-loops
    proj = ((torch.arange(n).view(1, n, 1) + 1 + 7 * torch.arange(32).view(1, 1, 32)) % n).expand(hkv, n, 32)
    proj = proj.to(torch.int32).contiguous()
    variants = {"rows": {}, "rows+knn": {"knn": knn}, "rows+knn+key_lists": {"knn": knn, "key_knn": key_knn},
                "rows+knn+projection": {"knn": knn, "projection": proj},
                "all": {"knn": knn, "key_knn": key_knn, "projection": proj}}
    res = {"bench": "store_time", "tokens": n, "kv_heads": hkv, "q_heads": hq, "threads": torch.get_num_threads()}
    for name, kw in variants.items():
        best = float("inf")
        for _ in range(a.repeats):
            layer = _C.OffloadedLayer(torch.bfloat16, hq, hkv, d, d, "query_guided", {}, 4096, "per_kv_head")
            t = time.perf_counter()
            layer.build(K, V, Q, index_now=False, **kw)
            best = min(best, time.perf_counter() - t)
            del layer
        res[f"{name}_s"] = round(best, 4)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
