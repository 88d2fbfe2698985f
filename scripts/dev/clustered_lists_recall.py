"""Key-to-key lists from clusters instead of the exact scan: how close are they, and does the graph find the decode
queries' keys with as few keys scanned?

The graph links the keys its projection leaves weak from each key's nearest keys (build_key_lists). exact_key_knn
scores every key against every other (or every other one: KEY_LIST_COLUMN_STRIDE); clustered_key_knn scores each key
against the keys of its cluster's nearest clusters only. For each model_qk head (training queries moved by RoPE, as the
cache does), the graph is built with each variant's lists and searched over a sweep of beams.

    python scripts/dev/clustered_lists_recall.py --model-qk benchmarks/results/cache/model_qk_T32768.npz --layers 1,3,5 --heads 0,4

Variants: `exact` (exact_key_knn at KEY_LIST_COLUMN_STRIDE), `exact1` (every key), `none` (no lists: weak keys are
searched for), and `clustered:SIZE:PROBES:ITERS`. Prints one JSON line per (head, variant, ef), with the variant's
share of the exact lists (every key) it found, and a summary of keys scanned at --target recall per variant.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import qk_data  # noqa: E402

from retrieval_attention import _ext  # noqa: E402
from retrieval_attention.index import KEY_LIST_COLUMN_STRIDE, _IndexBase, clustered_key_knn, exact_key_knn, exact_knn  # noqa: E402


def lists_for(name: str, keys: torch.Tensor):
    if name == "none":
        return None
    if name == "exact":
        return exact_key_knn(keys[None], 16, column_stride=KEY_LIST_COLUMN_STRIDE)[0]
    if name == "exact1":
        return exact_key_knn(keys[None], 16)[0]
    kind, size, probes, iters = name.split(":")
    assert kind == "clustered", name
    return clustered_key_knn(keys[None], 16, cluster_size=int(size), probes=int(probes), iters=int(iters))[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-qk", required=True)
    ap.add_argument("--layers", default="1,3,5")
    ap.add_argument("--heads", default="0,4")
    ap.add_argument("--variants", default="exact,clustered:128:16:4")
    ap.add_argument("--efs", default="100,128,160,200,256,320,400")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=None, help="this many training queries per head (evenly spaced)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    layers, heads = [int(x) for x in a.layers.split(",")], [int(x) for x in a.heads.split(",")]
    probs = qk_data.load_model_qk(a.model_qk, layers=layers, heads=heads, max_train=a.max_train)
    moved = qk_data.shift_train_queries(probs, qk_data.bundled_model_rope())
    efs = [int(x) for x in a.efs.split(",")]
    params = {"degree": 32, "k_train": 100, "ef_build": 128, "ef_weak": 16, "n_pivots": 4}
    curves = {}
    for p, p_moved in zip(probs, moved):
        keys = torch.from_numpy(p.keys).float()
        train = torch.from_numpy(p_moved.train_q).float().contiguous()
        knn = exact_knn(keys[None], train[None], params["k_train"])[0]
        ex_ids, ex_sc = qk_data.exact_topk(p.keys, p.eval_q, 100)
        exact_all = exact_key_knn(keys[None], 16)[0]
        for name in a.variants.split(","):
            t = time.perf_counter()
            kl = lists_for(name, keys)
            list_s = time.perf_counter() - t
            found = None if kl is None else float((kl.unsqueeze(-1) == exact_all.unsqueeze(1)).any(1).float().mean())
            t = time.perf_counter()
            handle = _ext._C.KeyIndex.build(keys.bfloat16(), train, "query_guided", params, knn, kl)
            build_s = time.perf_counter() - t
            idx = _IndexBase(handle)
            for ef in efs:
                rec, scan = qk_data.search_recall(idx, p, ex_sc[:, 99], ef)
                curves.setdefault(name, {}).setdefault(ef, []).append((rec, scan))
                print(json.dumps({"head": p.name, "variant": name, "ef": ef, "recall": round(rec, 4), "scanned_frac": round(scan, 5),
                                  "lists_found": None if found is None else round(found, 4), "lists_s_cpu": round(list_s, 3),
                                  "build_s": round(build_s, 3), "train": int(train.shape[0]), "n": p.n}), flush=True)
    qk_data.print_frontier_summaries(curves, a.target)


if __name__ == "__main__":
    main()
