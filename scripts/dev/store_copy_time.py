"""Time OffloadedLayer.build(index_now=False), i.e. the C++ store step of a prompt's CPU part, without a GPU: the
finite check and the copy of the rows into fresh huge-page memory; with --lists also the checks and copies of the
lists a GPU prefill hands over (each training query's neighbours, each key's nearest keys, the projection lists; random
valid ids of the prefill's shapes), one variant per added input. Median (rows only) or min (--lists) of --repeats,
one JSON line.

    python scripts/dev/store_copy_time.py [--tokens 65536] [--kv-heads 8] [--threads N]
    python scripts/dev/store_copy_time.py --lists --tokens 131072      # one 8B layer at 128K (gpu_run.sh storetime)
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
    ap.add_argument("--lists", action="store_true", help="also time the prefill's lists (query_guided layer, per_kv_head)")
    ap.add_argument("--train", type=int, default=2048, help="with --lists: training queries per query head")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    n, hkv, hq, d = a.tokens, a.kv_heads, 4 * a.kv_heads, a.head_dim
    k = torch.randn((hkv, n, d), generator=g).bfloat16()
    v = torch.randn((hkv, n, d), generator=g).bfloat16()

    def timed(index, train, repeats, **lists):
        times = []
        for _ in range(repeats):
            layer = ra._ext._C.OffloadedLayer(torch.bfloat16, hq, hkv, d, d, index, {}, 4096, "per_kv_head")
            t = time.perf_counter()
            layer.build(k, v, train, index_now=False, **lists)
            times.append(time.perf_counter() - t)
            del layer
        return times

    res = {"bench": "store_copy", "tokens": n, "kv_heads": hkv, "mb": round(2 * k.numel() * 2 / 2**20, 1),
           "threads": torch.get_num_threads()}
    if not a.lists:
        times = timed("flat", torch.randn((hq, 16, d), generator=g), a.repeats)
        res.update(store_s=round(statistics.median(times), 4), times=[round(x, 4) for x in times])
    else:
        train = torch.randn((hq, a.train, d), generator=g)
        knn = torch.randint(0, n, (hq, a.train, 100), generator=g)
        key_knn = torch.randint(0, n, (hkv, n, 16), generator=g)
        # one graph per kv head; rows without repeats or self-loops
        proj = (torch.arange(n).view(1, n, 1) + 1 + 7 * torch.arange(32).view(1, 1, 32)) % n
        proj = proj.expand(hkv, n, 32).to(torch.int32).contiguous()
        variants = {"rows": {}, "rows+knn": {"knn": knn}, "rows+knn+key_lists": {"knn": knn, "key_knn": key_knn},
                    "rows+knn+projection": {"knn": knn, "projection": proj},
                    "all": {"knn": knn, "key_knn": key_knn, "projection": proj}}
        for name, lists in variants.items():
            res[f"{name}_s"] = round(min(timed("query_guided", train, a.repeats, **lists)), 4)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
