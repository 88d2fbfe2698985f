"""Experiment: a projection that ranks a pivot's candidates by how many training queries list them with it.

With training queries moved to the decode position (RetrievalConfig.shift_train_queries) a few recent keys are the
pivots of most queries (on layer 3 head 4 of the bundled model's 32K Q/K, 10 keys hold 71% of the pivot slots), and
such a hub keeps only `degree` of its thousands of candidates: those the pruning reaches first, the nearest in L2.
Variant "count" hands the same pruning (the extension's projection_prune op) the candidates ordered by the number of
queries that list them with the pivot (then by distance / inner product), so a hub keeps the keys many queries want.

    python scripts/dev/hub_projection_recall.py --model-qk benchmarks/results/cache/model_qk_T32768.npz

Prints one JSON line per (head, variant, ef) and a summary of keys scanned at --target recall per variant.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import qk_data  # noqa: E402

from retrieval_attention import _ext  # noqa: E402
from retrieval_attention.index import (KEY_LIST_COLUMN_STRIDE, PRUNE_SCAN, _IndexBase, exact_key_knn, exact_knn,  # noqa: E402
                                       projection_lists)


def count_projection(keys: torch.Tensor, knn: torch.Tensor, n_pivots: int, degree: int) -> torch.Tensor:
    """keys (n, d) float32, knn (m, kk) -> (1, n, degree) int32 lists: candidates of each pivot ordered by how many
    queries list them with it (most first), ties by L2 distance for the RNG pass and by inner product for the rest."""
    n, d = keys.shape
    m, kk = knn.shape
    piv = knn[:, :n_pivots]
    pairs_p = piv.unsqueeze(-1).expand(m, n_pivots, kk).reshape(-1)
    pairs_c = knn.unsqueeze(1).expand(m, n_pivots, kk).reshape(-1)
    ok = (pairs_p >= 0) & (pairs_c >= 0) & (pairs_p != pairs_c)
    code = pairs_p[ok] * n + pairs_c[ok]
    uniq, count = torch.unique(code, return_counts=True)
    p, c = uniq // n, uniq % n
    ip = (keys[p] * keys[c]).sum(-1)
    sq = (keys * keys).sum(-1)
    dist = (sq[p] + sq[c]) - 2.0 * ip
    # lexicographic (pivot, -count, value) by stable sorts from the last key to the first
    def order(value):
        o = torch.sort(value, stable=True).indices
        o = o[torch.sort(-count[o], stable=True).indices]
        return o[torch.sort(p[o], stable=True).indices]
    near_o, mips_o = order(torch.clamp(dist, min=0)), order(-ip)
    ps = p[near_o]
    start = torch.ones_like(ps, dtype=torch.bool)
    start[1:] = ps[1:] != ps[:-1]
    begin = torch.nonzero(start).reshape(-1)
    counts = torch.tensor([int(begin.numel()), int(ps.numel())])
    return torch.ops.retrieval_attention.projection_prune(
        keys[None].contiguous(), 1, begin, counts, ps, c[near_o], dist[near_o], c[mips_o], degree, max(PRUNE_SCAN * degree, 64), True)


def main():
    ap = qk_data.frontier_arg_parser()
    ap.add_argument("--variants", default="lib,count")
    ap.add_argument("--n-pivots", type=int, default=4)
    ap.add_argument("--recent", type=int, default=1024, help="variant old: keys this close to the end are left out of "
                    "the lists' second half")
    ap.add_argument("--overall", type=int, default=50, help="variant old: neighbours among all keys, then among the older")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    probs = qk_data.load_model_qk(a.model_qk, layers=[int(x) for x in a.layers.split(",")], heads=[int(x) for x in a.heads.split(",")])
    probs = qk_data.shift_train_queries(probs, qk_data.bundled_model_rope())
    efs = [int(x) for x in a.efs.split(",")]
    params = {"degree": 32, "k_train": 100, "ef_build": 128, "ef_weak": 16, "n_pivots": a.n_pivots}
    curves = {}
    for p in probs:
        keys = torch.from_numpy(p.keys).float()
        tq = torch.from_numpy(p.train_q).float().contiguous()
        kb = keys.bfloat16()
        kl = exact_key_knn(keys[None], 16, column_stride=KEY_LIST_COLUMN_STRIDE)[0]
        knn = exact_knn(keys[None], tq[None], 100)[0]
        ex_ids, ex_sc = qk_data.exact_topk(p.keys, p.eval_q, 100)
        for name in a.variants.split(","):
            lists = knn
            if name == "old":  # each query's best `overall` keys, then its best among the keys before the last `recent`
                older = exact_knn(keys[None, : p.n - a.recent], tq[None], 100)[0]
                rows = []
                for top, old in zip(knn[:, : a.overall].tolist(), older.tolist()):
                    seen = set(top)
                    rows.append((top + [x for x in old if x not in seen])[:100])
                lists = torch.tensor(rows, dtype=torch.int64)
            if name == "count":
                proj = count_projection(kb.float(), lists, a.n_pivots, 32)[0]
            else:
                proj = projection_lists(kb[None], lists[None], a.n_pivots, 32)[0]
            handle = _ext._C.KeyIndex.build(kb, tq, "query_guided", params, lists, kl, proj)
            idx = _IndexBase(handle)
            for ef in efs:
                rec, scan = qk_data.search_recall(idx, p, ex_sc[:, 99], ef)
                curves.setdefault(name, {}).setdefault(ef, []).append((rec, scan))
                print(json.dumps({"head": p.name, "variant": name, "ef": ef, "recall": round(rec, 4), "scanned_frac": round(scan, 5)}), flush=True)
    qk_data.print_frontier_summaries(curves, a.target)


if __name__ == "__main__":
    main()
