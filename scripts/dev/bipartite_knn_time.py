"""GPU time of the training queries' neighbour lists (exact_knn) for one 8B layer at 128K: 8 kv heads x --tokens keys
x 128 (bf16), 32 query heads x --train queries, k 100; the top-k over each row's best column chunks (as the builds
use it) against the top-k over all columns (chunk larger than n: the old path), alternated; and whether both give
lists of the same scores. One JSON line.
    PYTHONPATH=python python3 scripts/dev/bipartite_knn_time.py
"""
import argparse
import json
import statistics
import time

import torch

from retrieval_attention.index import exact_knn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=130432)
    ap.add_argument("--train", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    keys = (torch.randn((8, a.tokens, 128), device="cuda", generator=g) + 2 * torch.randn((8, 1, 128), device="cuda", generator=g)).bfloat16()
    queries = torch.randn((32, a.train, 128), device="cuda", generator=g) + 3 * torch.randn((32, 1, 128), device="cuda", generator=g)
    times = {"chunked": [], "all_columns": []}
    out = {}
    for _ in range(a.repeats):
        for name, chunk in (("chunked", 128), ("all_columns", 1 << 40)):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out[name] = exact_knn(keys, queries, 100, chunk=chunk)
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    # the scores of both lists, rank by rank, from one reference product per group
    same = 0.0
    for h in range(0, 32, 4):
        s = (queries[h].bfloat16() @ keys[h // 4].T).float()
        same += torch.isclose(s.gather(1, out["chunked"][h]), s.gather(1, out["all_columns"][h]), rtol=0, atol=0).double().mean().item() / 8
    print(json.dumps({"bench": "bipartite_knn_time", "tokens": a.tokens, "train_per_head": a.train,
                      "chunked_s": round(statistics.median(times["chunked"]), 4),
                      "all_columns_s": round(statistics.median(times["all_columns"]), 4),
                      "times": {k: [round(x, 4) for x in v] for k, v in times.items()},
                      "same_scores_rank_by_rank": round(same, 5)}))


if __name__ == "__main__":
    main()
