"""GPU time of projection_lists for one 8B-shaped layer at 128K (8 kv heads x 130,432 keys x 128, per_kv_head: 8 graphs
of 4 x 2,048 pooled training queries), and where it goes (torch.profiler, CUDA kernels by total time).

    python scripts/dev/projection_time.py [--n 130432] [--train 2048] [--sharing per_kv_head]
"""
import argparse
import json

import torch

from retrieval_attention.index import exact_knn, projection_lists


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=130432)
    ap.add_argument("--train", type=int, default=2048)
    ap.add_argument("--sharing", default="per_kv_head")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    hkv, per, d = 8, 4, 128
    # keys around 256 centres, queries from another distribution (a shifted mean): out of distribution as in attention
    centres = torch.randn(hkv, 256, d, device="cuda", generator=g) * 2
    pick = torch.randint(0, 256, (hkv, a.n), device="cuda", generator=g)
    keys = (torch.gather(centres, 1, pick.unsqueeze(-1).expand(-1, -1, d)) + torch.randn(hkv, a.n, d, device="cuda", generator=g)).bfloat16()
    queries = torch.randn(hkv * per, a.train, d, device="cuda", generator=g) + 3.0
    knn = exact_knn(keys, queries, 100)
    idx = knn.view(hkv, -1, knn.shape[-1]) if a.sharing == "per_kv_head" else knn
    times = []
    for _ in range(a.repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        proj = projection_lists(keys, idx, 4, 32)
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        projection_lists(keys, idx, 4, 32)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
    lists = int((proj[..., 0] >= 0).sum())
    print(json.dumps({"bench": "projection_time", "n": a.n, "train_per_head": a.train, "sharing": a.sharing, "graphs": idx.shape[0],
                      "pivots_with_lists": lists, "seconds": sorted(times), "median_s": sorted(times)[len(times) // 2]}))
    print(table)


if __name__ == "__main__":
    main()
