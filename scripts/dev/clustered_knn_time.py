"""The graph builds' GPU key-to-key lists at 8B shapes: clustered_key_knn against exact_key_knn among every other key
(the two KEY_LISTS settings), alternated on one layer's keys (8 kv heads x --tokens x 128, bf16), median of --repeats
each, with the share of the exact lists (among every key) that each finds. Two key sets: `structured` (clusters plus
a drift along positions plus noise, as real keys have) and `gaussian` (no structure: the worst case for clustering).
One JSON line per key set.
    bash scripts/gpu_run.sh clusknn   (or PYTHONPATH=python python3 scripts/dev/clustered_knn_time.py)
"""
import argparse
import json
import statistics
import time

import torch

from retrieval_attention.index import clustered_key_knn, exact_key_knn


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def found(lists: torch.Tensor, exact: torch.Tensor) -> float:
    hits = 0
    for g in range(lists.shape[0]):  # per head: the comparison's (n, k, k) mask stays small
        hits += int((lists[g].unsqueeze(-1) == exact[g].unsqueeze(1)).any(1).sum())
    return round(hits / exact.numel(), 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=130432)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    G, n, d = a.kv_heads, a.tokens, 128
    centers = 2.0 * torch.randn((G, 512, d), device="cuda", generator=g)
    which = torch.randint(0, 512, (G, n), device="cuda", generator=g)
    drift = torch.cumsum(0.02 * torch.randn((G, n, d), device="cuda", generator=g), dim=1)
    sets = {"structured": centers.gather(1, which.unsqueeze(-1).expand(-1, -1, d)) + drift + torch.randn((G, n, d), device="cuda", generator=g),
            "gaussian": torch.randn((G, n, d), device="cuda", generator=g)}
    for name, keys in sets.items():
        keys = keys.bfloat16()
        exact_all = exact_key_knn(keys, 16)
        t_ex, t_cl = [], []
        for _ in range(a.repeats):  # alternated: the host's noise falls on both
            ex, t = timed(lambda: exact_key_knn(keys, 16, column_stride=2))
            t_ex.append(round(t, 4))
            cl, t = timed(lambda: clustered_key_knn(keys, 16))
            t_cl.append(round(t, 4))
        again = clustered_key_knn(keys, 16)
        res = {"bench": "clustered_knn_time", "keys": name, "tokens": n, "kv_heads": G,
               "exact_stride2_s": statistics.median(t_ex), "clustered_s": statistics.median(t_cl),
               "times": {"exact_stride2": t_ex, "clustered": t_cl},
               "found_of_exact": {"exact_stride2": found(ex, exact_all), "clustered": found(cl, exact_all)},
               "clustered_deterministic": bool(torch.equal(cl, again))}
        for probes, iters in ((8, 4), (16, 2), (32, 4)):
            lists, t = timed(lambda: clustered_key_knn(keys, 16, probes=probes, iters=iters))
            res[f"clustered_p{probes}_i{iters}"] = {"s": round(t, 4), "found_of_exact": found(lists, exact_all)}
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
