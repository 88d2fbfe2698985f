#!/usr/bin/env python
"""Long-context retrieval accuracy of RetrievalAttention and baselines on the bundled tinyllama-byte-32k.

    python benchmarks/accuracy.py --quick --json --out /tmp/acc            # < 60 s on a 2-core CPU
    python benchmarks/accuracy.py --json --out benchmarks/results/accuracy  # full run (needs a GPU)
    python benchmarks/accuracy.py --json --contexts 16384,32768 --samples 20 --tasks passkey,kv \\
        --methods full,retrieval_attention,flat_topk --out /tmp/acc     # a subset

Tasks (benchmarks/tasks.py, prompt formats of the model's EVAL.md, haystack from text on the machine): passkey,
kv (16 keys), niah (one magic-number needle, depth sweep), niah_multi (4 needles, query one). Scoring: greedy
decoding, exact match of the answer digits.

Methods, all through the same HF path (model loaded with attn_implementation="retrieval_attention"):
    full                 a plain DynamicCache: exact attention over everything
    retrieval_attention  RetrievalCache, index="query_guided", default RetrievalConfig (128 sink + 512 window, top-100)
    flat_topk            RetrievalCache, index="flat", top_k=100: exact top-k (the upper bound of any top-k retrieval)
    ivf_topk             faiss IndexIVFFlat (inner product) per kv head over the CPU keys, top-100, nprobe set so the
                         fraction of keys scanned matches retrieval_attention's in the same cell
    quest                Quest (Tang et al., ICML 2024): pages of 16 CPU keys, per-page min/max, top pages by the
                         upper bound sum_i max(q_i min_i, q_i max_i) until top_k tokens
    static_only          only the static set (sink + window): the CPU part contributes nothing (StreamingLLM-like)

One JSON line per (task, context, method) on stdout with --json (DESIGN.md section 6):
    {"bench": "accuracy", "task": "passkey", "context": 4096, "method": "flat_topk", "accuracy": 1.0,
     "samples": 50, "scanned_frac": 0.29, + extras (correct, depth_thirds, seconds, index_sharing (methods using a
     RetrievalCache; --index-sharing), ...)}
and one line per (context, method) of the teacher-forced natural-text analysis:
    {"bench": "accuracy_kl", "context": 4096, "method": ..., "kl": ..., "tokens": ..., "scanned_frac": ...,
     "topk_mass_ratio": ..., "cpu_mass_recovered": ...}
  kl: mean KL(full || method) of the next-token distributions (nats/token) while feeding a natural-text
      continuation token by token through the method's cache after prefilling `context` tokens.
  topk_mass_ratio: per (layer, head, step), the softmax mass (over CPU keys) of the keys the method attended to,
      divided by the mass of the exact top-`top_k` CPU keys; averaged (1.0 = as good as exact top-k).
  cpu_mass_recovered: the same mass divided by the mass of all CPU keys (the paper's "recovery ratio", CPU part).
"scanned" = keys whose score was computed per query / CPU keys, from RetrievalCache.summary(): the graph's visited
keys, faiss IVF's `ndis` (keys in the probed lists; the centroid scan is not counted), Quest's page bounds
counted as 2 key-vectors per page. full = 1.0 by definition. Everything else goes to stderr; --out DIR gets
accuracy.jsonl, accuracy.md (tables) and accuracy.png.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import tasks as T  # noqa: E402

METHODS = ("full", "retrieval_attention", "flat_topk", "ivf_topk", "quest", "static_only")
QUICK_METHODS = ["full", "retrieval_attention", "flat_topk", "static_only"]
# chance level of an exact-match answer: the answers are random 5-7 digit numbers, so a guess is right ~1e-5 of the time
CHANCE = 0.0
QUEST_PAGE = 16


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def short(exc: BaseException, n: int = 300) -> str:
    s = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return s if len(s) <= n else s[:n] + "..."


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1K-2K contexts, 2 samples, 2 tasks, 4 methods, KL at 1K over 4 tokens (< 60 s on 2 CPU cores)")
    ap.add_argument("--json", action="store_true", help="print JSON lines on stdout (else a table)")
    ap.add_argument("--out", default=None, help="directory for accuracy.jsonl, accuracy.md and accuracy.png")
    ap.add_argument("--model", default=os.path.join(REPO, "models", "tinyllama-byte-32k"))
    ap.add_argument("--contexts", default=None, help="comma list of prompt lengths in tokens (default 1024..32768)")
    ap.add_argument("--samples", type=int, default=None, help="samples per (task, context) cell (default 50)")
    ap.add_argument("--tasks", default=None, help="comma list of " + ",".join(T.TASKS))
    ap.add_argument("--methods", default=None, help="comma list of " + ",".join(METHODS))
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu), float32 or bfloat16")
    ap.add_argument("--batch", type=int, default=None, help="samples per forward (default 8 on cuda, 1 on cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch/faiss CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-sink", type=int, default=None)
    ap.add_argument("--n-window", type=int, default=None)
    ap.add_argument("--top-k", type=int, default=None, help="top_k of every retrieval method (default: RetrievalConfig's)")
    ap.add_argument("--ef", type=int, default=None, help="graph search beam of retrieval_attention (default: RetrievalConfig's automatic beam, which grows with the CPU keys)")
    ap.add_argument("--index-sharing", default=None, choices=("per_query_head", "per_kv_head"),
                    help="RetrievalConfig.index_sharing of every RetrievalCache method (default: RetrievalConfig's)")
    ap.add_argument("--train-shift", type=float, default=None, metavar="SHARE",
                    help="retrieval_attention: RetrievalConfig.shift_train_queries, the share of the graphs' training "
                         "queries moved by RoPE to the first decode position (default: the config's default; 0: none)")
    ap.add_argument("--ivf-nlist", type=int, default=None, help="IVF lists per head (default: power of 2 near sqrt(n), >= 16)")
    ap.add_argument("--ivf-scan-frac", type=float, default=None,
                    help="target scanned fraction for ivf_topk (default: retrieval_attention's measured value in the same "
                         "cell; 0.1 when retrieval_attention did not run)")
    ap.add_argument("--kl-contexts", default=None, help="contexts of the natural-text KL analysis (default: 2048,8192; "
                                                        "quick: 1024; 'none' to skip)")
    ap.add_argument("--kl-tokens", type=int, default=None, help="teacher-forced continuation tokens (default 64; quick 8)")
    ap.add_argument("--kl-samples", type=int, default=None, help="natural-text windows per context (default 2; quick 1)")
    ap.add_argument("--analysis", action="store_true",
                    help="also measure attention mass (exact scores over all CPU keys) during the task runs")
    ap.add_argument("--haystack", default="auto", choices=("auto", "generated"), help="haystack text source")
    ap.add_argument("--resume", default=None,
                    help="JSON lines of an earlier run with the same settings: its (task, context, method) cells and KL "
                         "contexts are reused, not re-run (a full run can be split over several time-limited calls)")
    ap.add_argument("--render", action="store_true",
                    help="run nothing: write the table and plot (--out) of the --resume file's cells that match the "
                         "current settings, e.g. a grid merged from several calls")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new cell after this many seconds (skipped cells are listed; resume them later)")
    args = ap.parse_args(argv)

    def lst(s, default, cast=str):
        return [cast(x) for x in (s.split(",") if s else default) if str(x).strip()]

    q = args.quick
    args.contexts = lst(args.contexts, [1024, 2048] if q else [1024, 2048, 4096, 8192, 16384, 32768], int)
    args.samples = args.samples or (2 if q else 50)
    args.tasks = lst(args.tasks, ["passkey", "kv"] if q else list(T.TASKS))
    args.methods = lst(args.methods, QUICK_METHODS if q else list(METHODS))
    for t in args.tasks:
        if t not in T.TASKS:
            ap.error(f"unknown task {t!r}; choose from {T.TASKS}")
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {METHODS}")
    if args.kl_contexts and args.kl_contexts.strip().lower() == "none":
        args.kl_contexts = []
    else:
        args.kl_contexts = lst(args.kl_contexts, [1024] if q else [2048, 8192], int)
    args.kl_tokens = args.kl_tokens or (4 if q else 64)
    args.kl_samples = args.kl_samples or (1 if q else 2)
    return args


# ----------------------------------------------------------------------------------------------------------------
# baseline cache layers (research hooks of ra.RetrievalLayer)
# ----------------------------------------------------------------------------------------------------------------
def make_layer_classes():
    import numpy as np
    import torch

    import retrieval_attention as ra

    class StoreLayer(ra.RetrievalLayer):
        """Keeps its own copy of the CPU keys/values (batch*kv_heads, n, d), growing by doubling."""

        def _reset_state(self):
            super()._reset_state()
            self._ck = self._cv = None
            self._n = 0

        def on_cpu_tokens(self, keys, values, train_queries):
            super().on_cpu_tokens(keys, values, train_queries)
            t = keys.shape[1]
            if self._ck is None:
                cap = max(t, 1024)
                self._ck = keys.new_empty((keys.shape[0], cap, keys.shape[2]))
                self._cv = values.new_empty((values.shape[0], cap, values.shape[2]))
            if self._n + t > self._ck.shape[1]:
                cap = max(2 * self._ck.shape[1], self._n + t)
                nk = self._ck.new_empty((self._ck.shape[0], cap, self._ck.shape[2]))
                nv = self._cv.new_empty((self._cv.shape[0], cap, self._cv.shape[2]))
                nk[:, : self._n] = self._ck[:, : self._n]
                nv[:, : self._n] = self._cv[:, : self._n]
                self._ck, self._cv = nk, nv
            self._ck[:, self._n : self._n + t] = keys
            self._cv[:, self._n : self._n + t] = values
            self._n += t
            self.on_stored(self._n - t)

        def on_stored(self, first_new: int) -> None:
            pass

        @property
        def cpu_keys(self):
            return self._ck[:, : self._n]

        @property
        def cpu_values(self):
            return self._cv[:, : self._n]

        def group(self, q_cpu) -> int:
            return q_cpu.shape[0] // self._ck.shape[0]

    class StaticOnlyLayer(ra.RetrievalLayer):
        """The CPU part contributes nothing: attention over the sink + window tokens only."""

        def cpu_retrieve_attend(self, q_cpu, scaling):
            H, m, _ = q_cpu.shape
            dv = self.head_dim
            return (torch.zeros(H, m, dv), torch.full((H, m), float("-inf")), torch.zeros(H, m, dtype=torch.int64))

    class QuestLayer(StoreLayer):
        """Quest (Tang et al., ICML 2024) over the CPU tokens: pages of 16 keys with elementwise min/max; a query's page
        score is the upper bound sum_i max(q_i min_i, q_i max_i); the top ceil(top_k/16) pages are attended exactly.
        visited counts 2 key-vectors (min, max) per page: the metadata read to score all pages."""

        def _reset_state(self):
            super()._reset_state()
            self._pmin = self._pmax = None

        def on_stored(self, first_new):
            P = QUEST_PAGE
            n = self._n
            n_pages = (n + P - 1) // P
            p0 = first_new // P
            k = self._ck[:, p0 * P : n].float()
            pad = n_pages * P - n
            if pad:
                k_lo = torch.cat([k, k[:, -1:].expand(-1, pad, -1)], dim=1)
            else:
                k_lo = k
            k_lo = k_lo.reshape(k.shape[0], -1, P, k.shape[2])
            mn, mx = k_lo.amin(dim=2), k_lo.amax(dim=2)
            if self._pmin is None:
                self._pmin, self._pmax = mn, mx
            else:
                self._pmin = torch.cat([self._pmin[:, :p0], mn], dim=1)
                self._pmax = torch.cat([self._pmax[:, :p0], mx], dim=1)

        def cpu_retrieve_attend(self, q_cpu, scaling):
            H, m, d = q_cpu.shape
            hkv = self._pmin.shape[0]
            G = H // hkv
            n_pages = self._pmin.shape[1]
            q = q_cpu.reshape(hkv, G * m, d)
            qp, qn = q.clamp(min=0), q.clamp(max=0)
            s = torch.bmm(qp, self._pmax.transpose(1, 2)) + torch.bmm(qn, self._pmin.transpose(1, 2))  # (hkv, G*m, P)
            n_sel = min(n_pages, math.ceil(self.cfg.top_k / QUEST_PAGE))
            pages = s.topk(n_sel, dim=-1).indices  # (hkv, G*m, n_sel)
            ids = (pages.unsqueeze(-1) * QUEST_PAGE + torch.arange(QUEST_PAGE)).reshape(hkv, G * m, -1)
            ids = torch.where(ids < self._n, ids, torch.full_like(ids, -1)).reshape(H, m, -1).contiguous()
            out, lse = ra.sparse_attention(q_cpu, self.cpu_keys.contiguous(), self.cpu_values.contiguous(), ids, scaling)
            self._last_ids = ids
            return out, lse, torch.full((H, m), 2 * n_pages, dtype=torch.int64)

    class IVFLayer(StoreLayer):
        """faiss IndexIVFFlat (inner product) per (batch, kv head): trained on the CPU keys present at the first
        search (the prefill's), later evicted keys are added without retraining. Queries of a group share it.
        nprobe: calibrated per index on the first decode step's queries: the smallest nprobe whose measured scanned
        fraction (faiss ndis / keys) reaches `target_scan` (class attribute, set by the harness per cell); it is then
        kept for the rest of the generation."""

        target_scan = 0.1
        nlist = None
        train_threads = 1

        def _reset_state(self):
            super()._reset_state()
            self._ivf = None
            self._indexed = 0

        def _calibrate(self, idx, q, nl, k):
            """Smallest nprobe with ndis / n >= target_scan on these queries (ndis grows with nprobe: bisection)."""
            import faiss

            def frac(p):
                idx.nprobe = p
                faiss.cvar.indexIVF_stats.reset()
                idx.search(q, k)
                return faiss.cvar.indexIVF_stats.ndis / (len(q) * idx.ntotal)

            lo, hi = 1, nl
            if frac(lo) >= self.target_scan:
                return lo
            while lo + 1 < hi:
                mid = (lo + hi) // 2
                if frac(mid) >= self.target_scan:
                    hi = mid
                else:
                    lo = mid
            return hi

        def _build(self, q_cpu):
            import faiss

            t0 = time.perf_counter()
            n = self._n
            nl = self.nlist or int(2 ** round(math.log2(max(16.0, math.sqrt(n)))))
            nl = max(1, min(nl, n))
            keys = self.cpu_keys.float().numpy()
            n_heads = keys.shape[0]
            # One k-means per (batch row, kv head): with several, train them side by side on one thread each (faiss
            # releases the GIL; k-means on a few thousand rows scales poorly over threads), else one on all threads.
            workers = max(1, min(self.train_threads, n_heads))
            threads_each = max(1, self.train_threads // workers)

            def train_one(h):
                faiss.omp_set_num_threads(threads_each)  # OpenMP thread count is per calling thread
                quant = faiss.IndexFlatIP(keys.shape[2])
                idx = faiss.IndexIVFFlat(quant, keys.shape[2], nl, faiss.METRIC_INNER_PRODUCT)
                idx.cp.seed = 1234 + h
                idx.cp.min_points_per_centroid = 1  # no warnings for small n; training uses all keys anyway
                idx.train(np.ascontiguousarray(keys[h]))
                idx.add(np.ascontiguousarray(keys[h]))
                return idx, quant

            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                self._ivf = list(pool.map(train_one, range(n_heads)))
            faiss.omp_set_num_threads(1)
            H, m, d = q_cpu.shape
            G = H // len(self._ivf)
            qn = q_cpu.reshape(len(self._ivf), G * m, d).numpy()
            for h, (idx, _) in enumerate(self._ivf):
                idx.nprobe = self._calibrate(idx, np.ascontiguousarray(qn[h]), nl, min(self.cfg.top_k, n))
            self._nlist_used = nl
            self._indexed = n
            self.build_seconds += time.perf_counter() - t0  # reported in index_build_s like the library's builds

        def cpu_retrieve_attend(self, q_cpu, scaling):
            import faiss

            if self._ivf is None:
                self._build(q_cpu)
            elif self._indexed < self._n:
                new = self._ck[:, self._indexed : self._n].float().numpy()
                for h, (idx, _) in enumerate(self._ivf):
                    idx.add(np.ascontiguousarray(new[h]))
                self._indexed = self._n
            H, m, d = q_cpu.shape
            hkv = len(self._ivf)
            G = H // hkv
            k = min(self.cfg.top_k, self._n)
            qn = q_cpu.reshape(hkv, G * m, d).numpy()
            ids = np.empty((hkv, G * m, k), dtype=np.int64)
            visited = torch.empty(hkv, G * m, dtype=torch.int64)
            for h, (idx, _) in enumerate(self._ivf):
                faiss.cvar.indexIVF_stats.reset()
                _, I = idx.search(np.ascontiguousarray(qn[h]), k)
                ids[h] = I
                visited[h] = int(round(faiss.cvar.indexIVF_stats.ndis / (G * m)))
            ids_t = torch.from_numpy(ids).reshape(H, m, k)
            out, lse = ra.sparse_attention(q_cpu, self.cpu_keys.contiguous(), self.cpu_values.contiguous(), ids_t, scaling)
            return out, lse, visited.reshape(H, m)

    class AnalysisMixin:
        """Wraps cpu_retrieve_attend: also scores every CPU key exactly to measure how much attention mass the method's
        selection carries relative to the exact top-k and to all CPU keys. Needs a StoreLayer base."""

        def _reset_state(self):
            super()._reset_state()
            self.mass = {"n": 0, "topk_ratio": 0.0, "cpu_recovered": 0.0}

        def cpu_retrieve_attend(self, q_cpu, scaling):
            out, lse, visited = super().cpu_retrieve_attend(q_cpu, scaling)
            H, m, d = q_cpu.shape
            K = self.cpu_keys.float()
            hkv = K.shape[0]
            s = torch.bmm(q_cpu.reshape(hkv, (H // hkv) * m, d), K.transpose(1, 2)) * scaling
            lse_all = torch.logsumexp(s, dim=-1).reshape(H, m)
            lse_top = torch.logsumexp(s.topk(min(self.cfg.top_k, K.shape[1]), dim=-1).values, dim=-1).reshape(H, m)
            lse = lse.float()
            self.mass["n"] += H * m
            self.mass["topk_ratio"] += float(torch.exp(lse - lse_top).sum())
            self.mass["cpu_recovered"] += float(torch.exp(lse - lse_all).sum())
            return out, lse, visited

    def analysed(cls):
        bases = (AnalysisMixin, cls) if issubclass(cls, StoreLayer) else (AnalysisMixin, StoreLayer, cls)
        return type("Analysed" + cls.__name__, bases, {})

    return {"store": StoreLayer, "static_only": StaticOnlyLayer, "quest": QuestLayer, "ivf_topk": IVFLayer,
            "analysed": analysed, "base": ra.RetrievalLayer}


# ----------------------------------------------------------------------------------------------------------------
# running the model
# ----------------------------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args):
        import torch
        from transformers import LlamaForCausalLM

        import retrieval_attention as ra
        from retrieval_attention.compat import cache_kwarg

        self.torch, self.ra, self.args = torch, ra, args
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(1)  # per-head searches of ~100 queries: threads only add overhead
        except ImportError:
            pass
        dev = args.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        dt = args.dtype
        if dt == "auto":
            dt = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, dt)
        self.batch = args.batch or (8 if self.device.type == "cuda" else 1)
        t0 = time.perf_counter()
        self.model = LlamaForCausalLM.from_pretrained(args.model, dtype=self.dtype,
                                                      attn_implementation="retrieval_attention").to(self.device).eval()
        log(f"model {args.model} on {self.device} ({dt}) loaded in {time.perf_counter() - t0:.1f} s; batch {self.batch}")
        self.cache_kw = cache_kwarg(self.model)
        self.layers = make_layer_classes()
        self.layers["ivf_topk"].train_threads = max(1, torch.get_num_threads())  # k-means training only
        self.base_cfg = run_config(args)

    def device_desc(self) -> str:
        torch = self.torch
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({torch.get_num_threads()} threads)"

    def make_cache(self, method: str, analysis: bool = False):
        """-> a cache object for `method` (a DynamicCache for full)."""
        ra = self.ra
        if method == "full":
            from transformers import DynamicCache

            return DynamicCache()
        index = "query_guided" if method == "retrieval_attention" else "flat"
        cfg = ra.RetrievalConfig(index=index, **self.base_cfg)
        cls = self.layers.get(method, self.layers["base"])
        if analysis:
            cls = self.layers["analysed"](cls)
        return ra.RetrievalCache(self.model.config, cfg, layer_class=cls)

    def forward(self, ids, cache, keep=1):
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **{self.cache_kw: cache})
        return out.logits

    def greedy(self, ids_list, cache, n_new: int):
        """Greedy decoding of n_new tokens for equal-length prompts. -> list of generated id lists."""
        torch = self.torch
        ids = torch.tensor(ids_list, dtype=torch.long, device=self.device)
        gen = []
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits = self.forward(ids, cache)
            nxt = logits[:, -1].argmax(-1)
            sync()
            t1 = time.perf_counter()
            gen.append(nxt)
            for _ in range(n_new - 1):
                logits = self.forward(nxt[:, None], cache)
                nxt = logits[:, -1].argmax(-1)
                gen.append(nxt)
            out = torch.stack(gen, 1).tolist()
        # prefill (with the device kNN of the graph builds) and decode (with any wait for the asynchronous builds)
        self.last_times = {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1}
        return out

    def teacher_forced_logprobs(self, ids_list, context: int, cache):
        """Prefill ids[:, :context], then feed ids[:, context:-1] one by one. -> (B, steps, vocab) float32 log-probs
        of the predictions of ids[:, context:]."""
        torch = self.torch
        ids = torch.tensor(ids_list, dtype=torch.long, device=self.device)
        outs = []
        with torch.inference_mode():
            logits = self.forward(ids[:, :context], cache)
            outs.append(logits[:, -1].float().log_softmax(-1).cpu())
            for t in range(context, ids.shape[1] - 1):
                logits = self.forward(ids[:, t : t + 1], cache)
                outs.append(logits[:, -1].float().log_softmax(-1).cpu())
        return torch.stack(outs, 1)


def cache_stats(cache) -> dict:
    if hasattr(cache, "summary"):
        return cache.summary()
    return {}


def mass_stats(cache):
    n = tr = cr = 0.0
    for layer in getattr(cache, "layers", []):
        m = getattr(layer, "mass", None)
        if m and m["n"]:
            n += m["n"]
            tr += m["topk_ratio"]
            cr += m["cpu_recovered"]
    return (n, tr, cr)


# ----------------------------------------------------------------------------------------------------------------
# experiments
# ----------------------------------------------------------------------------------------------------------------
def run_cell(runner: Runner, task: str, context: int, samples, method: str, ivf_target: float | None):
    """Accuracy of one method on one (task, context) cell."""
    args = runner.args
    if method == "ivf_topk":
        cls = runner.layers["ivf_topk"]
        cls.target_scan = ivf_target
        cls.nlist = args.ivf_nlist
    t0 = time.perf_counter()
    correct, scanned, weights, depth_hits, outputs = [], 0.0, 0, [[0, 0], [0, 0], [0, 0]], []
    mass = [0.0, 0.0, 0.0]
    build_s = 0.0
    times = {}  # where the cell's time went, summed over its batches
    for b0 in range(0, len(samples), runner.batch):
        chunk = samples[b0 : b0 + runner.batch]
        cache = runner.make_cache(method, analysis=args.analysis and method != "full")
        n_new = max(len(s.answer) for s in chunk) + 1
        gens = runner.greedy([s.ids for s in chunk], cache, n_new)
        st = cache_stats(cache)
        for key, val in runner.last_times.items():
            times[key] = times.get(key, 0.0) + val
        for key in ("knn_s", "index_build_wait_s"):
            if key in st:
                times[key] = times.get(key, 0.0) + st[key]
        if method == "full":
            scanned += 1.0 * len(chunk)
        else:
            scanned += st.get("scanned_frac", 0.0) * len(chunk)
            build_s += st.get("index_build_s", 0.0)
        weights += len(chunk)
        n, tr, cr = mass_stats(cache)
        mass = [mass[0] + n, mass[1] + tr, mass[2] + cr]
        for s, g in zip(chunk, gens):
            txt = T.decode(g)
            ok = T.score(s.answer, txt)
            correct.append(ok)
            third = min(2, int(s.depth * 3))
            depth_hits[third][0] += ok
            depth_hits[third][1] += 1
            outputs.append((s.answer, txt))
    sec = time.perf_counter() - t0
    rec = {
        "bench": "accuracy", "task": task, "context": context, "method": method,
        "accuracy": round(sum(correct) / len(correct), 4), "samples": len(correct),
        "scanned_frac": round(scanned / max(weights, 1), 5),
        "correct": int(sum(correct)),
        "per_sample": "".join("1" if ok else "0" for ok in correct),  # sample order; methods compare sample by sample
        "depth_thirds": [round(h / c, 3) if c else None for h, c in depth_hits],
        "seconds": round(sec, 2),
    }
    if method != "full":
        rec["index_sharing"] = runner.base_cfg["index_sharing"]
        rec["index_build_s"] = round(build_s, 3)  # summed over the cell's caches (all layers), includes offloading
        rec["top_k"] = runner.base_cfg["top_k"]
    if method == "retrieval_attention":
        rec["train_shifted"] = runner.base_cfg["shift_train_queries"]
    rec["time_split_s"] = {key: round(val, 2) for key, val in times.items()}
    if method == "retrieval_attention":
        rec["train_queries"] = train_queries(context)
        rec["ef"] = runner.base_cfg["ef"]  # None: RetrievalConfig's automatic beam (ef_used)
        rec["ef_used"] = beam_for(runner.base_cfg, context)
    if method == "ivf_topk":
        rec["target_scan"] = round(ivf_target, 5)
    if mass[0]:
        rec["topk_mass_ratio"] = round(mass[1] / mass[0], 4)
        rec["cpu_mass_recovered"] = round(mass[2] / mass[0], 4)
    misses = [f"{a}->{g!r}" for a, g in outputs if not T.score(a, g)][:3]
    if misses:
        rec["example_misses"] = misses
    return rec


def run_kl(runner: Runner, context: int, methods, haystack: str, ivf_targets: dict):
    """Teacher-forced natural-text KL(full || method) and attention-mass analysis at one context length."""
    torch = runner.torch
    args = runner.args
    texts = [T.natural_text_ids(context, args.kl_tokens, seed=args.seed + i, haystack=haystack) for i in range(args.kl_samples)]
    from transformers import DynamicCache

    ref = [runner.teacher_forced_logprobs([ids], context, DynamicCache()) for ids in texts]
    recs = []
    for method in methods:
        if method == "full":
            continue
        if method == "ivf_topk":
            cls = runner.layers["ivf_topk"]
            cls.target_scan = args.ivf_scan_frac or ivf_targets.get(context) or 0.1
            cls.nlist = args.ivf_nlist
        t0 = time.perf_counter()
        kls, scanned, mass = [], [], [0.0, 0.0, 0.0]
        try:
            for ids, lp_ref in zip(texts, ref):
                cache = runner.make_cache(method, analysis=True)
                lp = runner.teacher_forced_logprobs([ids], context, cache)
                kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)  # (1, steps)
                kls.append(kl.flatten())
                scanned.append(cache_stats(cache).get("scanned_frac", 0.0))
                n, tr, cr = mass_stats(cache)
                mass = [mass[0] + n, mass[1] + tr, mass[2] + cr]
        except Exception as exc:  # a method that cannot run (e.g. index not built into the extension yet)
            log(f"  kl {method} @ {context}: FAILED: {short(exc)}")
            continue
        kl = torch.cat(kls)
        rec = {"bench": "accuracy_kl", "context": context, "method": method, "kl": round(float(kl.mean()), 6),
               "kl_max": round(float(kl.max()), 6), "tokens": int(kl.numel()),
               "scanned_frac": round(sum(scanned) / len(scanned), 5),
               "topk_mass_ratio": round(mass[1] / mass[0], 4) if mass[0] else None,
               "cpu_mass_recovered": round(mass[2] / mass[0], 4) if mass[0] else None,
               "seconds": round(time.perf_counter() - t0, 2)}
        if method != "full":
            rec["index_sharing"] = runner.base_cfg["index_sharing"]
        if method == "ivf_topk":
            rec["target_scan"] = round(runner.layers["ivf_topk"].target_scan, 5)
        if method == "retrieval_attention":  # ivf_topk (after it in METHODS) matches this scan budget
            ivf_targets = dict(ivf_targets)
            ivf_targets[context] = rec["scanned_frac"]
        recs.append(rec)
    return recs


# ----------------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------------
def markdown(results, kl_results, meta) -> str:
    lines = [f"# Accuracy: tinyllama-byte-32k, greedy exact match", "",
             f"device: {meta['device']}, dtype {meta['dtype']}; RetrievalConfig {meta['config']}; "
             f"samples per cell: {meta['samples']}; haystack: {meta['haystack']}", ""]
    ctxs = sorted({r["context"] for r in results})
    tasks = [t for t in T.TASKS if any(r["task"] == t for r in results)]
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    by = {(r["task"], r["context"], r["method"]): r for r in results}

    def lab(c):
        return f"{c // 1024}K" if c % 1024 == 0 else str(c)

    if results:
        lines += ["Accuracy (scanned fraction of CPU keys in brackets):", "",
                  "| task | method | " + " | ".join(lab(c) for c in ctxs) + " |",
                  "|---|---|" + "---|" * len(ctxs)]
        for t in tasks:
            for m in methods:
                cells = []
                for c in ctxs:
                    r = by.get((t, c, m))
                    cells.append("" if r is None else f"{r['accuracy']:.2f} ({r['scanned_frac']:.3f})")
                lines.append(f"| {t} | {m} | " + " | ".join(cells) + " |")
        below = []
        for t in tasks:
            for c in ctxs:
                full, ours = by.get((t, c, "full")), by.get((t, c, "retrieval_attention"))
                if full and ours and full["accuracy"] > CHANCE and ours["accuracy"] < 0.97 * full["accuracy"]:
                    below.append(f"{t} {lab(c)}: {ours['accuracy']:.2f} vs {full['accuracy']:.2f} "
                                 f"({ours['accuracy'] / full['accuracy']:.1%})")
        if by and any(m == "retrieval_attention" for _, _, m in by):
            unchecked = [f"{t} {lab(c)}" for t in tasks for c in ctxs
                         if (t, c, "full") in by and (t, c, "retrieval_attention") not in by]
            lines += ["", "retrieval_attention below 97% of full attention (where full is above chance): "
                      + ("; ".join(below) if below else "none")
                      + (f" (not checked, retrieval_attention not run: {', '.join(unchecked)})" if unchecked else "")]
        lines += ["", "Mean over tasks (only where every task's cell ran):", "",
                  "| method | " + " | ".join(lab(c) for c in ctxs) + " |", "|---|" + "---|" * len(ctxs)]
        for m in methods:
            cells = []
            for c in ctxs:
                rs = [by[(t, c, m)] for t in tasks if (t, c, m) in by]
                cells.append(f"{sum(r['accuracy'] for r in rs) / len(rs):.3f}" if rs and len(rs) == len(tasks) else "")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if kl_results:
        lines += ["", "Natural text, teacher-forced: KL(full || method) in nats/token, attention mass of the selection "
                  "relative to the exact top-k CPU keys and to all CPU keys, scanned fraction:", "",
                  "| context | method | KL | KL max | top-k mass ratio | CPU mass recovered | scanned | tokens |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in kl_results:
            f = lambda v, p=4: "" if v is None else f"{v:.{p}f}"  # noqa: E731
            lines.append(f"| {lab(r['context'])} | {r['method']} | {r['kl']:.5f} | {r['kl_max']:.4f} | "
                         f"{f(r['topk_mass_ratio'])} | {f(r['cpu_mass_recovered'])} | {r['scanned_frac']:.3f} | {r['tokens']} |")
    if meta.get("skipped"):
        lines += ["", "Not run: " + "; ".join(meta["skipped"])]
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in T.TASKS if any(r["task"] == t for r in results)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    styles = {"full": "k-", "retrieval_attention": "r-", "flat_topk": "b--", "ivf_topk": "g-.", "quest": "m:",
              "static_only": "c-"}
    for ax, t in zip(axes[0], tasks):
        for m in METHODS:
            rs = sorted((r for r in results if r["task"] == t and r["method"] == m), key=lambda r: r["context"])
            if rs:
                ours = m == "retrieval_attention"  # drawn wide and first, so the methods it matches stay visible on it
                ax.plot([r["context"] for r in rs], [r["accuracy"] for r in rs], styles.get(m, "-"), marker="o",
                        ms=6 if ours else 3, lw=4 if ours else 1.5, alpha=0.6 if ours else 1.0, zorder=1 if ours else 2,
                        label=m)
        ax.set_xscale("log", base=2)
        ctxs = sorted({r["context"] for r in results if r["task"] == t})
        ax.set_xticks(ctxs, [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in ctxs])
        ax.minorticks_off()
        ax.set_title(t)
        ax.set_xlabel("context (tokens)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (greedy exact match)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_config(args) -> dict:
    """The RetrievalConfig fields this run sets for every retrieval method: the command line's, else the defaults."""
    import retrieval_attention as ra

    base = ra.RetrievalConfig()
    cfg = {name: getattr(base, name) if getattr(args, name) is None else getattr(args, name)
           for name in ("n_sink", "n_window", "top_k", "ef", "index_sharing")}
    share = getattr(args, "train_shift", None)
    cfg["shift_train_queries"] = float(base.shift_train_queries if share is None else share)
    return cfg


def beam_for(cfg: dict, context: int) -> int:
    """The search beam retrieval_attention uses for a prompt of `context` tokens under run_config() `cfg` (the CPU
    holds every prompt token outside the static set; a few generated tokens do not evict any)."""
    import retrieval_attention as ra

    rc = ra.RetrievalConfig(n_sink=cfg["n_sink"], n_window=cfg["n_window"], top_k=cfg["top_k"], ef=cfg["ef"])
    return rc.search_beam(max(0, context - cfg["n_sink"] - cfg["n_window"]))


def train_queries(context: int) -> int:
    """Training queries per index of retrieval_attention for a prompt of `context` tokens (RetrievalConfig's cap)."""
    import retrieval_attention as ra

    cap = ra.RetrievalConfig().max_train_queries
    return context if cap is None else min(context, cap)


def load_resume(args):
    """Cells of an earlier run (--resume) that match this run's samples and settings: {(task, context, method): rec}
    and {kl context: [recs]}. Records of other settings are ignored (they would not be comparable)."""
    done, done_kl = {}, {}
    if not args.resume:
        return done, done_kl
    cfg = run_config(args)
    sharing, top_k = cfg["index_sharing"], cfg["top_k"]
    if not os.path.exists(args.resume):  # the first of a series of resumed runs
        log(f"resume: {args.resume} does not exist yet; starting from scratch")
        return done, done_kl
    stale, ivf_candidates, kl = set(), {}, {}
    with open(args.resume) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if rec.get("index_sharing", sharing) != sharing:
                continue
            if rec.get("bench") == "accuracy" and rec.get("samples") == args.samples and rec.get("task") in args.tasks \
                    and rec.get("context") in args.contexts and rec.get("method") in args.methods:
                key = (rec["task"], rec["context"], rec["method"])
                # records from before train_queries was recorded used every prompt token as a training query
                # records from before top_k and ef were recorded used top-100 and ef 128; cells are compared by the
                # beam they searched with, so a fixed ef and the automatic one that gives the same beam are the same
                beam = rec.get("ef_used", rec.get("ef", 128))
                # records from before train_shifted was recorded trained on the prompt queries where they were; those
                # from before it was a share hold True (all moved), which equals 1.0
                if key[2] == "retrieval_attention" and (rec.get("train_queries", key[1]) != train_queries(key[1])
                                                        or beam != beam_for(cfg, key[1])
                                                        or rec.get("train_shifted", False) != cfg["shift_train_queries"]):
                    stale.add(key)
                elif key[2] != "full" and rec.get("top_k", 100) != top_k:
                    stale.add(key)
                elif key[2] == "ivf_topk":
                    ivf_candidates.setdefault(key, []).append(rec)
                else:
                    done[key] = rec  # a later line of the same cell replaces an earlier one
            elif rec.get("bench") == "accuracy_kl" and rec.get("context") in args.kl_contexts and rec.get("method") in args.methods:
                kl[(rec["context"], rec["method"])] = rec
    for (context, _), rec in kl.items():
        done_kl.setdefault(context, []).append(rec)
    for key, recs in ivf_candidates.items():
        # ivf_topk's scan budget: --ivf-scan-frac, else the scanned fraction of retrieval_attention's cell in this run
        if args.ivf_scan_frac is not None:
            want = round(args.ivf_scan_frac, 5)
        elif "retrieval_attention" in args.methods:
            ra_rec = done.get((key[0], key[1], "retrieval_attention"))
            want = None if ra_rec is None else ra_rec["scanned_frac"]
        else:
            want = recs[-1].get("target_scan")
        match = [r for r in recs if want is not None and r.get("target_scan") == want]
        if match:
            done[key] = match[-1]
        else:
            stale.add(key)
    stale -= set(done)  # a cell with a matching record is reused
    if stale:
        log(f"resume: {len(stale)} cells built with other settings are run again: "
            + ", ".join(" ".join(map(str, k)) for k in sorted(stale)))
    log(f"resume: {len(done)} task cells and {len(done_kl)} KL contexts reused from {args.resume}")
    return done, done_kl


def render(args):
    """--render: the table and plot of the --resume file's matching cells, without loading the model."""
    if not args.resume or not args.out:
        raise SystemExit("--render needs --resume FILE and --out DIR")
    done, done_kl = load_resume(args)
    order = {(t, c, m): i for i, (t, c, m) in enumerate(
        (t, c, m) for t in args.tasks for c in args.contexts for m in args.methods)}
    results = sorted(done.values(), key=lambda r: order[(r["task"], r["context"], r["method"])])
    kl_results = [r for c in args.kl_contexts if c in done_kl
                  for r in sorted(done_kl[c], key=lambda r: args.methods.index(r["method"]))]
    missing = [" ".join(map(str, k)) for k in order if k not in done] + [f"kl {c}" for c in args.kl_contexts
                                                                          if c not in done_kl]
    meta = {"device": f"as recorded in {os.path.basename(args.resume)}", "dtype": "as recorded", "config": run_config(args),
            "samples": args.samples, "haystack": "as recorded", "skipped": missing}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "accuracy.md"), "w") as f:
        f.write(markdown(results, kl_results, meta))
    plot(results, os.path.join(args.out, "accuracy.png"))
    log(f"rendered {len(results)} cells and {len(kl_results)} KL lines into {args.out}/accuracy.md, accuracy.png")
    return results, kl_results


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        return render(args)
    t_start = time.perf_counter()
    runner = Runner(args)
    need = max(args.contexts + args.kl_contexts + [0]) + (args.kl_tokens or 0)
    haystack, hay_desc = T.load_haystack(max(1 << 20, 2 * need), sources=args.haystack)
    log(f"haystack: {hay_desc}")
    results, kl_results, skipped, failed = [], [], [], set()
    ra_scan = {}  # (task, context) -> retrieval_attention's scanned fraction, for ivf_topk's nprobe

    def emit(rec):
        if args.json:
            print(json.dumps(rec), flush=True)

    done, done_kl = load_resume(args)
    for rec in done.values():
        if rec["method"] == "retrieval_attention":
            ra_scan[(rec["task"], rec["context"])] = rec["scanned_frac"]

    def out_of_budget(what):
        if args.budget_s is None or time.perf_counter() - t_start <= args.budget_s:
            return False
        skipped.append(f"{what} (past --budget-s {args.budget_s:g})")
        log(f"{what}: skipped, past --budget-s {args.budget_s:g}")
        return True

    for task in args.tasks:
        for context in args.contexts:
            samples = None
            for method in args.methods:
                if method in failed:
                    continue
                if (task, context, method) in done:
                    rec = done[(task, context, method)]
                    results.append(rec)
                    emit(rec)
                    continue
                if out_of_budget(f"{task} {context} {method}"):
                    continue
                if samples is None:
                    samples = T.make_samples(task, context, args.samples, seed=args.seed, haystack=haystack)
                target = None
                if method == "ivf_topk":
                    target = args.ivf_scan_frac or ra_scan.get((task, context)) or 0.1
                try:
                    rec = run_cell(runner, task, context, samples, method, target)
                except Exception as exc:
                    log(f"{task} {context} {method}: FAILED: {short(exc)}; skipping this method from now on")
                    failed.add(method)
                    skipped.append(f"{method} ({short(exc)})")
                    continue
                if method == "retrieval_attention":
                    ra_scan[(task, context)] = rec["scanned_frac"]
                results.append(rec)
                emit(rec)
                log(f"{task:10s} {context:6d} {method:20s} acc {rec['accuracy']:.3f} ({rec['correct']}/{rec['samples']}) "
                    f"scanned {rec['scanned_frac']:.4f}  {rec['seconds']:.1f} s"
                    + (f"  misses {rec['example_misses']}" if rec.get("example_misses") else ""))
    kl_methods = [m for m in args.methods if m not in failed]
    for context in args.kl_contexts:
        if context in done_kl:
            for rec in done_kl[context]:
                kl_results.append(rec)
                emit(rec)
            continue
        if out_of_budget(f"kl {context}"):
            continue
        for rec in run_kl(runner, context, kl_methods, haystack, {}):
            kl_results.append(rec)
            emit(rec)
            log(f"kl {context:6d} {rec['method']:20s} KL {rec['kl']:.5f} top-k mass {rec['topk_mass_ratio']} "
                f"cpu mass {rec['cpu_mass_recovered']} scanned {rec['scanned_frac']:.4f}  {rec['seconds']:.1f} s")
    meta = {"device": runner.device_desc(), "dtype": str(runner.dtype).replace("torch.", ""), "config": runner.base_cfg,
            "samples": args.samples, "haystack": hay_desc, "skipped": skipped,
            "seconds": round(time.perf_counter() - t_start, 1)}
    md = markdown(results, kl_results, meta)
    if not args.json:
        print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "accuracy.jsonl"), "w") as f:
            for r in results + kl_results:
                f.write(json.dumps(r) + "\n")
        with open(os.path.join(args.out, "accuracy.md"), "w") as f:
            f.write(md)
        try:
            plot(results, os.path.join(args.out, "accuracy.png"))
        except Exception as exc:  # plotting must not lose the results
            log(f"plot failed: {exc!r}")
        log(f"wrote {args.out}/accuracy.jsonl, accuracy.md, accuracy.png")
    log(f"total {time.perf_counter() - t_start:.1f} s")
    return results, kl_results


if __name__ == "__main__":
    main()
