"""Search time of one query-guided graph on the bundled model's own 32K Q/K (layer 3, query head 0), one thread.

    python scripts/dev/search_time.py [ef] [repeats]     # needs benchmarks/results/cache/model_qk_T32768.npz

Prints microseconds per query and a hash of the returned ids (equal hashes: identical results), for comparing two
builds of the extension side by side.
"""
import hashlib
import sys
import time

import numpy as np
import torch

import retrieval_attention as ra

LAYER, QUERY_HEAD, KV_GROUP, N_KEYS, N_QUERIES = 3, 0, 3, 32704, 64


def main():
    ef = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    dump = np.load("benchmarks/results/cache/model_qk_T32768.npz")
    keys = torch.from_numpy(dump["k"][LAYER, QUERY_HEAD // KV_GROUP].astype(np.float32))[:N_KEYS].bfloat16()
    queries = torch.from_numpy(dump["q"][LAYER, QUERY_HEAD].astype(np.float32))
    positions = dump["q_pos"]
    train, decode_like = queries[positions < N_KEYS], queries[positions >= N_KEYS][:N_QUERIES]
    torch.set_num_threads(1)
    index = ra.QueryGuidedIndex(keys, train)
    index.search(decode_like, k=100, ef=ef)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        ids, _ = index.search(decode_like, k=100, ef=ef)
    per_query_us = (time.perf_counter() - t0) / repeats / len(decode_like) * 1e6
    print(f"ef {ef}: {per_query_us:.1f} us/query, 1 thread, ids hash {hashlib.sha1(ids.numpy().tobytes()).hexdigest()[:12]}")


if __name__ == "__main__":
    main()
