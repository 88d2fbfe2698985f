"""The fewest keys a beam search over the query-guided graph can score, on a model_qk dump: each evaluation query's
search is handed its exact top-100 as seeds (ef 100). A beam search with ef >= k expands every key of its final beam
before it stops, so it scores the top 100 and all their out-neighbours at least; the seeded search measures that floor.
Beside it, the plain search's keys scanned at recall@100 `--target` (ef swept, linear interpolation), per graph degree.
Training queries: every prompt query of the dump, half moved by RoPE (the library default).
usage: python scripts/dev/oracle_seed_floor.py --model-qk benchmarks/results/cache/model_qk_T32768_s1.npz \
           --layers 0,1,2,3,4,5 --heads 0,1,2,3,4,5 --degrees 16,24,32 > out.jsonl"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import qk_data  # noqa: E402

import retrieval_attention as ra  # noqa: E402

ap = qk_data.frontier_arg_parser(__doc__)
ap.add_argument("--degrees", default="16,24,32")
args = ap.parse_args()
torch.set_num_threads(args.threads)
probs = qk_data.load_model_qk(args.model_qk, [int(x) for x in args.layers.split(",")], [int(x) for x in args.heads.split(",")])
probs = qk_data.shift_train_queries(probs, qk_data.bundled_model_rope(), 0.5)
efs = [int(x) for x in args.efs.split(",")]
degrees = [int(x) for x in args.degrees.split(",")]
curves = {f"degree_{g}": {ef: [] for ef in efs} for g in degrees}
floors = {g: [] for g in degrees}
for p in probs:
    top, exact = qk_data.exact_topk(p.keys, p.eval_q, 100)
    top_ids = torch.from_numpy(np.ascontiguousarray(top))
    for g in degrees:
        idx = ra.QueryGuidedIndex(torch.from_numpy(p.keys), torch.from_numpy(p.train_q), degree=g, ef_build=128)
        ids, _ = idx.search(torch.from_numpy(p.eval_q), 100, 100, seeds=top_ids)
        rec = float(qk_data.recall_per_query(ids.numpy(), p.keys, p.eval_q, exact[:, -1], 100).mean())
        floors[g].append((rec, float(idx.last_search_stats["scanned_frac"])))
        for ef in efs:
            curves[f"degree_{g}"][ef].append(qk_data.search_recall(idx, p, exact[:, -1], ef))
        print(json.dumps({"head": p.name, "degree": g, "seeded_recall": rec, "seeded_scanned_frac": floors[g][-1][1],
                          "curve": [(ef, *curves[f"degree_{g}"][ef][-1]) for ef in efs]}), flush=True)
for g in degrees:
    print(json.dumps({"summary": f"oracle_seeded_degree_{g}", "heads": len(probs), "recall": float(np.mean([r for r, _ in floors[g]])),
                      "scanned_frac": round(float(np.mean([s for _, s in floors[g]])), 5)}), flush=True)
qk_data.print_frontier_summaries(curves, args.target)
