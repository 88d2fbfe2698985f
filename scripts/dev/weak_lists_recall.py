"""Does linking the graph's weak keys from exact key-to-key lists (as a GPU could compute them) keep recall, and how
much build time does it save? For each model_qk head: the query-guided graph built from the exact bipartite kNN (as on
a GPU) with the weak keys linked by the default beam search, and again with each weak key's exact L2 nearest keys
given instead. Prints one JSON line per (head, variant, ef) and a summary of keys scanned at --target recall.

    python scripts/dev/weak_lists_recall.py --model-qk benchmarks/results/cache/model_qk_T32768.npz --layers 1,3,5 --heads 0,4
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import qk_data  # noqa: E402

from retrieval_attention import _ext  # noqa: E402
from retrieval_attention.index import _IndexBase, exact_key_knn, exact_knn  # noqa: E402


def main():
    ap = qk_data.frontier_arg_parser()
    ap.add_argument("--key-k", default="16,32", help="key-to-key list lengths to try")
    ap.add_argument("--subset-strides", default="", help="also: lists of each key's 16 nearest among every s-th key only")
    ap.add_argument("--classes", default="", help="also: lists of each key's 16 nearest among the keys of its class "
                    "(position mod c) only")
    ap.add_argument("--max-train", type=int, default=None, help="use this many training queries per head (evenly spaced)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    probs = qk_data.load_model_qk(a.model_qk, layers=[int(x) for x in a.layers.split(",")], heads=[int(x) for x in a.heads.split(",")])
    efs = [int(x) for x in a.efs.split(",")]
    params = {"degree": 32, "k_train": 100, "ef_build": 128, "ef_weak": 16, "n_pivots": 4}
    curves = {}
    for p in probs:
        keys = torch.from_numpy(p.keys).float()
        tq = torch.from_numpy(p.train_q).float()
        if a.max_train and tq.shape[0] > a.max_train:
            tq = tq[torch.linspace(0, tq.shape[0] - 1, a.max_train).round().long()]
        tq = tq.contiguous()
        ex_ids, ex_sc = qk_data.exact_topk(p.keys, p.eval_q, 100)
        knn = exact_knn(keys[None], tq[None], 100)[0]
        variants = [("search", None, 0.0)]
        for kk in [int(x) for x in a.key_k.split(",") if x]:
            t = time.perf_counter()
            kl = exact_key_knn(keys[None], kk)[0]
            variants.append((f"lists{kk}", kl, time.perf_counter() - t))
        for st in [int(x) for x in a.subset_strides.split(",") if x]:
            t = time.perf_counter()
            kl = exact_key_knn(keys[None], 16, column_stride=st)[0]
            variants.append((f"subset{st}", kl, time.perf_counter() - t))
        for c in [int(x) for x in a.classes.split(",") if x]:
            t = time.perf_counter()
            kl = torch.empty((keys.shape[0], 16), dtype=torch.int64)
            for r in range(c):
                kl[r::c] = exact_key_knn(keys[None, r::c], 16)[0] * c + r
            variants.append((f"classes{c}", kl, time.perf_counter() - t))
        for name, kl, list_s in variants:
            t = time.perf_counter()
            handle = _ext._C.KeyIndex.build(keys.bfloat16(), tq, "query_guided", params, knn, kl)
            build_s = time.perf_counter() - t
            idx = _IndexBase(handle)
            for ef in efs:
                rec, scan = qk_data.search_recall(idx, p, ex_sc[:, 99], ef)
                curves.setdefault(name, {}).setdefault(ef, []).append((rec, scan))
                print(json.dumps({"head": p.name, "variant": name, "ef": ef, "recall": round(rec, 4), "scanned_frac": round(scan, 5),
                                  "build_s": round(build_s, 3), "key_lists_s_cpu": round(list_s, 3), "n": p.n}), flush=True)
    qk_data.print_frontier_summaries(curves, a.target)


if __name__ == "__main__":
    main()
