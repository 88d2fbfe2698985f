"""A/B of build-phase memory variants on one synthetic graph (d 128, 8,192 training queries, key lists given), each
variant in its own process (the dev toggles are read once per process), alternated --rounds times. Prints per variant
the build seconds and a hash of the saved graph (variants that only prefetch must give the same hash).
    RA_QG_PROFILE=1 python scripts/dev/weak_pipe_ab.py --n 131072 --rounds 3
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {"base": {}, "sorted": {"RA_QG_DEV_WEAK_SORTED": "1"}, "pipe": {"RA_QG_DEV_PIPE": "1"},
            "pipe2": {"RA_QG_DEV_PIPE": "2"}, "sorted_pipe2": {"RA_QG_DEV_WEAK_SORTED": "1", "RA_QG_DEV_PIPE": "2"},
            "pf8": {"RA_QG_DEV_PF_AHEAD": "8"}}


def child(a):
    import torch
    from retrieval_attention import _ext
    torch.set_num_threads(a.threads)
    data = torch.load(a.cache)
    params = {"degree": 32, "k_train": 100, "ef_build": 64, "ef_weak": 16, "n_pivots": 4}
    t = time.perf_counter()
    idx = _ext._C.KeyIndex.build(data["keys"].bfloat16(), data["train"], "query_guided", params, data["knn"], data["lists"])
    sec = time.perf_counter() - t
    path = a.cache + f".{os.getpid()}.idx"
    idx.save(path)
    h = hashlib.sha1(open(path, "rb").read()).hexdigest()[:12]
    os.remove(path)
    print(json.dumps({"build_s": round(sec, 3), "hash": h}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="base,sorted,pipe,pipe2,sorted_pipe2,pf8")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    a.cache = a.cache or f"/tmp/weak_pipe_ab_{a.n}.pt"
    if a.child:
        return child(a)
    if not os.path.exists(a.cache):
        import numpy as np
        import torch
        sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))
        from qk_data import SyntheticQK
        from retrieval_attention.index import exact_key_knn, exact_knn
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        syn = SyntheticQK(128, seed=5)
        rng = np.random.default_rng(1)
        keys = torch.from_numpy(syn.keys(a.n, rng)).float()
        train = torch.from_numpy(syn.queries(8192, rng)).float()
        knn = exact_knn(keys[None].to(dev), train[None].to(dev), 100)[0].cpu()
        lists = exact_key_knn(keys[None].to(dev), 16)[0].cpu()
        torch.save({"keys": keys, "train": train, "knn": knn, "lists": lists}, a.cache)
    res = {v: [] for v in a.variants.split(",")}
    for r in range(a.rounds):
        for v in res:
            env = dict(os.environ, **VARIANTS[v])
            out = subprocess.run([sys.executable, __file__, "--child", "--n", str(a.n), "--threads", str(a.threads), "--cache", a.cache],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            line = json.loads(out.stdout.strip().splitlines()[-1])
            res[v].append(line)
            phases = [l for l in out.stderr.splitlines() if "weak" in l or "project" in l]
            print(v, line, phases[-1][:200] if phases else "", file=sys.stderr, flush=True)
    for v, rows in res.items():
        times = sorted(x["build_s"] for x in rows)
        print(json.dumps({"bench": "weak_pipe_ab", "n": a.n, "threads": a.threads, "variant": v, "build_s_median": times[len(times) // 2],
                          "build_s_all": [x["build_s"] for x in rows], "hashes": sorted({x["hash"] for x in rows})}))


if __name__ == "__main__":
    main()
