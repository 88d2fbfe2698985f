"""Query/key data sets shared by the benchmarks (recall.py, build-time mode, ...).

Every data set is a list of :class:`Problem` objects, one per (layer, query head) or per synthetic draw.
A problem is one maximum-inner-product search task:

    keys     (n, d) float32   the vectors an index is built over (the CPU part of one head's KV cache)
    train_q  (m, d) float32   training queries for query-guided indexes (prefill queries; never eval_q)
    eval_q   (e, d) float32   evaluation queries (decode-like: the last positions of the input)

Data sets (names as in DESIGN.md section 6):

    real            data/qk/qk_passkey.npz (in the project; copied from shared/data/qk): 8192-token passkey input
                    of the bundled model. keys = positions < 8128 (8128 keys), eval queries = the 64 queries at
                    positions 8128..8191, training queries = the q_sample queries at positions 127, 255, ..., 8063
                    (every 128th position; 63 of them -- the file holds no other queries, so the query-guided
                    index gets only 63 training queries per head here. See model_qk for the realistic setting).
    model_qk        the bundled model's own post-RoPE Q/K on a longer natural-text passkey input, cached by
                    benchmarks/dump_model_qk.py under benchmarks/results/cache/. keys = positions < T-64,
                    eval queries = the last 64 positions, training queries = prefill queries at positions < T-64
                    (optionally subsampled with a stride).
    synthetic_ood   keys ~ Gaussian mixture around mu_k with anisotropic covariance; queries ~ Gaussian with a
                    different mean (orthogonal to mu_k), a different rotation and a steeper spectrum concentrated
                    where keys vary least -> queries are far (Mahalanobis) from the key distribution, as in attention.
    in_distribution control: queries (train and eval) are fresh draws from the key distribution.

GQA: query head h of the bundled model uses kv head h // 3 (6 query heads, 2 kv heads).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_NPZ = os.path.join(REPO, "data", "qk", "qk_passkey.npz")
CACHE_DIR = os.path.join(REPO, "benchmarks", "results", "cache")
DATA_NAMES = ("real", "model_qk", "synthetic_ood", "in_distribution")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


@dataclass
class Problem:
    name: str
    keys: np.ndarray
    train_q: np.ndarray
    eval_q: np.ndarray
    meta: dict = field(default_factory=dict)
    train_pos: np.ndarray | None = None  # positions of the training queries (dumps of the bundled model)

    @property
    def n(self):
        return self.keys.shape[0]

    @property
    def d(self):
        return self.keys.shape[1]


def _f32(x):
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _head_problems(K, Q, key_end, train_idx, eval_idx, layers, heads, meta, train_pos=None):
    """One Problem per (layer, query head): keys [0, key_end) of its kv head (GQA), training and evaluation queries
    (train_pos: the training queries' positions)."""
    n_layers, n_kv = K.shape[:2]
    n_q = Q.shape[1]
    group = n_q // n_kv
    out = []
    for l in (range(n_layers) if layers is None else layers):
        for h in (range(n_q) if heads is None else heads):
            out.append(Problem(
                name=f"L{l}H{h}",
                keys=_f32(K[l, h // group, :key_end]),
                train_q=_f32(Q[l, h, train_idx]),
                eval_q=_f32(Q[l, h, eval_idx]),
                meta={"layer": int(l), "head": int(h), "kv_head": int(h // group), **meta},
                train_pos=train_pos,
            ))
    return out


# ----------------------------------------------------------------------------------------------- real
def load_real(path: str | None = None, layers=None, heads=None, n_eval: int = 64) -> list[Problem]:
    """One problem per (layer, query head) of data/qk/qk_passkey.npz (see module docstring)."""
    path = path or REAL_NPZ
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (copy shared/data/qk/qk_passkey.npz to data/qk/)")
    z = np.load(path)
    keys, qs, pos = z["keys"], z["q_sample"], z["q_sample_pos"].astype(np.int64)
    T = keys.shape[2]
    eval_sel = np.arange(len(pos) - n_eval, len(pos))           # the last n_eval sampled positions
    first_eval_pos = int(pos[eval_sel[0]])
    assert np.all(np.diff(pos[eval_sel]) == 1), "expected contiguous last positions in q_sample_pos"
    train_sel = np.nonzero(pos < first_eval_pos)[0]             # every-128th positions before the eval block
    return _head_problems(keys, qs, first_eval_pos, train_sel, eval_sel, layers, heads,
                          {"T": int(T), "train_positions": "every 128th < %d" % first_eval_pos}, train_pos=pos[train_sel])


# ----------------------------------------------------------------------------------------------- model_qk
def default_model_qk_path(T: int = 16384) -> str:
    return os.path.join(CACHE_DIR, f"model_qk_T{T}.npz")


MODEL_TRAINED_TOKENS = 32768  # the bundled model's trained context: dumps beyond it are used only when asked for


def find_model_qk_cache() -> str | None:
    """The largest cached dump under benchmarks/results/cache/ within the model's trained context, or None."""
    if not os.path.isdir(CACHE_DIR):
        return None
    sizes = {}
    for f in os.listdir(CACHE_DIR):
        t = f[len("model_qk_T"):-len(".npz")]
        if f.startswith("model_qk_T") and f.endswith(".npz") and t.isdigit() and int(t) <= MODEL_TRAINED_TOKENS:
            sizes[int(t)] = f
    return os.path.join(CACHE_DIR, sizes[max(sizes)]) if sizes else None


def load_model_qk(path: str, layers=None, heads=None, n_eval: int = 64, n_keys: int | None = None,
                  train_stride: int = 1, max_train: int | None = None) -> list[Problem]:
    """One problem per (layer, query head) of a dump written by dump_model_qk.py.

    The dump holds q[L, Hq, P, d] at positions q_pos[P] (all positions, or a subsample that always includes the
    last 64) and k[L, Hkv, T, d] for all positions. With n_keys=N the problem is cut to a prefix: keys = positions
    < N and eval queries = positions N..N+n_eval-1 (valid because attention is causal: those queries never see
    later keys); if the dump's queries are subsampled, N moves up to the first run of n_eval stored positions.
    Default: N = T - n_eval, or for a dump with generated tokens (dump_model_qk.py --decode) the prompt's length, so
    that the evaluation queries are the first n_eval decode queries and the whole prompt trains the graph.
    """
    z = np.load(path)
    K, Q, qpos = z["k"], z["q"], z["q_pos"].astype(np.int64)
    T = K.shape[2]
    decode = json.loads(str(z["meta"])).get("decode_tokens", 0) if "meta" in z.files else 0
    if decode and n_keys is None:
        if n_eval > decode:
            raise ValueError(f"n_eval={n_eval} > the dump's {decode} decode tokens")
        n_keys = T - decode
    N = T - n_eval if n_keys is None else int(n_keys)
    if N + n_eval > T:
        raise ValueError(f"n_keys={N} + n_eval={n_eval} > T={T}")
    where = {int(p): i for i, p in enumerate(qpos)}
    if n_keys is not None and not all(p in where for p in range(N, N + n_eval)):
        # a dump with subsampled queries (--q-stride): cut at the first run of n_eval stored positions from N on
        # (there is one: the dump keeps the last 64 positions)
        N = next((int(p) for p in sorted(where) if p >= N and all(x in where for x in range(p, p + n_eval))), N)
    eval_idx = []
    for p in range(N, N + n_eval):
        if p not in where:
            raise ValueError(f"position {p} not in the dump's q_pos (dump with a finer --q-stride)")
        eval_idx.append(where[p])
    train_idx = np.nonzero(qpos < N)[0][::max(1, train_stride)]
    if max_train is not None and len(train_idx) > max_train:
        train_idx = train_idx[np.linspace(0, len(train_idx) - 1, max_train).round().astype(np.int64)]
    return _head_problems(K, Q, N, train_idx, eval_idx, layers, heads, {"T": int(T), "source": os.path.basename(path)},
                          train_pos=qpos[train_idx])


def cut_static_set(p: Problem, n_sink: int, n_window: int) -> Problem:
    """The problem as the cache's CPU index sees it: keys [n_sink, n - n_window) only (the first n_sink and the last
    n_window keys stay on the model's device and are attended exactly), queries unchanged. Key ids shift by -n_sink."""
    if n_sink < 0 or n_window < 0 or n_sink + n_window >= p.n:
        raise ValueError(f"static set of {n_sink} + {n_window} keys leaves no keys of {p.n} to index")
    return Problem(name=p.name, keys=p.keys[n_sink:p.n - n_window], train_q=p.train_q, eval_q=p.eval_q,
                   meta={**p.meta, "n_sink": n_sink, "n_window": n_window}, train_pos=p.train_pos)


def bundled_model_rope():
    """(d/2,) float64 RoPE inverse frequencies of the bundled model (the source of the real and model_qk dumps)."""
    from transformers import AutoConfig

    from retrieval_attention.compat import rope_inv_freq

    return rope_inv_freq(AutoConfig.from_pretrained(os.path.join(REPO, "models", "tinyllama-byte-32k")))


def shift_train_queries(probs: list[Problem], inv_freq, share: float = 1.0) -> list[Problem]:
    """A share of each problem's training queries (index.shifted_rows: spread evenly) moved by RoPE to the position of
    its first evaluation query (= its key count: the keys are the positions before it), as RetrievalCache does with a
    prompt's queries (RetrievalConfig.shift_train_queries). Problems without train_pos are returned as they are."""
    import torch

    from retrieval_attention.index import rope_shift, shifted_rows

    out = []
    for p in probs:
        if p.train_pos is None or share <= 0:
            out.append(p)
            continue
        pos = torch.from_numpy(np.asarray(p.train_pos, dtype=np.int64))
        delta = torch.where(shifted_rows(pos.numel(), share), p.n - pos, 0)
        moved = rope_shift(torch.from_numpy(p.train_q), delta, inv_freq).numpy()
        out.append(Problem(p.name, p.keys, np.ascontiguousarray(moved), p.eval_q, {**p.meta, "train_shifted": share}, p.train_pos))
    return out


# ----------------------------------------------------------------------------------------------- synthetic
def _rotation(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


class SyntheticQK:
    """Key and query distributions of one synthetic head (float64 parameters, float32 samples).

    keys: a mixture of `clusters` Gaussians. Overall covariance Sk = Rk diag(lk) Rk^T with lk_i ~ 1/i (total
    variance `var`), mean mu_k with |mu_k| = mean_norm; a fraction `cluster_frac` of the variance is between
    cluster centres, the rest within clusters.
    ood queries: mean mu_q (|mu_q| = q_mean_norm, orthogonal to mu_k) plus a Gaussian whose covariance lives in the
    keys' *least* varying directions (Rk reversed) with a steep spectrum lq_i ~ i^-1.5 (total variance q_var).
    So queries are far from the key distribution (Mahalanobis to the keys ~5x that of held-out keys; the bundled
    model's real heads show 1.2-2x, but their keys also carry a large common offset) and their top keys lie at the
    edge of the key cloud, where key-key proximity graphs navigate badly. Tuned so that faiss HNSW (M=32) needs
    ~1/3 of the keys scanned for recall@100 = 0.95 at n=8192, d=64, like the real data (PAPER_NOTES.md), while
    in-distribution queries need ~12%.
    in-distribution queries: fresh draws from the key mixture (the control).
    """

    def __init__(self, d: int, seed: int, clusters: int = 256, cluster_frac: float = 0.9, mean_norm: float = 8.0,
                 var: float = 100.0, q_mean_norm: float = 4.0, q_var: float = 540.0):
        rng = np.random.default_rng(seed)
        self.d = d
        self.cluster_frac = cluster_frac
        Rk = _rotation(rng, d)
        lk = 1.0 / np.arange(1, d + 1)
        lk *= var / lk.sum()
        self.Ak = Rk * np.sqrt(lk)                       # x = Ak z  -> cov Rk diag(lk) Rk^T
        u = rng.standard_normal(d)
        self.mu_k = mean_norm * u / np.linalg.norm(u)
        v = rng.standard_normal(d)
        v -= (v @ self.mu_k) / (self.mu_k @ self.mu_k) * self.mu_k
        self.mu_q = q_mean_norm * v / np.linalg.norm(v)
        lq = 1.0 / np.arange(1, d + 1) ** 1.5
        lq *= q_var / lq.sum()
        self.Aq = Rk[:, ::-1] * np.sqrt(lq)
        self.centers = self.mu_k + (rng.standard_normal((clusters, d)) @ self.Ak.T) * np.sqrt(cluster_frac)

    def keys(self, n, rng):
        c = rng.integers(0, len(self.centers), n)
        noise = rng.standard_normal((n, self.d)) @ self.Ak.T
        return _f32(self.centers[c] + noise * np.sqrt(1.0 - self.cluster_frac))

    def queries(self, m, rng, ood=True):
        if not ood:
            return self.keys(m, rng)
        return _f32(self.mu_q + rng.standard_normal((m, self.d)) @ self.Aq.T)


def make_synthetic(kind: str, n: int, d: int = 64, m_train: int | None = None, n_eval: int = 64,
                   seed: int = 0, num: int = 1) -> list[Problem]:
    """`num` independent synthetic problems ("synthetic_ood" or "in_distribution"). m_train defaults to n
    (one prefill query per key, as in attention)."""
    if kind not in ("synthetic_ood", "in_distribution"):
        raise ValueError(kind)
    m_train = n if m_train is None else m_train
    out = []
    for i in range(num):
        gen = SyntheticQK(d, seed=1000 * seed + i)
        rng = np.random.default_rng(7919 * seed + i + 1)
        ood = kind == "synthetic_ood"
        out.append(Problem(
            name=f"S{i}",
            keys=gen.keys(n, rng),
            train_q=gen.queries(m_train, rng, ood=ood),
            eval_q=gen.queries(n_eval, rng, ood=ood),
            meta={"seed": 1000 * seed + i},
        ))
    return out


# ----------------------------------------------------------------------------------------------- ground truth
def exact_topk(keys: np.ndarray, queries: np.ndarray, k: int):
    """Exact maximum-inner-product top-k (float32 GEMM): ids (m, k) int64 sorted by descending score, scores."""
    s = queries @ keys.T
    k = min(k, keys.shape[0])
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    ps = np.take_along_axis(s, part, 1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(part, order, 1).astype(np.int64), np.take_along_axis(ps, order, 1)


def recall_per_query(found_ids: np.ndarray, keys: np.ndarray, queries: np.ndarray, kth_score: np.ndarray,
                     k: int) -> np.ndarray:
    """Tie-tolerant recall@k per query: the fraction of the k slots holding a *distinct, valid* id whose exact
    score is >= the exact k-th best score (minus 1e-5 relative slack for float rounding). Equal to
    |found ∩ exact top-k| / k when there are no ties at the k-th score."""
    found_ids = np.asarray(found_ids)[:, :k]
    r = np.zeros(len(queries))
    n = keys.shape[0]
    for i in range(len(queries)):
        ids = found_ids[i]
        ids = np.unique(ids[(ids >= 0) & (ids < n)])
        if len(ids) == 0:
            continue
        s = keys[ids] @ queries[i]
        tol = 1e-5 * max(1.0, abs(float(kth_score[i])))
        r[i] = np.count_nonzero(s >= kth_score[i] - tol) / k
    return r


def mahalanobis_ratio(p: Problem, sample: int = 256) -> float:
    """Mean Mahalanobis distance (to the key distribution) of eval queries / of keys. ~1 in distribution."""
    k = p.keys.astype(np.float64)
    mu = k.mean(0)
    C = np.cov(k.T) + 1e-6 * np.eye(p.d)
    Ci = np.linalg.inv(C)
    md = lambda x: np.sqrt(np.einsum("ij,jk,ik->i", x - mu, Ci, x - mu)).mean()
    return float(md(p.eval_q.astype(np.float64)) / md(k[:: max(1, len(k) // sample)]))


# ---------------------------------------------------------------------------------------- dev-script frontiers
def frontier_arg_parser(description: str | None = None):
    """The arguments the dev recall scripts share: --model-qk DUMP, --layers, --heads, --efs (beams swept), --target
    (recall at which the summaries read the fraction scanned) and --threads."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model-qk", required=True)
    ap.add_argument("--layers", default="1,3,5")
    ap.add_argument("--heads", default="0,4")
    ap.add_argument("--efs", default="100,128,160,200,256,320,400")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def search_recall(index, problem: Problem, kth_scores: np.ndarray, ef: int, k: int = 100) -> tuple[float, float]:
    """(mean recall@k, mean fraction of keys scanned) of index.search over the problem's evaluation queries at beam ef
    (kth_scores: each query's exact k-th best score, so ties count as found)."""
    import torch

    ids, _ = index.search(torch.from_numpy(problem.eval_q), k, ef)
    rec = float(recall_per_query(ids.numpy(), problem.keys, problem.eval_q, kth_scores, k).mean())
    return rec, float(index.last_search_stats["scanned_frac"])


def print_frontier_summaries(curves: dict, target: float) -> None:
    """curves {variant: {ef: [(recall, scanned_frac) per head]}} -> one JSON line per variant: the head-mean curve and
    the fraction scanned at `target` recall, linearly interpolated between the beams around it (None if not bracketed)."""
    import json

    for name, by_ef in curves.items():
        pts = sorted((float(np.mean([r for r, _ in v])), float(np.mean([s for _, s in v]))) for v in by_ef.values())
        at = None
        for (r0, s0), (r1, s1) in zip(pts, pts[1:]):
            if r0 < target <= r1:
                at = s0 + (s1 - s0) * (target - r0) / (r1 - r0)
        print(json.dumps({"summary": name, "scanned_frac_at_target": None if at is None else round(at, 5),
                          "curve": [(round(r, 4), round(s, 5)) for r, s in pts]}), flush=True)
