#!/usr/bin/env python
"""Recall of approximate maximum-inner-product search vs keys scanned, queries/s and build time.

    python benchmarks/recall.py --quick --json                 # < 60 s on a 2-core CPU
    python benchmarks/recall.py --json --out benchmarks/results # full run (all heads, larger synthetic n)
    python benchmarks/recall.py --build-time --json            # 8B-shaped build-time workload (see --help)
    python benchmarks/recall.py --json --data model_qk --sharing per_query_head,per_kv_head   # GQA graph sharing

For every (data set, index, k, search parameter) one JSON line (DESIGN.md section 6) goes to stdout:
    {"bench": "recall", "data": ..., "index": ..., "n": ..., "d": ..., "k": ..., "param": {...},
     "recall": ..., "scanned_frac": ..., "qps": ..., "build_s": ..., + extras (recall_min, heads, queries, ...)}
then one {"bench": "recall_summary", ...} line per (data, index, k): the smallest fraction of keys scanned that
reaches recall >= 0.95 and its ratio to query_guided's. Everything else goes to stderr. benchmarks/README.md says
how "scanned" is measured for each index.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
INDEX_NAMES = ("query_guided", "flat", "hnswlib", "faiss_ivf", "faiss_hnsw")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small n, few heads, few parameters (< 60 s on 2 cores)")
    ap.add_argument("--json", action="store_true", help="print JSON lines on stdout (else a table)")
    ap.add_argument("--out", default=None, help="directory for the .jsonl results and the .png plot")
    ap.add_argument("--data", default=None, help="comma list of: real,model_qk,synthetic_ood,in_distribution")
    ap.add_argument("--indexes", default=None, help="comma list of " + ",".join(INDEX_NAMES) + " (default: all; a "
                    "baseline whose package is not installed is then left out with a note)")
    ap.add_argument("--k", default="100,10", help="comma list of k (recall@k)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for every index's build and search (default 1: qps per core, comparable)")
    ap.add_argument("--layers", default=None, help="real/model_qk layers, e.g. 1,3,5 (default: all; quick: 1,3)")
    ap.add_argument("--heads", default=None, help="real/model_qk query heads (default: all; quick: 0 and 4)")
    ap.add_argument("--n", type=int, default=None, help="synthetic number of keys (default 16384; quick 4096)")
    ap.add_argument("--d", type=int, default=64, help="synthetic head dim")
    ap.add_argument("--num-synthetic", type=int, default=None, help="synthetic problems per data set (4; quick 1)")
    ap.add_argument("--n-eval", type=int, default=64, help="evaluation queries per problem")
    ap.add_argument("--model-qk", default=None, help="dump from dump_model_qk.py (default: the largest cached one of at most 32768 tokens, the model's trained range)")
    ap.add_argument("--model-qk-keys", type=int, default=None, help="cut model_qk to this many keys (quick: 4096)")
    ap.add_argument("--model-qk-max-train", type=int, default=None, help="subsample model_qk training queries")
    ap.add_argument("--dump-if-missing", action="store_true",
                    help="run dump_model_qk.py when model_qk is requested and no cache exists")
    ap.add_argument("--sharing", default="per_query_head",
                    help="comma list of per_query_head (one index per query head, trained on its own queries) and "
                         "per_kv_head (one index per (layer, kv head) trained on the pooled queries of its GQA group, "
                         "searched by every query head of the group); rows carry a \"sharing\" field")
    ap.add_argument("--kv-max-train", type=int, default=None,
                    help="per_kv_head: subsample the pooled training queries of a group to this many (default: all)")
    ap.add_argument("--train-shift", type=float, default=None, metavar="SHARE",
                    help="real/model_qk: the share of the query-guided graph's training queries moved by RoPE to the first "
                         "evaluation position, spread evenly (default: RetrievalConfig's shift_train_queries, as "
                         "RetrievalCache does; 0: all where they are in the prompt)")
    ap.add_argument("--static-set", default=None, metavar="SINK,WINDOW",
                    help="real/model_qk: index only keys [SINK, n - WINDOW), as RetrievalCache's CPU index holds them "
                         "(the first SINK and last WINDOW keys stay on the model's device); 'default' = RetrievalConfig's "
                         "n_sink,n_window. Recall and keys scanned are then over those keys (default: all keys)")
    ap.add_argument("--degree", type=int, default=32)
    ap.add_argument("--k-train", type=int, default=100)
    ap.add_argument("--qg-args", default="{}", help="extra QueryGuidedIndex kwargs as JSON, e.g. '{\"device\":\"cuda\"}'")
    ap.add_argument("--qg-device", default=None,
                    help="pass keys and training queries on this torch device (cuda: GPU kNN) to QueryGuidedIndex; "
                         "the host->device copy is inside build_s")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=200, help="hnswlib and faiss_hnsw efConstruction")
    ap.add_argument("--nlist", type=int, default=None, help="faiss_ivf lists (default: power of 2 near sqrt(n))")
    ap.add_argument("--hnswlib-sim-queries", type=int, default=None,
                    help="queries per problem replayed to count hnswlib distance computations (default all)")
    ap.add_argument("--target", type=float, default=0.95, help="recall target of the summary lines")
    ap.add_argument("--seed", type=int, default=0)
    # build-time mode
    ap.add_argument("--build-time", action="store_true",
                    help="build-time mode: synthetic OOD workload shaped like Llama-3-8B at 128K (one index per "
                         "(layer, query head) for query_guided, per (layer, kv head) for query-independent indexes)")
    ap.add_argument("--bt-layers", type=int, default=None, help="build-time layers (default 32; quick 1)")
    ap.add_argument("--bt-heads", type=int, default=None, help="build-time query heads per layer (default 32; quick 2)")
    ap.add_argument("--bt-kv-heads", type=int, default=None, help="build-time kv heads per layer (default 8; quick 1)")
    ap.add_argument("--bt-n", type=int, default=None, help="build-time keys per head (default 131072; quick 8192)")
    ap.add_argument("--bt-d", type=int, default=128, help="build-time head dim")
    ap.add_argument("--bt-train", type=int, default=None, help="training queries per head (default: n)")
    ap.add_argument("--bt-indexes", default=None, help="indexes whose build time is measured (default: "
                    "query_guided,hnswlib,faiss_ivf,faiss_hnsw, those installed)")
    ap.add_argument("--bt-budget-s", type=float, default=None,
                    help="per-index time budget; builds left are extrapolated from the mean (reported as such)")
    ap.add_argument("--bt-per-query-head", action="store_true",
                    help="also build query-independent indexes once per query head (not shared per kv head)")
    args = ap.parse_args(argv)
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    # before numpy/torch/faiss create their thread pools
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[v] = str(ARGS.threads)

import numpy as np  # noqa: E402

sys.path.insert(0, HERE)
import qk_data  # noqa: E402


def import_ra():
    """retrieval_attention, or None with a clear message (query_guided and flat are then skipped)."""
    try:
        import retrieval_attention as ra  # noqa: F401
    except Exception as e:  # ImportError, or a broken extension
        log(f"[recall] cannot import retrieval_attention ({type(e).__name__}: {e}); "
            "query_guided and flat are skipped. Build it with `pip install -e .` in the repo root.")
        return None
    missing = [a for a in ("QueryGuidedIndex", "FlatIndex") if not hasattr(ra, a)]
    if missing:
        log(f"[recall] retrieval_attention lacks {missing} (DESIGN.md section 3); those indexes are skipped")
    return ra


# ------------------------------------------------------------------------------------------------ hnswlib replay
class HnswlibReplay:
    """Counts the distance computations of hnswlib 0.8 searches, which its Python API does not expose.

    The index is saved and its graph parsed (hnswlib's save format); each query is then replayed with hnswlib's
    own search algorithm (greedy descent on the upper levels, then searchBaseLayerST with beam max(ef, k) on
    level 0, stopping when the best candidate is worse than the beam's worst), counting every distance computed:
    the entry point, all neighbours examined on upper levels, and every not-yet-visited level-0 neighbour.
    `agreement` = fraction of replayed queries whose result set equals hnswlib's, to show the replay is faithful.
    """

    def __init__(self, index, keys: np.ndarray):
        import struct
        with tempfile.TemporaryDirectory() as td:
            path = os.path.join(td, "h.bin")
            index.save_index(path)
            b = open(path, "rb").read()
        fmt = "<QQQQQQiIQQQdQ"
        (off0, _max_el, cnt, size_per, label_off, data_off, maxlevel, ep, maxM, maxM0, _M, _mult,
         _efc) = struct.unpack_from(fmt, b, 0)
        pos = struct.calcsize(fmt)
        l0 = np.frombuffer(b, dtype=np.uint8, count=cnt * size_per, offset=pos).reshape(cnt, size_per)
        pos += cnt * size_per
        links0 = l0[:, off0:off0 + 4 * (maxM0 + 1)].copy().view(np.uint32)   # (cnt, 1 + maxM0)
        self.cnt0 = (links0[:, 0] & 0xFFFF).astype(np.int64)
        self.nb0 = links0[:, 1:].astype(np.int64)
        self.labels = l0[:, label_off:label_off + 8].copy().view(np.uint64)[:, 0].astype(np.int64)
        size_links = maxM * 4 + 4
        self.upper = {}                                                         # (internal id, level) -> list
        for i in range(cnt):
            (ll,) = struct.unpack_from("<I", b, pos)
            pos += 4
            if ll:
                arr = np.frombuffer(b, dtype=np.uint32, count=ll // 4, offset=pos)
                for lev in range(1, ll // size_links + 1):
                    blk = arr[(lev - 1) * (maxM + 1):lev * (maxM + 1)]
                    self.upper[(i, lev)] = blk[1:1 + (int(blk[0]) & 0xFFFF)].astype(np.int64).tolist()
                pos += ll
        assert pos == len(b), "unexpected hnswlib file layout"
        self.maxlevel, self.ep, self.n = maxlevel, ep, cnt
        self.keys_int = np.ascontiguousarray(keys[self.labels])              # keys in internal order
        self.visited = np.zeros(cnt, dtype=np.int64)
        self.tag = 0

    def search(self, q: np.ndarray, k: int, ef: int):
        import heapq
        dist = (1.0 - self.keys_int @ q).astype(np.float32)                  # hnswlib "ip" distance
        cur = self.ep
        curdist = dist[cur]
        ndis = 1
        for lev in range(self.maxlevel, 0, -1):
            changed = True
            while changed:
                changed = False
                nb = self.upper.get((cur, lev), [])
                ndis += len(nb)
                for c in nb:
                    if dist[c] < curdist:
                        curdist, cur, changed = dist[c], c, True
        ef = max(ef, k)
        self.tag += 1
        tag, vis = self.tag, self.visited
        d0 = float(dist[cur])
        ndis += 1
        vis[cur] = tag
        top = [(-d0, cur)]
        cand = [(d0, cur)]
        lower = d0
        while cand:
            dc, c = cand[0]
            if dc > lower:
                break
            heapq.heappop(cand)
            nb = self.nb0[c, :self.cnt0[c]]
            nb = nb[vis[nb] != tag]
            if len(nb) == 0:
                continue
            vis[nb] = tag
            ndis += len(nb)
            for x, dx in zip(nb.tolist(), dist[nb].tolist()):
                if len(top) < ef or lower > dx:
                    heapq.heappush(cand, (dx, x))
                    heapq.heappush(top, (-dx, x))
                    if len(top) > ef:
                        heapq.heappop(top)
                    lower = -top[0][0]
        best = sorted(top, reverse=True)[:k]
        return self.labels[[x for _, x in best]], ndis


# ------------------------------------------------------------------------------------------------ index adapters
class Adapter:
    """build(problem) -> state; search(state, queries, k, param) -> (ids (m,k) int64, keys scanned per query);
    raw(state, prep(queries), k, param): the index's own search call alone (timed for qps)."""
    name = ""

    def params(self, k, quick, n):
        raise NotImplementedError

    def prep(self, q):
        return q


def _ef_list(k, quick):
    if k >= 100:
        return [100, 200, 400, 800] if quick else [100, 128, 160, 200, 256, 320, 400, 512, 640, 800, 1024, 1600]
    return [10, 32, 100, 400] if quick else [10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 400, 800]


class QueryGuided(Adapter):
    name = "query_guided"

    def __init__(self, ra, args):
        self.ra, self.args = ra, args
        self.extra = json.loads(args.qg_args)

    def params(self, k, quick, n):
        return [{"ef": e} for e in _ef_list(k, quick)]

    def build(self, p):
        import torch
        keys, train = torch.from_numpy(p.keys), torch.from_numpy(p.train_q)
        if self.args.qg_device:  # keys and training queries on e.g. cuda: the bipartite kNN runs there
            keys, train = keys.to(self.args.qg_device), train.to(self.args.qg_device)
        return self.ra.QueryGuidedIndex(keys, train,
                                        degree=self.args.degree, k_train=min(self.args.k_train, p.n), **self.extra)

    def search(self, idx, q, k, param):
        import torch
        ids, _ = self.raw(idx, torch.from_numpy(q), k, param)
        vis = idx.last_search_stats["visited"]
        return _np(ids), _np(vis).astype(np.float64)

    def prep(self, q):
        import torch
        return torch.from_numpy(q)

    def raw(self, idx, q, k, param):
        return idx.search(q, k=k, ef=param["ef"])


class Flat(Adapter):
    name = "flat"

    def __init__(self, ra, args):
        self.ra = ra

    def params(self, k, quick, n):
        return [{}]

    def build(self, p):
        import torch
        return self.ra.FlatIndex(torch.from_numpy(p.keys))

    def search(self, idx, q, k, param):
        import torch
        ids, _ = self.raw(idx, torch.from_numpy(q), k, param)
        st = getattr(idx, "last_search_stats", None) or {}
        vis = _np(st["visited"]).astype(np.float64) if "visited" in st else np.full(len(q), float(idx_size(idx, q)))
        return _np(ids), vis

    def prep(self, q):
        import torch
        return torch.from_numpy(q)

    def raw(self, idx, q, k, param):
        return idx.search(q, k=k)


def idx_size(idx, q):
    for a in ("size", "n", "ntotal"):
        v = getattr(idx, a, None)
        if v is not None:
            return v() if callable(v) else v
    return math.nan


class Hnswlib(Adapter):
    name = "hnswlib"

    def __init__(self, args):
        import hnswlib
        self.hnswlib, self.args = hnswlib, args
        self.agreement = []

    def params(self, k, quick, n):
        return [{"ef": e} for e in _ef_list(k, quick)]

    def build(self, p):
        idx = self.hnswlib.Index(space="ip", dim=p.d)
        idx.init_index(max_elements=p.n, M=self.args.hnsw_m, ef_construction=self.args.ef_construction,
                       random_seed=self.args.seed + 100)
        idx.set_num_threads(self.args.threads)
        idx.add_items(p.keys, np.arange(p.n))
        return [idx, p.keys, None]

    def search(self, state, q, k, param):
        idx, keys, replay = state
        labels, _ = self.raw(state, q, k, param)
        labels = labels.astype(np.int64)
        if replay is None:
            replay = state[2] = HnswlibReplay(idx, keys)
        m = len(q) if self.args.hnswlib_sim_queries is None else min(len(q), self.args.hnswlib_sim_queries)
        nd = []
        for i in range(m):
            ids, c = replay.search(q[i], k, param["ef"])
            nd.append(c)
            self.agreement.append(set(ids.tolist()) == set(labels[i].tolist()))
        return labels, np.asarray(nd, dtype=np.float64)

    def raw(self, state, q, k, param):
        state[0].set_ef(param["ef"])
        return state[0].knn_query(q, k=k, num_threads=self.args.threads)


def _nlist(n, args):
    if args.nlist:
        return args.nlist
    return int(2 ** round(math.log2(max(16.0, math.sqrt(n)))))


class FaissIVF(Adapter):
    name = "faiss_ivf"

    def __init__(self, args):
        import faiss
        self.faiss, self.args = faiss, args

    def params(self, k, quick, n):
        nl = _nlist(n, self.args)
        ps = [1, 4, 8, 16, 32] if quick else [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
        return [{"nprobe": p} for p in ps if p <= nl]

    def build(self, p):
        f = self.faiss
        nl = _nlist(p.n, self.args)
        quant = f.IndexFlatIP(p.d)
        idx = f.IndexIVFFlat(quant, p.d, nl, f.METRIC_INNER_PRODUCT)
        idx.cp.seed = self.args.seed + 1234
        idx.train(p.keys)
        idx.add(p.keys)
        return (idx, quant)  # keep the quantizer alive

    def search(self, state, q, k, param):
        self.faiss.cvar.indexIVF_stats.reset()
        _, ids = self.raw(state, q, k, param)
        return ids.astype(np.int64), np.full(len(q), self.faiss.cvar.indexIVF_stats.ndis / len(q))

    def raw(self, state, q, k, param):
        state[0].nprobe = param["nprobe"]
        return state[0].search(q, k)


class FaissHNSW(Adapter):
    name = "faiss_hnsw"

    def __init__(self, args):
        import faiss
        self.faiss, self.args = faiss, args

    def params(self, k, quick, n):
        return [{"ef": e} for e in _ef_list(k, quick)]

    def build(self, p):
        f = self.faiss
        idx = f.IndexHNSWFlat(p.d, self.args.hnsw_m, f.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = self.args.ef_construction
        idx.add(p.keys)
        return idx

    def search(self, idx, q, k, param):
        self.faiss.cvar.hnsw_stats.reset()
        _, ids = self.raw(idx, q, k, param)
        return ids.astype(np.int64), np.full(len(q), self.faiss.cvar.hnsw_stats.ndis / len(q))

    def raw(self, idx, q, k, param):
        idx.hnsw.efSearch = param["ef"]
        return idx.search(q, k)


def _np(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# the package each baseline index comes from (pip name in brackets where it differs)
BASELINE_PACKAGES = {"hnswlib": ("hnswlib", "hnswlib"), "faiss_ivf": ("faiss", "faiss-cpu"), "faiss_hnsw": ("faiss", "faiss-cpu")}


def index_names(given, default):
    """The indexes to run: `given` (a comma list) when set, where a baseline whose package is missing is an error;
    else `default`, leaving such baselines out with a note."""
    import importlib.util
    names = (given or default).split(",")
    keep = []
    for nm in names:
        module, pip_name = BASELINE_PACKAGES.get(nm, (None, None))
        if module is None or importlib.util.find_spec(module) is not None:
            keep.append(nm)
            continue
        msg = f"{nm} needs the {module} package, which is not installed (pip install {pip_name})"
        if given:
            raise SystemExit(f"{msg}; or leave {nm} out of the index list")
        log(f"note: {msg}: left out")
    return keep


def make_adapters(names, args):
    ra = import_ra() if ({"query_guided", "flat"} & set(names)) else None
    out = []
    for nm in names:
        if nm == "query_guided":
            if ra is not None and hasattr(ra, "QueryGuidedIndex"):
                out.append(QueryGuided(ra, args))
        elif nm == "flat":
            if ra is not None and hasattr(ra, "FlatIndex"):
                out.append(Flat(ra, args))
        elif nm == "hnswlib":
            out.append(Hnswlib(args))
        elif nm == "faiss_ivf":
            out.append(FaissIVF(args))
        elif nm == "faiss_hnsw":
            out.append(FaissHNSW(args))
        else:
            raise SystemExit(f"unknown index {nm!r}; choose from {INDEX_NAMES}")
    return out


# ------------------------------------------------------------------------------------------------ data
def _ints(s):
    return None if s is None else [int(x) for x in s.split(",") if x != ""]


def load_datasets(args):
    names = args.data.split(",") if args.data else list(qk_data.DATA_NAMES)
    layers, heads = _ints(args.layers), _ints(args.heads)
    if args.quick:
        layers = layers if layers is not None else [1, 3]
        heads = heads if heads is not None else [0, 4]
    n = args.n or (4096 if args.quick else 16384)
    num = args.num_synthetic or (1 if args.quick else 4)
    import retrieval_attention as ra

    try:  # RetrievalConfig gives the default share and checks a given one
        cfg = ra.RetrievalConfig(**({} if args.train_shift is None else {"shift_train_queries": args.train_shift}))
    except TypeError as e:
        raise SystemExit(f"--train-shift: {e}")
    train_shift = float(cfg.shift_train_queries)
    static = None
    if args.static_set == "default":
        static = (cfg.n_sink, cfg.n_window)
    elif args.static_set:
        parts = args.static_set.split(",")
        if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
            raise SystemExit(f"--static-set: expected SINK,WINDOW (two integers >= 0) or 'default', got {args.static_set!r}")
        static = (int(parts[0]), int(parts[1]))
    out = {}
    for nm in names:
        t0 = time.perf_counter()
        if nm == "real":
            probs = qk_data.load_real(layers=layers, heads=heads, n_eval=args.n_eval)
            if args.quick:  # layer 3 head 0 (retrieval head) and layer 1 head 4 (diffuse)
                probs = [p for p in probs if p.name in ("L3H0", "L1H4")] or probs[:2]
        elif nm == "model_qk":
            path = args.model_qk or qk_data.find_model_qk_cache()
            if path is None and args.dump_if_missing:
                import dump_model_qk
                path = dump_model_qk.main([])
            if path is None or not os.path.exists(path):
                log("[recall] model_qk: no dump found under benchmarks/results/cache/ -- skipped. Make one with "
                    "`python benchmarks/dump_model_qk.py` (or pass --dump-if-missing / --model-qk PATH).")
                continue
            nk = args.model_qk_keys or (4096 if args.quick else None)
            mt = args.model_qk_max_train or (4096 if args.quick else None)
            probs = qk_data.load_model_qk(path, layers=layers, heads=heads, n_eval=args.n_eval, n_keys=nk,
                                          max_train=mt)
            if args.quick:
                probs = [p for p in probs if p.name in ("L3H0", "L1H4")] or probs[:2]
        elif nm in ("synthetic_ood", "in_distribution"):
            probs = qk_data.make_synthetic(nm, n=n, d=args.d, n_eval=args.n_eval, seed=args.seed, num=num)
        else:
            raise SystemExit(f"unknown data set {nm!r}; choose from {qk_data.DATA_NAMES}")
        if nm in ("real", "model_qk") and train_shift > 0:
            probs = qk_data.shift_train_queries(probs, qk_data.bundled_model_rope(), train_shift)
        if nm in ("real", "model_qk") and static is not None:  # after the shift, which moves queries to the key count
            try:
                probs = [qk_data.cut_static_set(p, *static) for p in probs]
            except ValueError as e:
                raise SystemExit(f"--static-set: {e}")
        p0 = probs[0]
        log(f"[recall] data {nm}: {len(probs)} problem(s), n={p0.n} d={p0.d} train={len(p0.train_q)} "
            f"eval={len(p0.eval_q)}  Mahalanobis(q)/Mahalanobis(k)={qk_data.mahalanobis_ratio(p0):.2f} "
            f"({time.perf_counter() - t0:.1f}s)")
        out[nm] = probs
    return out


# ------------------------------------------------------------------------------------------------ evaluation
def _pooled_problem(group, max_train):
    """One problem for a GQA group: the shared keys and the concatenated training queries of its query heads."""
    train = np.concatenate([p.train_q for p in group])
    if max_train is not None and len(train) > max_train:
        train = train[np.linspace(0, len(train) - 1, max_train).round().astype(np.int64)]
    p0 = group[0]
    name = f"L{p0.meta.get('layer', 0)}KV{p0.meta.get('kv_head', 0)}"
    return qk_data.Problem(name, p0.keys, np.ascontiguousarray(train), p0.eval_q[:0], dict(p0.meta))


def _builds(probs, sharing, args):
    """[(problem to build, [problems searched with that index])] for a sharing mode. per_kv_head groups the
    problems by (layer, kv_head) (from their meta; a problem without one is its own group)."""
    if sharing == "per_query_head":
        return [(p, [p]) for p in probs]
    groups = {}
    for i, p in enumerate(probs):
        key = (p.meta["layer"], p.meta["kv_head"]) if "kv_head" in p.meta and "layer" in p.meta else ("solo", i)
        groups.setdefault(key, []).append(p)
    return [(_pooled_problem(g, args.kv_max_train), g) for g in groups.values()]


def evaluate(datasets, adapters, ks, args):
    rows = []
    sharings = [x for x in (getattr(args, "sharing", None) or "per_query_head").split(",") if x]
    for sh in sharings:
        if sh not in ("per_query_head", "per_kv_head"):
            raise SystemExit(f"unknown --sharing {sh!r}; choose from per_query_head, per_kv_head")
    for dname, probs in datasets.items():
        truth, truth_ids = {}, {}
        for p in probs:
            ids, sc = qk_data.exact_topk(p.keys, p.eval_q, max(ks))
            truth[id(p)], truth_ids[id(p)] = sc, ids
        by_age = dname in ("real", "model_qk")  # key ids are positions there
        for sh in sharings:
            plan = _builds(probs, sh, args)
            for ad in adapters:
                acc = {}  # (k, param json) -> lists
                build = []
                failed = False
                for bp, members in plan:
                    t0 = time.perf_counter()
                    try:
                        state = ad.build(bp)
                    except Exception as e:
                        msg = str(e).replace("\n", " ")
                        log(f"[recall] {dname}/{ad.name}/{bp.name}: build failed, index skipped: {type(e).__name__}: "
                            f"{msg[:400]}{' ...' if len(msg) > 400 else ''}")
                        failed = True
                        break
                    build.append(time.perf_counter() - t0)
                    for p in members:
                        sc = truth[id(p)]
                        for k in ks:
                            for param in ad.params(k, args.quick, p.n):
                                ids, visited = ad.search(state, p.eval_q, k, param)
                                dt = time_search(ad, state, p.eval_q, k, param, 0.01 if args.quick else 0.05)
                                r = qk_data.recall_per_query(ids, p.keys, p.eval_q, sc[:, k - 1], k)
                                a = acc.setdefault((k, json.dumps(param, sort_keys=True)),
                                                   {"rec": [], "scan": [], "t": 0.0, "m": 0, "n": [],
                                                    "age_hit": np.zeros(AGE_BINS), "age_cnt": np.zeros(AGE_BINS)})
                                if by_age:
                                    hit, cnt = recall_by_age(ids, truth_ids[id(p)][:, :k], p.n)
                                    a["age_hit"] += hit
                                    a["age_cnt"] += cnt
                                a["rec"].append(float(r.mean()))
                                a["scan"].append(float(np.mean(visited)) / p.n)
                                a["t"] += dt
                                a["m"] += len(p.eval_q)
                                a["n"].append(p.n)
                    log(f"[recall] {dname}/{ad.name}/{bp.name}{'' if sh == 'per_query_head' else ' (' + sh + ')'}: "
                        f"build {build[-1]:.2f}s, train {len(bp.train_q)}")
                    del state
                if failed or not build:
                    continue
                for (k, pj), a in sorted(acc.items(), key=lambda kv: (-kv[0][0], list(json.loads(kv[0][1]).values()))):
                    row = {
                        "bench": "recall", "data": dname, "index": ad.name,
                        "n": int(round(float(np.mean(a["n"])))), "d": int(probs[0].d), "k": int(k),
                        "param": json.loads(pj),
                        "recall": round(float(np.mean(a["rec"])), 4),
                        "scanned_frac": round(float(np.mean(a["scan"])), 5),
                        "qps": round(a["m"] / a["t"], 1) if a["t"] > 0 else None,
                        "build_s": round(float(np.mean(build)), 4),
                        "recall_min": round(float(np.min(a["rec"])), 4),
                        "heads": len(probs), "queries": int(a["m"]), "threads": args.threads,
                        "train_queries": int(np.mean([len(bp.train_q) for bp, _ in plan])) if ad.name == "query_guided"
                        else 0,
                    }
                    if "n_sink" in probs[0].meta:  # --static-set: the keys are the CPU index's only
                        row["static_set"] = [probs[0].meta["n_sink"], probs[0].meta["n_window"]]
                    if ad.name == "query_guided":
                        row["train_shifted"] = float(plan[0][0].meta.get("train_shifted", 0.0))
                    if by_age:
                        row["recall_by_age"] = [round(float(h / c), 4) if c else None
                                                for h, c in zip(a["age_hit"], a["age_cnt"])]
                    if len(sharings) > 1 or sh != "per_query_head":
                        # build_s is per index; build_s_total covers all indexes of the data set
                        row.update({"sharing": sh, "indexes_built": len(build),
                                    "build_s_total": round(float(np.sum(build)), 3)})
                    rows.append(row)
                if isinstance(ad, Hnswlib) and ad.agreement:
                    log(f"[recall] hnswlib replay agreement with hnswlib results: {np.mean(ad.agreement):.3f} "
                        f"({len(ad.agreement)} searches)")
                    ad.agreement = []
    return rows


AGE_BINS = 5


def recall_by_age(found, true_ids, n):
    """Recall split by where the true top-k keys lie in the sequence: AGE_BINS equal slices of the key positions
    0..n-1, oldest first. -> (hits, counts) per slice. The overall recall is dominated by the recent keys a
    decode query mostly attends to; the old ones (a needle far back) are the ones retrieval exists for."""
    found = np.asarray(found)
    hits, cnt = np.zeros(AGE_BINS), np.zeros(AGE_BINS)
    for f, t in zip(found, np.asarray(true_ids)):
        got = np.isin(t, f)
        b = np.minimum(t * AGE_BINS // n, AGE_BINS - 1)
        np.add.at(hits, b, got)
        np.add.at(cnt, b, 1)
    return hits, cnt


def time_search(ad, state, q, k, param, min_s):
    """Seconds per batch of the index's own search call alone (no stats, no replay, no conversions): the batch
    is searched repeatedly until min_s has passed (at least twice; the first call above was the warm-up)."""
    qq = ad.prep(q)
    reps, t0 = 0, time.perf_counter()
    while True:
        ad.raw(state, qq, k, param)
        reps += 1
        el = time.perf_counter() - t0
        if reps >= 2 and el >= min_s:
            return el / reps


def summarize(rows, target):
    """Smallest scanned_frac reaching recall >= target per (data, index, k): `scanned_frac_at_target` is linear
    interpolation in log(scanned_frac) between the last sweep point below the target and the first at/above it
    (sweep points sorted by scanned_frac); `scanned_frac_measured` is that first measured point. null if never
    reached. `ratio_vs_query_guided` = this index's interpolated value / query_guided's."""
    groups = {}
    for r in rows:
        groups.setdefault((r["data"], r["index"], r["k"], r.get("sharing")), []).append(r)
    out = []
    for (dname, iname, k, sharing), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["scanned_frac"])
        interp = meas = None
        how = None
        best = max(r["recall"] for r in rs)
        for i, r in enumerate(rs):
            if r["recall"] >= target:
                meas = r["scanned_frac"]
                prev = [x for x in rs[:i] if x["recall"] < target]
                if prev and prev[-1]["scanned_frac"] > 0 and meas > 0:
                    a, b = prev[-1], r
                    t = (target - a["recall"]) / (b["recall"] - a["recall"])
                    interp = math.exp(math.log(a["scanned_frac"]) + t * (math.log(b["scanned_frac"]) -
                                                                         math.log(a["scanned_frac"])))
                    how = "log-linear"
                else:
                    interp = meas
                    how = "none: the smallest sweep point already reaches the target (an upper bound)"
                break
        line = {"bench": "recall_summary", "data": dname, "index": iname, "k": k, "target_recall": target,
                "scanned_frac_at_target": None if interp is None else round(interp, 5),
                "scanned_frac_measured": meas, "best_recall": best, "interpolation": how,
                "build_s": rs[0]["build_s"]}
        if "static_set" in rs[0]:
            line["static_set"] = rs[0]["static_set"]
        if sharing is not None:
            line.update({"sharing": sharing, "build_s_total": rs[0]["build_s_total"]})
        out.append(line)
    for s in out:
        qg = next((x for x in out if x["data"] == s["data"] and x["k"] == s["k"] and x["index"] == "query_guided"
                   and x.get("sharing") == s.get("sharing")), None)
        if qg and qg["scanned_frac_at_target"] and s["scanned_frac_at_target"]:
            s["ratio_vs_query_guided"] = round(s["scanned_frac_at_target"] / qg["scanned_frac_at_target"], 3)
        else:
            s["ratio_vs_query_guided"] = None
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datas = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(datas), figsize=(5.2 * len(datas), 4.2), squeeze=False)
    colors = dict(zip(INDEX_NAMES, ["C3", "k", "C0", "C2", "C1"]))
    for ax, dn in zip(axes[0], datas):
        for iname in INDEX_NAMES:
            for sh in dict.fromkeys(r.get("sharing") for r in rows):
                for k, ls in ((100, "-"), (10, ":")):
                    rs = sorted([r for r in rows if r["data"] == dn and r["index"] == iname and r["k"] == k
                                 and r.get("sharing") == sh], key=lambda r: r["scanned_frac"])
                    if not rs:
                        continue
                    ax.plot([r["scanned_frac"] for r in rs], [r["recall"] for r in rs], ls, marker="o" if sh !=
                            "per_kv_head" else "x", ms=3, color=colors[iname],
                            label=f"{iname} @{k}" + (f" {sh}" if sh else ""))
        r0 = next(r for r in rows if r["data"] == dn)
        ax.axhline(0.95, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("fraction of keys scanned")
        ax.set_ylabel("recall@k")
        ax.set_title(f"{dn} (n={r0['n']}, d={r0['d']}, {r0['heads']} heads)")
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ build time
def build_time(args, emit):
    """Build all indexes of an 8B-shaped synthetic OOD workload and report build time per index type."""
    q = args.quick
    L = args.bt_layers or (1 if q else 32)
    H = args.bt_heads or (2 if q else 32)
    KV = args.bt_kv_heads or (1 if q else 8)
    n = args.bt_n or (8192 if q else 131072)
    d = args.bt_d
    m = args.bt_train or n
    if H % KV:
        raise SystemExit("--bt-heads must be a multiple of --bt-kv-heads")
    names = index_names(args.bt_indexes, "query_guided,hnswlib,faiss_ivf,faiss_hnsw")
    adapters = make_adapters(names, args)
    device = _device_str()
    log(f"[build_time] {L} layers x {H} query heads ({KV} kv heads), n={n}, d={d}, train={m}, "
        f"threads={args.threads}, device={device}")
    for ad in adapters:
        per_q = ad.name == "query_guided" or args.bt_per_query_head
        units = [(l, h) for l in range(L) for h in range(H if per_q else KV)]
        times, gen_s = [], 0.0
        t_start = time.perf_counter()
        for (l, h) in units:
            if args.bt_budget_s is not None and times and time.perf_counter() - t_start > args.bt_budget_s:
                break
            t0 = time.perf_counter()
            kv = h // (H // KV) if per_q else h
            gen = qk_data.SyntheticQK(d, seed=10007 * args.seed + 100 * l + kv)
            rng = np.random.default_rng([args.seed, l, kv])
            keys = gen.keys(n, rng)
            train = np.zeros((0, d), np.float32)
            if ad.name == "query_guided":
                v = np.random.default_rng([args.seed, l, h, 1]).standard_normal(d)   # per-head query mean
                v -= (v @ gen.mu_k) / (gen.mu_k @ gen.mu_k) * gen.mu_k
                gen.mu_q = np.linalg.norm(gen.mu_q) * v / np.linalg.norm(v)
                train = gen.queries(m, np.random.default_rng([args.seed, l, h, 2]))
            prob = qk_data.Problem(f"L{l}H{h}", keys, train, train[:0])
            gen_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                state = ad.build(prob)
            except Exception as e:
                msg = str(e).replace("\n", " ")
                log(f"[build_time] {ad.name}: build failed, index skipped: {type(e).__name__}: {msg[:400]}")
                times = []
                break
            times.append(time.perf_counter() - t0)
            del state
            log(f"[build_time] {ad.name} L{l} {'H' if per_q else 'KV'}{h}: {times[-1]:.2f}s")
        done = len(times)
        if not done:
            continue
        emit({"bench": "build_time", "index": ad.name, "data": "synthetic_ood", "layers": L, "q_heads": H,
              "kv_heads": KV, "n": n, "d": d, "train_queries": m if ad.name == "query_guided" else 0,
              "per": "query_head" if per_q else "kv_head", "builds": len(units), "builds_done": done,
              "build_s_mean": round(float(np.mean(times)), 4), "build_s_max": round(float(np.max(times)), 4),
              "total_s": round(float(np.sum(times)), 3) if done == len(units) else None,
              "total_s_extrapolated": round(float(np.mean(times)) * len(units), 3),
              "threads": args.threads, "device": device, "datagen_s": round(gen_s, 2)})


def _device_str():
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return f"cpu ({os.cpu_count()} cores)"


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    args = ARGS if argv is None and ARGS is not None else parse_args(argv)
    t_all = time.perf_counter()
    lines = []

    def emit(obj):
        lines.append(obj)
        if args.json:
            print(json.dumps(obj), flush=True)

    try:
        import faiss
        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        pass

    if args.build_time:
        build_time(args, emit)
        prefix = "build_time_quick" if args.quick else "build_time"
    else:
        ks = sorted(set(int(x) for x in args.k.split(",")), reverse=True)
        datasets = load_datasets(args)
        adapters = make_adapters(index_names(args.indexes, ",".join(INDEX_NAMES)), args)
        rows = evaluate(datasets, adapters, ks, args)
        for r in rows:
            emit(r)
        for s in summarize(rows, args.target):
            emit(s)
        if not args.json:
            print(f"{'data':16s} {'index':13s} {'k':>4s} {'param':>16s} {'recall':>7s} {'scanned':>8s} "
                  f"{'qps':>9s} {'build_s':>8s}")
            for r in rows:
                print(f"{r['data']:16s} {r['index']:13s} {r['k']:4d} {json.dumps(r['param']):>16s} "
                      f"{r['recall']:7.3f} {r['scanned_frac']:8.4f} {r['qps']:9.1f} {r['build_s']:8.3f}")
            for s in summarize(rows, args.target):
                print(json.dumps(s))
        prefix = "recall_quick" if args.quick else "recall"
        if args.out and rows:
            os.makedirs(args.out, exist_ok=True)
            plot(rows, os.path.join(args.out, prefix + ".png"))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, prefix + ".jsonl"), "w") as f:
            for o in lines:
                f.write(json.dumps(o) + "\n")
        log(f"[recall] wrote {args.out}/{prefix}.jsonl" + ("" if args.build_time else f" and {prefix}.png"))
    log(f"[recall] done in {time.perf_counter() - t_all:.1f}s")
    return lines


if __name__ == "__main__":
    main()
