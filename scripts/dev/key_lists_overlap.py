"""cluster_key_knn (each key's k nearest keys sought in the keys of the n_probe k-means clusters nearest its own)
against exact_key_knn: the share of the exact lists' entries found (by id, and by distance, which forgives ties) and
the time of both, on model_qk keys and on synthetic keys. One JSON line per (key set, n_probe).

    PYTHONPATH=python python scripts/dev/key_lists_overlap.py --model-qk benchmarks/results/cache/model_qk_T32768.npz
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import qk_data  # noqa: E402

from retrieval_attention.index import cluster_key_knn, exact_key_knn  # noqa: E402


def overlap(a, b):
    """share of b's entries (exact lists) found in a's rows"""
    k = b.shape[-1]
    hit = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-2).sum()
    return float(hit) / b.numel() if k else 1.0


def dist_recall(a, b, keys):
    """share of a's entries at most as far as b's (exact) k-th neighbour: id overlap that forgives exact ties"""
    kth = (keys[b[:, -1]] - keys).norm(dim=-1)
    ok = a >= 0
    da = (keys[a.clamp(min=0)] - keys[:, None]).norm(dim=-1)
    return float(((da <= kth[:, None] * (1 + 1e-5)) & ok).sum()) / b.numel()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-qk", default="")
    ap.add_argument("--layers", default="1,3,5")
    ap.add_argument("--heads", default="0")
    ap.add_argument("--synthetic-n", type=int, default=65536)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--probes", default="4,8,16")
    ap.add_argument("--kpc", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sets = []
    if a.model_qk:
        for p in qk_data.load_model_qk(a.model_qk, layers=[int(x) for x in a.layers.split(",")], heads=[int(x) for x in a.heads.split(",")]):
            sets.append((p.name, torch.from_numpy(p.keys).float()))
    if a.synthetic_n:
        import numpy as np
        syn = qk_data.SyntheticQK(128, seed=0)
        sets.append(("synthetic", torch.from_numpy(syn.keys(a.synthetic_n, np.random.default_rng(0))).float()))
    for name, keys in sets:
        t = time.perf_counter()
        ex = exact_key_knn(keys[None], a.k)[0]
        t_ex = time.perf_counter() - t
        for P in [int(x) for x in a.probes.split(",")]:
            t = time.perf_counter()
            ap_ = cluster_key_knn(keys[None], a.k, keys_per_cluster=a.kpc, n_probe=P)[0]
            t_ap = time.perf_counter() - t
            print(json.dumps({"set": name, "n": keys.shape[0], "d": keys.shape[1], "probe": P, "kpc": a.kpc,
                              "overlap": round(overlap(ap_, ex), 4), "first_overlap": round(overlap(ap_[:, :1], ex[:, :1]), 4),
                              "dist_recall": round(dist_recall(ap_, ex, keys), 4),
                              "exact_s": round(t_ex, 2), "cluster_s": round(t_ap, 2)}), flush=True)


if __name__ == "__main__":
    main()
