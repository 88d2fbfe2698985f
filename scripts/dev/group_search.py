"""GQA group search vs one search per query head, on the bundled model's own 32K Q/K (all 6 layers, 6 query heads
over 2 kv heads), side by side in one process: recall@100 of the exact top-100, keys scanned per query head, distinct
key rows read per query head, and the CPU time of OffloadedLayer.retrieve_attend (search + attention over the 100).

    python scripts/dev/group_search.py [--efs 64,128,256] [--threads 2] [--repeats 5] [--layers 0,1,2,3,4,5]

needs benchmarks/results/cache/model_qk_T32768.npz (benchmarks/dump_model_qk.py). One JSON line per setting.
"""
import argparse
import json
import time

import numpy as np
import torch

from retrieval_attention import _ext

N_KEYS, K = 32704, 100


def exact_top(q, keys, group):
    """q (Hq, m, d), keys (Hkv, n, d) -> exact top-K ids (Hq, m, K) by inner product."""
    k = keys.float().repeat_interleave(group, dim=0)
    return torch.topk(torch.bmm(q, k.transpose(1, 2)), K, dim=-1).indices


def recall(ids, truth):
    hit = 0
    for a, b in zip(ids.reshape(-1, K).tolist(), truth.reshape(-1, K).tolist()):
        hit += len(set(a) & set(b))
    return hit / truth.numel()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--efs", default="64,128,256,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", default="0,1,2,3,4,5")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dump = np.load("benchmarks/results/cache/model_qk_T32768.npz")
    pos = dump["q_pos"]
    efs = [int(e) for e in args.efs.split(",")]
    rows = {}
    for layer in [int(x) for x in args.layers.split(",")]:
        keys = torch.from_numpy(dump["k"][layer, :, :N_KEYS].astype(np.float32)).bfloat16()  # (2, n, 64)
        q_all = torch.from_numpy(dump["q"][layer].astype(np.float32))  # (6, positions, 64)
        train, q = q_all[:, pos < N_KEYS].contiguous(), q_all[:, pos >= N_KEYS].contiguous()
        hq, hkv, d = q.shape[0], keys.shape[0], keys.shape[2]
        group = hq // hkv
        values = torch.zeros_like(keys)
        truth = exact_top(q, keys, group)
        for sharing, grouped in (("per_query_head", False), ("per_kv_head", False), ("per_kv_head", True)):
            lay = _ext._C.OffloadedLayer(torch.bfloat16, hq, hkv, d, d, "query_guided", {}, 0, sharing)
            lay.build(keys, values, train, None)
            for ef in efs:
                lay.retrieve_attend(q, K, ef, d ** -0.5, False, grouped)  # warm-up
                t0 = time.perf_counter()
                for _ in range(args.repeats):
                    _, _, vis, ids = lay.retrieve_attend(q, K, ef, d ** -0.5, True, grouped)
                sec = (time.perf_counter() - t0) / args.repeats
                name = "group" if grouped else sharing
                r = rows.setdefault((name, ef), {"hits": 0.0, "n": 0, "scanned": 0.0, "rows_read": 0.0, "sec": 0.0, "queries": 0})
                r["hits"] += recall(ids, truth) * truth.numel()
                r["n"] += truth.numel()
                v = vis.double().mean().item()
                r["scanned"] += v * q.shape[0] * q.shape[1]
                r["rows_read"] += (v / group if grouped else v) * q.shape[0] * q.shape[1]  # a group search reads each row once
                r["sec"] += sec
                r["queries"] += q.shape[0] * q.shape[1]
    for (name, ef), r in rows.items():
        print(json.dumps({"bench": "group_search", "data": "model_qk_T32768", "search": name, "ef": ef, "n": N_KEYS,
                          "recall": round(r["hits"] / r["n"], 4), "scanned_frac": round(r["scanned"] / r["queries"] / N_KEYS, 5),
                          "rows_read_frac": round(r["rows_read"] / r["queries"] / N_KEYS, 5),
                          "us_per_query_head": round(r["sec"] / r["queries"] * 1e6, 2), "threads": args.threads}))


if __name__ == "__main__":
    main()
