"""Build time of one OffloadedLayer (all of a layer's graphs, CPU kNN included), best of --repeats, as JSON lines.

    python scripts/dev/layer_build_time.py --q-heads 1 --kv-heads 1 --n 32768 --d 64 --threads 2
    python scripts/dev/layer_build_time.py --q-heads 3 --kv-heads 1 --sharing per_kv_head

Shows how the threads are shared between a layer's graphs (parallel_for_split in include/retrieval_attention/parallel.h).
"""
import argparse
import json
import time

import torch

from retrieval_attention._ext import _C


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--q-heads", type=int, default=1)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--n", type=int, default=32768, help="keys per kv head (also training queries per query head)")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--sharing", default="per_query_head", choices=("per_query_head", "per_kv_head"))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(args.kv_heads, args.n, args.d, generator=g).bfloat16()
    train = torch.randn(args.q_heads, args.n, args.d, generator=g) + 0.5  # queries off the keys' distribution
    times = []
    for _ in range(args.repeats):
        layer = _C.OffloadedLayer(torch.bfloat16, args.q_heads, args.kv_heads, args.d, args.d, "query_guided", {}, 4096,
                                  args.sharing)
        t0 = time.perf_counter()
        layer.build(keys, keys, train)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"bench": "layer_build", "q_heads": args.q_heads, "kv_heads": args.kv_heads, "n": args.n, "d": args.d,
                      "sharing": args.sharing, "threads": args.threads, "build_s": round(min(times), 3),
                      "build_s_all": [round(t, 3) for t in times]}))


if __name__ == "__main__":
    main()
