"""Training queries moved to the decode position by RoPE: does the graph find the decode queries' keys with fewer keys
scanned?

A prefill query at position p moved by N - p (retrieval_attention.index.rope_shift) scores every key as if it were
asked at position N, where the decode queries are: the graph is then trained on queries whose relative positions to the
keys are the decode queries' own. Variants: plain (the queries as they are), shifted, both (the two sets
together), alternate (every other query moved; as many queries as plain), fracX (a share X of them moved, e.g. frac0.25).

    python scripts/dev/shifted_train_recall.py --model-qk benchmarks/results/cache/model_qk_T32768.npz --layers 1,3,5 --heads 0,4

Prints one JSON line per (head, variant, ef) and a summary of keys scanned at --target recall per variant.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import qk_data  # noqa: E402

from retrieval_attention import _ext  # noqa: E402
from retrieval_attention.index import KEY_LIST_COLUMN_STRIDE, _IndexBase, exact_key_knn, exact_knn, shifted_rows  # noqa: E402


def main():
    ap = qk_data.frontier_arg_parser()
    ap.add_argument("--variants", default="plain,shifted,both")
    ap.add_argument("--degree", type=int, default=32)
    ap.add_argument("--k-train", type=int, default=100)
    ap.add_argument("--n-pivots", type=int, default=4)
    ap.add_argument("--ef-weak", type=int, default=16, help="ef_weak, and the key-to-key lists' length")
    ap.add_argument("--static-set", default=None, help="SINK,WINDOW: the index holds keys [SINK, N - WINDOW) only, as the "
                    "cache's CPU index does (recall and scan over those keys)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    layers, heads = [int(x) for x in a.layers.split(",")], [int(x) for x in a.heads.split(",")]
    probs = qk_data.load_model_qk(a.model_qk, layers=layers, heads=heads)
    moved = qk_data.shift_train_queries(probs, qk_data.bundled_model_rope())
    if a.static_set:
        sink, window = (int(x) for x in a.static_set.split(","))
        probs = [qk_data.cut_static_set(p, sink, window) for p in probs]
    efs = [int(x) for x in a.efs.split(",")]
    params = {"degree": a.degree, "k_train": a.k_train, "ef_build": 128, "ef_weak": a.ef_weak, "n_pivots": a.n_pivots}
    curves = {}
    for p, p_moved in zip(probs, moved):
        keys = torch.from_numpy(p.keys).float()
        tq = torch.from_numpy(p.train_q).float()
        shifted = torch.from_numpy(p_moved.train_q).float()
        kl = exact_key_knn(keys[None], a.ef_weak, column_stride=KEY_LIST_COLUMN_STRIDE)[0]
        ex_ids, ex_sc = qk_data.exact_topk(p.keys, p.eval_q, 100)
        for name in a.variants.split(","):
            if name == "alternate" or name.startswith("frac"):  # a share of the queries moved, spread evenly
                frac = 0.5 if name == "alternate" else float(name[4:])
                train = torch.where(shifted_rows(tq.shape[0], frac)[:, None], shifted, tq)  # the rows the cache moves
            else:
                train = {"plain": tq, "shifted": shifted, "both": torch.cat([tq, shifted])}[name]
            train = train.contiguous()
            t = time.perf_counter()
            knn = exact_knn(keys[None], train[None], a.k_train)[0]
            handle = _ext._C.KeyIndex.build(keys.bfloat16(), train, "query_guided", params, knn, kl)
            build_s = time.perf_counter() - t
            idx = _IndexBase(handle)
            for ef in efs:
                rec, scan = qk_data.search_recall(idx, p, ex_sc[:, 99], ef)
                curves.setdefault(name, {}).setdefault(ef, []).append((rec, scan))
                print(json.dumps({"head": p.name, "variant": name, "ef": ef, "recall": round(rec, 4), "scanned_frac": round(scan, 5),
                                  "build_s": round(build_s, 3), "train": int(train.shape[0]), "n": p.n}), flush=True)
    qk_data.print_frontier_summaries(curves, a.target)


if __name__ == "__main__":
    main()
