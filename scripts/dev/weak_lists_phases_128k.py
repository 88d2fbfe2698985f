"""Build phases (RA_QG_PROFILE=1) of one synthetic 128K-key graph, d 128, 8,192 training queries, 2 threads: weak keys
searched vs linked from exact key lists (computed here on the CPU).   RA_QG_PROFILE=1 python scripts/dev/weak_lists_phases_128k.py"""
import sys
import time

import numpy as np
import torch

sys.path.insert(0, "benchmarks")
from qk_data import SyntheticQK
from retrieval_attention import _ext
from retrieval_attention.index import exact_knn, exact_key_knn
torch.set_num_threads(2)
syn = SyntheticQK(128, seed=5)
rng = np.random.default_rng(1)
keys = torch.from_numpy(syn.keys(131072, rng)).float()
train = torch.from_numpy(syn.queries(8192, rng)).float()
t = time.perf_counter(); knn = exact_knn(keys[None], train[None], 100)[0]; print("knn s", round(time.perf_counter() - t, 1), flush=True)
t = time.perf_counter(); lists = exact_key_knn(keys[None], 16)[0]; print("key lists s (CPU fp32)", round(time.perf_counter() - t, 1), flush=True)
params = {"degree": 32, "k_train": 100, "ef_build": 64, "ef_weak": 16, "n_pivots": 4}
for name, kl in (("search", None), ("lists", lists)):
    t = time.perf_counter()
    _ext._C.KeyIndex.build(keys.bfloat16(), train, "query_guided", params, knn, kl)
    print(name, "build s", round(time.perf_counter() - t, 2), flush=True)
