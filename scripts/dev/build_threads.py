"""Build time of one 8B-shaped OffloadedLayer (synthetic OOD keys, kNN precomputed as on a GPU), built from the
main thread and from a background thread (as RetrievalCache does on a GPU), with the OpenMP thread count each sees.

    python scripts/dev/build_threads.py --n 16384 --train 4096 [--sharing per_kv_head] [--threads 16] [--key-lists 16] [--hash] [--cache PATH]

--key-lists L (with --key-list-stride S: among every S-th key) also computes each key's L nearest other keys (exact_key_knn, on the GPU when there is one) and hands
them to the build, as RetrievalCache's prefill does; --projection also hands it the graphs' projections
(projection_lists, on the GPU when there is one), as the prefill does when decoding waits for the builds;
RA_QG_PROFILE=1 prints each graph's build phases.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from qk_data import SyntheticQK  # noqa: E402

from retrieval_attention._ext import _C  # noqa: E402
from retrieval_attention.index import exact_key_knn, exact_knn, projection_lists  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--train", type=int, default=4096, help="training queries per query head")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--sharing", default="per_kv_head")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", default="main,thread")
    ap.add_argument("--key-lists", type=int, default=0, help="length of each key's list of nearest keys (0: none)")
    ap.add_argument("--key-list-stride", type=int, default=1, help="exact_key_knn's column_stride for those lists")
    ap.add_argument("--projection", action="store_true", help="also hand the build its projections (projection_lists)")
    ap.add_argument("--hash", action="store_true", help="also print a hash of the saved layer (equal: identical graphs)")
    ap.add_argument("--cache", default=None, metavar="PATH",
                    help="load the keys, queries and lists from PATH (torch.save) when it exists, else compute and save them "
                         "there: repeated builds of one workload without its CPU kNN (its *_s fields are then null)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # what the inputs depend on: a cache made for another workload is refused, not silently used
    workload = {k: getattr(a, k) for k in ("n", "train", "q_heads", "kv_heads", "d", "sharing", "key_lists", "key_list_stride", "projection")}
    if a.cache and os.path.exists(a.cache):
        c = torch.load(a.cache)
        if c.get("workload") != workload:
            sys.exit(f"--cache {a.cache} holds the workload {c.get('workload')}, not {workload}")
        K, Q, knn, key_knn, proj = c["K"], c["Q"], c["knn"], c["key_knn"], c["proj"]
        knn_s = key_knn_s = proj_s = None
    else:
        K, Q, knn, knn_s, key_knn, key_knn_s, proj, proj_s = make_inputs(a, dev)
        if a.cache:
            torch.save({"workload": workload, "K": K, "Q": Q, "knn": knn, "key_knn": key_knn, "proj": proj}, a.cache)
    for mode in a.modes.split(","):
        res = {}

        def build():
            res["omp_threads_seen"] = torch.get_num_threads()
            layer = _C.OffloadedLayer(torch.bfloat16, a.q_heads, a.kv_heads, a.d, a.d, "query_guided", {}, 4096, a.sharing)
            t0 = time.perf_counter()
            layer.build(K, K, Q, knn, key_knn=key_knn, projection=proj)
            res["build_s"] = round(time.perf_counter() - t0, 3)
            if a.hash:
                with tempfile.TemporaryDirectory() as tmp:
                    layer.save(os.path.join(tmp, "layer.bin"))
                    with open(os.path.join(tmp, "layer.bin"), "rb") as f:
                        res["saved_sha1"] = hashlib.sha1(f.read()).hexdigest()[:12]

        if mode == "main":
            build()
        else:
            th = threading.Thread(target=build)
            th.start()
            th.join()
        print(json.dumps({"bench": "build_threads", "mode": mode, "n": a.n, "train_per_head": a.train, "sharing": a.sharing,
                          "threads_main": torch.get_num_threads(), "knn_s": None if knn_s is None else round(knn_s, 3), "knn_device": dev.type,
                          "key_lists": a.key_lists, "key_list_stride": a.key_list_stride,
                          "projection": a.projection, "inputs_from_cache": knn_s is None, "key_knn_s": key_knn_s,
                          "projection_s": proj_s,
                          "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), **res}), flush=True)


def make_inputs(a, dev):
    """The synthetic keys and training queries and the lists the build takes, as a GPU prefill makes them."""
    rng = np.random.default_rng(0)
    G = a.q_heads // a.kv_heads
    keys, train = [], []
    for g in range(a.kv_heads):
        syn = SyntheticQK(a.d, seed=g)
        keys.append(syn.keys(a.n, rng))
        train += [syn.queries(a.train, rng) for _ in range(G)]
    K = torch.as_tensor(np.stack(keys)).bfloat16().contiguous()
    Q = torch.as_tensor(np.stack(train)).float().contiguous()
    t = time.perf_counter()
    knn = exact_knn(K.to(dev), Q.to(dev), 100).cpu()
    knn_s = time.perf_counter() - t
    key_knn, key_knn_s = None, None
    if a.key_lists:
        t = time.perf_counter()
        key_knn = exact_key_knn(K.to(dev), a.key_lists, column_stride=a.key_list_stride).cpu()
        key_knn_s = round(time.perf_counter() - t, 3)
    proj, proj_s = None, None
    if a.projection:
        params = _C.resolved_index_params("query_guided", {})
        t = time.perf_counter()
        per_index = knn.view(a.kv_heads, -1, knn.shape[-1]) if a.sharing == "per_kv_head" else knn
        proj = projection_lists(K.to(dev), per_index.to(dev), params["n_pivots"], params["degree"]).cpu()
        proj_s = round(time.perf_counter() - t, 3)
    return K, Q, knn, knn_s, key_knn, key_knn_s, proj, proj_s


if __name__ == "__main__":
    main()
