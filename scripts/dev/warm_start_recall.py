"""Recall@100 and keys scanned of the query-guided graph with and without the warm start, on a model_qk dump: every
head's last 64 positions searched one at a time in order, each seeded with the previous one's result (as
RetrievalConfig.warm_start does per decode step), against the same searches unseeded; the first query is not scored.
Training queries: every prompt query of the dump, half moved by RoPE (the library default).
usage: python scripts/dev/warm_start_recall.py benchmarks/results/cache/model_qk_T32768_s1.npz [DEGREE] > out.jsonl"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import qk_data  # noqa: E402

import retrieval_attention as ra  # noqa: E402

path = sys.argv[1]
degree = int(sys.argv[2]) if len(sys.argv) > 2 else 32
probs = qk_data.load_model_qk(path, n_eval=64)
probs = qk_data.shift_train_queries(probs, qk_data.bundled_model_rope(), 0.5)
efs = (128, 192, 256, 320, 384, 512)
out = {m: {ef: [] for ef in efs} for m in ("cold", "warm")}
for i, p in enumerate(probs):
    K = torch.from_numpy(p.keys).float()
    idx = ra.QueryGuidedIndex(K, torch.from_numpy(p.train_q).float(), degree=degree, ef_build=128)
    q = torch.from_numpy(p.eval_q).float()
    ex, exs = qk_data.exact_topk(p.keys, p.eval_q, 100)
    for ef in efs:
        ids, _ = idx.search(q, 100, ef)
        vis = idx.last_search_stats["visited"].numpy()
        r = qk_data.recall_per_query(ids.numpy(), p.keys, p.eval_q, exs[:, -1], 100)
        out["cold"][ef].append((r[1:].mean(), vis[1:].mean() / K.shape[0]))
        got, vs, prev = [], [], None
        for j in range(q.shape[0]):
            ids_j, _ = idx.search(q[j:j+1], 100, ef, seeds=prev)
            vs.append(int(idx.last_search_stats["visited"][0])); got.append(ids_j[0]); prev = ids_j[0]
        r = qk_data.recall_per_query(torch.stack(got).numpy(), p.keys, p.eval_q, exs[:, -1], 100)
        out["warm"][ef].append((r[1:].mean(), np.mean(vs[1:]) / K.shape[0]))
    print(i, flush=True, file=sys.stderr)
for m in out:
    pts = [(ef, float(np.mean([a for a, _ in v])), float(np.mean([b for _, b in v]))) for ef, v in out[m].items()]
    print(json.dumps({"bench": "recall_warm_start", "data": os.path.basename(path), "heads": len(probs), "mode": m, "degree": degree, "k": 100,
                      "eval_queries_per_head": 63, "points_ef_recall_scanned": pts}))
