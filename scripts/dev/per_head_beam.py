"""Per-head search beams at 32K: each head's recall@100 and keys scanned over a beam sweep, for the evaluation queries
(the dump's last 64 positions) and for held-out calibration queries (the last NCAL=64 prompt queries, left out of the
graph's training set), then how much one beam per head chosen on the calibration queries (or on the evaluation queries
themselves: the best possible split) saves against one beam for all heads at recall 0.95.
usage: python scripts/dev/per_head_beam.py DUMP > rows.jsonl; python scripts/dev/per_head_beam.py --analyze rows.jsonl"""
import json
import os
import sys

import numpy as np

TARGET = 0.95


def run(path):
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import qk_data

    import retrieval_attention as ra

    n_cal = int(os.environ.get("NCAL", 64))
    probs = qk_data.shift_train_queries(qk_data.load_model_qk(path, n_eval=64), qk_data.bundled_model_rope(), 0.5)
    efs = [100, 128, 160, 192, 256, 320, 384, 512, 768]
    for p in probs:
        cal, train = np.ascontiguousarray(p.train_q[-n_cal:]), np.ascontiguousarray(p.train_q[:-n_cal])
        idx = ra.QueryGuidedIndex(torch.from_numpy(p.keys), torch.from_numpy(train), ef_build=128)
        row = {"head": p.name}
        for name, q in (("eval", p.eval_q), ("cal", cal)):
            _, exact = qk_data.exact_topk(p.keys, q, 100)
            for ef in efs:
                ids, _ = idx.search(torch.from_numpy(q), 100, ef)
                r = qk_data.recall_per_query(ids.numpy(), p.keys, q, exact[:, -1], 100)
                row.setdefault(name, []).append((ef, float(r.mean()), float(idx.last_search_stats["scanned_frac"])))
        print(json.dumps(row), flush=True)


def at_target(points):
    """Keys scanned at TARGET recall, linear between the (recall, scanned) points around it."""
    pts = sorted(points)
    for (r0, s0), (r1, s1) in zip(pts, pts[1:]):
        if r0 < TARGET <= r1:
            return s0 + (s1 - s0) * (TARGET - r0) / (r1 - r0)
    return None


def analyze(path):
    rows = [json.loads(line) for line in open(path)]
    ev_r, ev_s, cal_r, cal_s = (np.array([[pt[i] for pt in row[part]] for row in rows])
                                for part, i in (("eval", 1), ("eval", 2), ("cal", 1), ("cal", 2)))
    heads = np.arange(len(rows))
    one_beam = at_target([(ev_r[:, j].mean(), ev_s[:, j].mean()) for j in range(ev_r.shape[1])])

    def split(r, s):  # one beam per head maximising recall - lam * scanned, over lam: the evaluation queries' points
        return [(ev_r[heads, pick].mean(), ev_s[heads, pick].mean())
                for pick in (np.argmax(r - lam * s, axis=1) for lam in np.geomspace(0.05, 200, 400))]

    best = lambda pts: min((s for r, s in pts if r >= TARGET), default=None)  # noqa: E731
    print(json.dumps({"heads": len(rows), "target": TARGET, "one_beam": one_beam,
                      "per_head_chosen_on_calibration": best(split(cal_r, cal_s)),
                      "per_head_chosen_on_evaluation": best(split(ev_r, ev_s))}))


if __name__ == "__main__":
    analyze(sys.argv[2]) if sys.argv[1] == "--analyze" else run(sys.argv[1])
