#!/usr/bin/env python
"""Per-token decode attention latency and KV memory at Llama-3-8B shapes, through the library's real decode path.

    python benchmarks/decode_latency.py --quick --json                      # CPU, tiny sizes, < 60 s on 2 cores
    python benchmarks/decode_latency.py --json --contexts 131072 --layers 2 --out DIR     # GPU machine
    python benchmarks/decode_latency.py --json --contexts 131072 --e2e      # + end-to-end generate of a random 8B Llama

Methods (one RetrievalLayer per measured layer, driven standalone: update(prompt K/V) -> finish_prefill(prompt
queries) -> per step update(new K/V) + decode_attention(q)):
    full     torch SDPA over all keys/values on the device (no library code; "where it fits")
    ours     RetrievalConfig(index="query_guided"): static set on the device + query-guided graph search on the CPU
    flat     the same pipeline with exact flat search of the CPU keys (index="flat")
    ivf      the same pipeline, CPU search by faiss IndexIVFFlat per kv head (RetrievalLayer subclass through the
             on_cpu_tokens / cpu_retrieve_attend hooks), nprobe chosen as the smallest reaching ours' recall
    static   the same pipeline with the CPU part contributing nothing (StreamingLLM-like sink + window)

Keys/values are synthetic with an out-of-distribution structure (benchmarks/qk_data.py's SyntheticQK: keys from an
anisotropic Gaussian mixture, queries from another mean and covariance) plus a few "needle" keys per query head
aligned with that head's decode queries, bf16 on the device. --data model uses the bundled model's own post-RoPE
Q/K/V on a long natural-text input instead (ModelLayerData). Only --layers layers are built and timed (graph builds at
128K-1M keys are slow); 32-layer figures are the per-layer mean x --layers-reported, stated in every JSON line.

stdout (--json): one {"bench": "decode", ...} line per (context, method) (DESIGN.md section 6 fields + breakdown),
one {"bench": "decode_e2e", ...} line per e2e method, then a {"bench": "decode_env", ...} line. A table goes to stderr
(and stdout without --json). benchmarks/README.md ("## decode_latency.py") describes every field.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import math
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

DEFAULT_METHODS = ("full", "ours", "flat", "ivf", "static")
METHODS = DEFAULT_METHODS + ("ours_hook", "ours_cold")
LIB_INDEX = {"ours": "query_guided", "ours_hook": "query_guided", "ours_cold": "query_guided", "flat": "flat", "ivf": "flat",
             "static": "flat"}
# ours_hook: the same index through the Python cpu_retrieve_attend hook (its overhead); ours_cold: without the warm start
# (RetrievalConfig.warm_start=False: every search from the graph's entry point only)
OURS = ("ours", "ours_hook", "ours_cold")
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized run (< 60 s on 2 cores): small contexts and heads")
    ap.add_argument("--json", action="store_true", help="JSON lines on stdout (table on stderr)")
    ap.add_argument("--out", default=None, help="directory for decode_latency.jsonl and decode_latency.png")
    ap.add_argument("--contexts", default=None, help="comma list of context lengths (default 32768,131072,524288,1048576)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma list of " + ",".join(METHODS) + " (default: all but ours_hook)")
    ap.add_argument("--layers", type=int, default=None, help="layers built and timed per context (default 2; quick 1)")
    ap.add_argument("--layers-1m", type=int, default=None,
                    help="layers built at contexts >= 512K (default: --layers); graph builds there are the slowest part")
    ap.add_argument("--layers-reported", type=int, default=32, help="per-layer mean x this = per-token figures")
    ap.add_argument("--q-heads", type=int, default=None, help="query heads (default 32; quick 8)")
    ap.add_argument("--kv-heads", type=int, default=None, help="kv heads (default 8; quick 2)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--n-sink", type=int, default=128)
    ap.add_argument("--n-window", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--max-unindexed", type=int, default=4096,
                    help="RetrievalConfig.max_unindexed_tokens: evicted tokens scanned exactly before one batch insert (0: insert each)")
    ap.add_argument("--ef", type=int, default=None,
                    help="beam width of the query-guided search (RetrievalConfig.ef; default: the library's automatic beam, "
                         "RetrievalConfig.search_beam of the CPU tokens, 1024 at 128K)")
    ap.add_argument("--index-sharing", default="per_query_head", choices=("per_query_head", "per_kv_head"),
                    help="RetrievalConfig.index_sharing of ours and the e2e run (per_kv_head: one graph per GQA group)")
    ap.add_argument("--index-params", default="{}", help="JSON RetrievalConfig.index_params (default: library defaults)")
    ap.add_argument("--max-train-queries", type=int, default=None,
                    help="prefill queries per head used to build graphs (default 16384; quick 2048; 0 = all T)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 8; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed decode steps first (default 2; quick 1)")
    ap.add_argument("--ef-sweep", default="64,128,256,512,1024",
                    help="beam widths at which ours' recall/scanned on layer 0 are also reported ('' = none)")
    ap.add_argument("--ef-auto", action="store_true",
                    help="time ours at the smallest --ef-sweep value reaching --target-recall instead of --ef")
    ap.add_argument("--target-recall", type=float, default=0.9, help="for --ef-auto")
    ap.add_argument("--probe-queries", type=int, default=None, help="extra decode-like queries for recall (default 32; quick 16)")
    ap.add_argument("--data", default="synthetic", choices=("synthetic", "model"),
                    help="synthetic: SyntheticQK keys/queries + needles (default); model: the bundled model's own post-RoPE "
                         "Q/K/V on a long passkey input, embedded in the --head-dim dims (ModelLayerData)")
    ap.add_argument("--needles", type=int, default=8, help="needle keys per query head (--data synthetic)")
    ap.add_argument("--key-clusters", type=int, default=256, help="SyntheticQK clusters of the key mixture")
    ap.add_argument("--cluster-frac", type=float, default=0.9,
                    help="SyntheticQK share of key variance between cluster centres (high: IVF-friendly clustered keys)")
    ap.add_argument("--ivf-nlist", type=int, default=None, help="IVF lists per kv head (default 2^ceil(log2 sqrt n))")
    ap.add_argument("--ivf-nprobe", type=int, default=None, help="fixed nprobe (default: smallest reaching ours' recall)")
    ap.add_argument("--ivf-target-recall", type=float, default=None,
                    help="recall IVF must reach when ours did not run (default 0.9)")
    ap.add_argument("--flush-mb", type=int, default=None,
                    help="CPU buffer read before each timed call so caches are cold as after 31 other layers "
                         "(default 256; quick 16; 0 = off)")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP CPU threads (default: torch's)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default cuda if available)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip (context, method) cells that would start after this many seconds (logged)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="profile one untimed decode_attention call of layer 0 per method (torch.profiler, the last warmup "
                         "step) and write the operator table to DIR/profile_<context>_<method>.txt")
    ap.add_argument("--e2e", action="store_true", help="also run the end-to-end generate of a random 8B-shaped Llama")
    ap.add_argument("--e2e-context", type=int, default=None, help="prompt tokens of the e2e run (default 131072; quick 2048)")
    ap.add_argument("--e2e-new-tokens", type=int, default=16)
    ap.add_argument("--e2e-layers", type=int, default=32, help="decoder layers of the e2e model (8B: 32)")
    ap.add_argument("--e2e-vocab", type=int, default=32000)
    ap.add_argument("--e2e-index", default="query_guided", help="RetrievalConfig.index of the e2e retrieval run")
    ap.add_argument("--e2e-methods", default="full,ours", help="comma list of full,ours")
    ap.add_argument("--e2e-decode-during-build", action="store_true",
                    help="RetrievalConfig.decode_during_build for ours: decode while the indexes build (exact scans meanwhile)")
    ap.add_argument("--watchdog-s", type=float, default=None, metavar="S",
                    help="print every thread's Python stack to stderr every S seconds (to see where a slow run spends it; "
                         "faulthandler reads running threads' frames unlocked and once crashed the process doing so, so "
                         "pick S beyond a normal run's length)")
    ap.add_argument("--key-list-stride", type=int, default=None, metavar="S",
                    help="seek each key's GPU neighbour list among every S-th key (retrieval_attention.index."
                         "KEY_LIST_COLUMN_STRIDE; for an A/B of the library's default)")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    if a.key_list_stride is not None:
        import retrieval_attention.index as ra_index

        ra_index.KEY_LIST_COLUMN_STRIDE = a.key_list_stride
    q = a.quick
    a.contexts = [int(x) for x in (a.contexts or ("2048,8192" if q else "32768,131072,524288,1048576")).split(",") if x]
    a.methods = [m for m in a.methods.split(",") if m]
    for m in a.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} (choose from {','.join(METHODS)})")
    a.layers = a.layers or (1 if q else 2)
    a.layers_1m = a.layers_1m or a.layers
    a.q_heads = a.q_heads or (8 if q else 32)
    a.kv_heads = a.kv_heads or (2 if q else 8)
    if a.e2e_context is None:
        a.e2e_context = 2048 if q else 131072
    if a.max_train_queries is None:
        a.max_train_queries = 2048 if q else 16384
    a.steps = a.steps or (3 if q else 8)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 2)
    a.probe_queries = a.probe_queries if a.probe_queries is not None else (16 if q else 32)
    a.flush_mb = a.flush_mb if a.flush_mb is not None else (16 if q else 256)
    a.index_params = json.loads(a.index_params)
    a.ef_sweep = [int(x) for x in a.ef_sweep.split(",") if x]
    a.e2e_methods = [m for m in a.e2e_methods.split(",") if m]
    if a.q_heads % a.kv_heads:
        ap.error("--q-heads must be a multiple of --kv-heads")
    return a


# ----------------------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------------------
def sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_desc(dev) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return "cpu (" + (platform.processor() or platform.machine()) + ")"


def cpu_desc() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def numa_nodes() -> int | None:
    """NUMA nodes the kernel shows (None where it does not say): memory placement can make runs of the same
    latency-bound search differ."""
    try:
        return sum(1 for x in os.listdir("/sys/devices/system/node") if x.startswith("node") and x[4:].isdigit())
    except OSError:
        return None


def measure_cpu_bandwidth(mb: int) -> float:
    """Best-of-5 bandwidth (GB/s) of a multithreaded CPU copy of `mb` MiB: (bytes read + bytes written) / time."""
    import torch

    n = mb * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best / 1e9


class CacheFlusher:
    """Reads a buffer larger than the last-level cache, so a timed call finds the layer's data as cold as it would be
    after the 31 other layers of a real decode step ran in between."""

    def __init__(self, mb: int):
        import torch

        self.buf = torch.ones(mb * (1 << 20) // 4, dtype=torch.float32) if mb > 0 else None

    def __call__(self):
        if self.buf is not None:
            float(self.buf.sum())


# ----------------------------------------------------------------------------------------------------------------
# synthetic out-of-distribution keys/values/queries at model shapes
# ----------------------------------------------------------------------------------------------------------------
class LayerData:
    """One layer's synthetic attention inputs on the device.

    keys/values (1, Hkv, T + S, d) bf16: the T-token prompt then the S decode tokens. train_q (1, Hq, n_train, d) bf16:
    prefill queries given to finish_prefill (i.i.d. per position, so n_train = min(T, max_train_queries) positions are
    generated rather than T then subsampled). dec_q (S, 1, Hq, 1, d) bf16: the decode queries. probe_q (Hq, P, d)
    float32: extra decode-like queries for recall. Per kv head g keys follow qk_data.SyntheticQK(d, seed); each query
    head has its own query mean (orthogonal to the keys' mean) and shares the group's query covariance. `needles` keys per
    query head (positions uniform in the CPU part) point along that head's mean decode-query direction, scaled to score
    ~1.25x the best ordinary key, so retrieval matters (static-only misses them)."""

    def __init__(self, args, T, S, layer, dev):
        import numpy as np
        import torch

        from qk_data import SyntheticQK

        Hq, Hkv, d = args.q_heads, args.kv_heads, args.head_dim
        G = Hq // Hkv
        self.T, self.S = T, S
        n_train = T if args.max_train_queries == 0 else min(T, args.max_train_queries)
        P = args.probe_queries
        gen_t = torch.Generator(device=dev).manual_seed(1_000_003 * args.seed + 7919 * layer + T % 1_000_000)
        keys = torch.empty((1, Hkv, T + S, d), dtype=torch.bfloat16, device=dev)
        values = torch.empty_like(keys)
        train = torch.empty((1, Hq, n_train, d), dtype=torch.bfloat16, device=dev)
        dec = torch.empty((Hq, S + P, d), dtype=torch.float32, device=dev)
        n_sink, cpu_end = min(args.n_sink, T), max(min(args.n_sink, T), T - args.n_window)
        rng = np.random.default_rng(args.seed * 100_003 + layer)
        self.needle_pos = {}
        self.rope_inv_freq = None  # synthetic vectors carry no RoPE
        for g in range(Hkv):
            syn = SyntheticQK(d, seed=10_000 * args.seed + 100 * layer + g, clusters=args.key_clusters, cluster_frac=args.cluster_frac)
            f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=dev)
            Ak, centers, Aq = f32(syn.Ak), f32(syn.centers), f32(syn.Aq)
            mu_k = syn.mu_k / np.linalg.norm(syn.mu_k)
            chunk = 1 << 18
            for s0 in range(0, T + S, chunk):
                n = min(chunk, T + S - s0)
                c = torch.randint(0, centers.shape[0], (n,), device=dev, generator=gen_t)
                z = torch.randn((n, d), device=dev, generator=gen_t)
                keys[0, g, s0 : s0 + n] = (centers[c] + (z @ Ak.T) * math.sqrt(1.0 - syn.cluster_frac)).bfloat16()
                values[0, g, s0 : s0 + n] = torch.randn((n, d), device=dev, generator=gen_t).bfloat16()
            for j in range(G):
                h = g * G + j
                v = rng.standard_normal(d)
                v -= (v @ mu_k) * mu_k
                mu_q = f32(4.0 * v / np.linalg.norm(v))  # SyntheticQK's q_mean_norm, one mean per query head
                for s0 in range(0, n_train, chunk):
                    n = min(chunk, n_train - s0)
                    train[0, h, s0 : s0 + n] = (mu_q + torch.randn((n, d), device=dev, generator=gen_t) @ Aq.T).bfloat16()
                dec[h] = (mu_q + torch.randn((S + P, d), device=dev, generator=gen_t) @ Aq.T).bfloat16().float()
                if args.needles and cpu_end > n_sink:
                    u = dec[h].mean(0)
                    u = u / u.norm()
                    ks = keys[0, g, n_sink:cpu_end].float()
                    top = (dec[h] @ ks.T).amax(1)  # best ordinary score of each decode query
                    proj = (dec[h] @ u).clamp(min=1e-3)
                    scale = 1.25 * float(top.median()) / float(proj.median())
                    del ks
                    pos = rng.choice(np.arange(n_sink, cpu_end), size=min(args.needles, cpu_end - n_sink), replace=False)
                    self.needle_pos[h] = sorted(int(p) for p in pos)
                    noise = 0.05 * scale * torch.randn((len(pos), d), device=dev, generator=gen_t)
                    keys[0, g, torch.as_tensor(pos, device=dev)] = (scale * u + noise).bfloat16()
        self.keys, self.values, self.train_q = keys, values, train
        self.dec_q = dec[:, :S].transpose(0, 1).reshape(S, 1, Hq, 1, d).bfloat16()
        self.probe_q = dec.cpu()  # (Hq, S + P, d): the decode queries and the extra probes (recall, float32)
        self.n_sink, self.cpu_end = n_sink, cpu_end

    def prompt(self):
        return self.keys[:, :, : self.T], self.values[:, :, : self.T]

    def new_token(self, s):
        return self.keys[:, :, self.T + s : self.T + s + 1], self.values[:, :, self.T + s : self.T + s + 1]

    def cpu_keys_dev(self, n):
        """(Hkv, n, d) device view of the first n CPU-part keys (CPU-local id i = position n_sink + i)."""
        return self.keys[0, :, self.n_sink : self.n_sink + n]


class ModelLayerData(LayerData):
    """One layer's attention inputs from the bundled model's own forward pass (--data model): real post-RoPE queries,
    keys and values, so the search meets the structure of trained attention (keys that drift with position, queries
    out of the keys' distribution, a few keys taking most of the mass) instead of a synthetic distribution's.

    record_model_inputs() runs tinyllama-byte-32k once over a natural-text passkey input of T + S + P tokens (the
    dump_model_qk.py haystack). Positions < T are the prompt, T..T+S-1 the decode steps, T+S.. the P extra probe
    queries for recall (queries that no graph trained on). The model's heads are smaller than the benchmark's shapes
    (6 layers x 2 kv heads x 3 query heads, dim 64), so:
      - benchmark kv head g of layer l is model kv head (l * Hkv + g) mod 12 (layer-major), so 8 kv heads of one
        benchmark layer come from four model layers;
      - query head j of a group is the model's query head j mod 3 of that kv head (the fourth repeats the first);
      - vectors fill the first 64 of the --head-dim dims, the rest are zeros: every inner product, hence every top-k
        and every graph, is the model's own, while the kernels do the work of --head-dim dims. Queries are scaled by
        sqrt(head_dim / 64) so that softmax(q.k / sqrt(head_dim)) is the model's softmax(q.k / 8);
      - the model's RoPE frequencies come along (rope_inv_freq), so ours moves its share of training queries to the
        decode position as RetrievalCache does for a real model.
    Training queries are all T prompt queries; RetrievalConfig.max_train_queries subsamples them as in real use.
    The model is trained up to 32,768 tokens; beyond that its RoPE angles are extrapolated, but the vectors remain its
    own projections of real text."""

    def __init__(self, args, T, S, layer, dev, rec):
        import torch

        Hq, Hkv, d = args.q_heads, args.kv_heads, args.head_dim
        G = Hq // Hkv
        P = args.probe_queries
        Lm, (Hkv_m, _, dm) = len(rec["k"]), rec["k"][0].shape
        Gm = rec["q"][0].shape[0] // Hkv_m
        if d < dm:
            raise SystemExit(f"--data model needs --head-dim >= the model's head dim {dm}")
        self.T, self.S = T, S
        qscale = math.sqrt(d / dm)
        keys = torch.zeros((1, Hkv, T + S, d), dtype=torch.bfloat16, device=dev)
        values = torch.zeros_like(keys)
        train = torch.zeros((1, Hq, T, d), dtype=torch.bfloat16, device=dev)
        dec = torch.zeros((Hq, S + P, d), dtype=torch.float32, device=dev)
        for g in range(Hkv):
            ml, mg = divmod((layer * Hkv + g) % (Lm * Hkv_m), Hkv_m)
            keys[0, g, :, :dm] = rec["k"][ml][mg, : T + S]
            values[0, g, :, :dm] = rec["v"][ml][mg, : T + S]
            for j in range(G):
                q = rec["q"][ml][mg * Gm + j % Gm].float() * qscale
                train[0, g * G + j, :, :dm] = q[:T]
                dec[g * G + j, :, :dm] = q[T : T + S + P].bfloat16().float()
        self.keys, self.values, self.train_q = keys, values, train
        self.dec_q = dec[:, :S].transpose(0, 1).reshape(S, 1, Hq, 1, d).bfloat16()
        self.probe_q = dec.cpu()
        self.n_sink = min(args.n_sink, T)
        self.cpu_end = max(self.n_sink, T - args.n_window)
        self.needle_pos = {}
        self.rope_inv_freq = rec["rope_inv_freq"]


def record_model_inputs(args, T, S, dev) -> dict:
    """The bundled model's Q/K/V over T + S + probe_queries tokens of the passkey input (ModelLayerData), on dev."""
    import dump_model_qk

    import retrieval_attention as ra

    n = T + S + args.probe_queries
    ids, span = dump_model_qk.build_prompt(n, 0.4, "48213")
    t0 = time.perf_counter()
    rec = dump_model_qk.record_attention_inputs(ids, str(dev), values=True)
    rec["rope_inv_freq"] = ra.rope_inv_freq(rec.pop("config"))
    log(f"context {T}: the bundled model's forward over {n} tokens in {time.perf_counter() - t0:.1f}s (needle at {span})")
    return rec


def make_layer_datas(args, T, S, L, dev) -> list:
    if args.data == "synthetic":
        return [LayerData(args, T, S, l, dev) for l in range(L)]
    rec = record_model_inputs(args, T, S, dev)
    return [ModelLayerData(args, T, S, l, dev, rec) for l in range(L)]


class StepCallTimer:
    """Stands in for a layer's OffloadedLayer and times the CPU part of its decode_step calls (the search and attention
    decode_attention's one C++ call makes, inside the timed step): its wall time is added to `ns`, its [search,
    attend] thread time to `phase_ns`, and its start and end (perf_counter_ns clock) kept. (Repeating the CPU part after
    the step would time it with warm caches and, with the warm start, seeded by its own results.) Everything else is
    forwarded."""

    def __init__(self, inner):
        import torch

        self._inner = inner
        self.ns = 0
        self.phase_ns = [0, 0]  # Python ints: no tensor op inside the timed step
        self._timing = torch.zeros(4, dtype=torch.int64)
        self.first_start = self.last_end = None  # perf_counter_ns at the first call's CPU part's start, the last one's end

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def decode_step(self, *args, **kwargs):
        result = self._inner.decode_step(*args, **kwargs, timing=self._timing)  # sets all four entries
        search, attend, start, end = self._timing.tolist()
        self.phase_ns[0] += search
        self.phase_ns[1] += attend
        if self.first_start is None:
            self.first_start = start
        self.last_end = end
        self.ns += end - start
        return result


def in_order_retrieve(offloaded, qp, top_k, ef, scale):
    """OffloadedLayer.retrieve_attend over the probe queries qp (Hq, P, d), one call per position in order, starting
    with no warm-start state -> out (Hq, P, dv), lse (Hq, P), visited (Hq, P), ids (Hq, P, top_k)."""
    import torch

    offloaded.clear_warm_start()
    parts = [offloaded.retrieve_attend(qp[:, j : j + 1].contiguous(), top_k, ef, scale, return_ids=True) for j in range(qp.shape[1])]
    return tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(4))


def exact_topk(data: LayerData, q, n, k, heads=None):
    """Exact top-k over the first n CPU keys for q (Hq, m, d) float32 -> ids (Hq', m, k) CPU int64, kth score (Hq', m),
    lse of the top-k and of all n keys (Hq', m) (natural log, scores x scale). heads: subset of query heads."""
    import torch

    Hq = q.shape[0]
    Hkv = data.keys.shape[1]
    G = Hq // Hkv
    heads = list(range(Hq)) if heads is None else list(heads)
    dev = data.keys.device
    scale = q.shape[-1] ** -0.5
    K = data.cpu_keys_dev(n)
    ids, kth, lse_top, lse_all = [], [], [], []
    for h in heads:
        s = q[h].to(dev) @ K[h // G].float().T  # (m, n)
        kk = min(k, n)
        top = torch.topk(s, kk, dim=1)
        ids.append(top.indices.cpu())
        kth.append(top.values[:, -1].cpu())
        lse_top.append(torch.logsumexp(top.values * scale, dim=1).cpu())
        lse_all.append(torch.logsumexp(s * scale, dim=1).cpu())
    return torch.stack(ids), torch.stack(kth), torch.stack(lse_top), torch.stack(lse_all)


def recall_of(found_ids, data: LayerData, q, n, kth, k, heads):
    """Tie-tolerant recall@k (qk_data.recall_per_query): share of the k slots holding a distinct valid id whose exact
    score is >= the exact k-th score. found_ids (len(heads), m, >=k)."""
    import torch

    Hkv = data.keys.shape[1]
    G = q.shape[0] // Hkv
    K = data.cpu_keys_dev(n)
    dev = K.device
    tot, cnt = 0.0, 0
    for i, h in enumerate(heads):
        ids = found_ids[i, :, :k].to(dev)
        srt = torch.sort(ids, dim=1).values
        ok = (srt >= 0) & (srt < n)
        ok[:, 1:] &= srt[:, 1:] != srt[:, :-1]  # distinct ids only
        sc = torch.einsum("mkd,md->mk", K[h // G, srt.clamp(0, n - 1)].float(), q[h].to(dev))
        th = kth[i].to(dev)
        tol = 1e-5 * th.abs().clamp(min=1.0)
        hit = ok & (sc >= (th - tol)[:, None])
        tot += float((hit.sum(1).float() / min(k, n)).sum())
        cnt += ids.shape[0]
    return tot / max(cnt, 1)


# ----------------------------------------------------------------------------------------------------------------
# baseline layers (research hooks of ra.RetrievalLayer)
# ----------------------------------------------------------------------------------------------------------------
def make_layer_classes(args):
    import numpy as np
    import torch

    import retrieval_attention as ra

    class StaticOnlyLayer(ra.RetrievalLayer):
        """The CPU part contributes nothing (out = 0, lse = -inf): attention over the sink + window tokens only."""

        def cpu_retrieve_attend(self, q_cpu, scaling):
            H, m, _ = q_cpu.shape
            return (torch.zeros(H, m, self.head_dim), torch.full((H, m), float("-inf")), torch.zeros(H, m, dtype=torch.int64))

    class IVFLayer(ra.RetrievalLayer):
        """faiss IndexIVFFlat (inner product) per (batch, kv head), trained on the prefill's CPU keys; evicted tokens are
        added without retraining. Its own contiguous bf16 K/V stores with spare capacity (so ra.sparse_attention reads
        them in place). Search: one faiss call per query head in a thread pool (faiss releases the GIL), then
        ra.sparse_attention over the found ids. Class attributes: nlist (None: 2^ceil(log2 sqrt n)), nprobe, pool."""

        nlist = None
        nprobe = 1
        pool = None
        record = False  # keep the last ids (recall measurement; off while timing)

        def _reset_state(self):
            super()._reset_state()
            self._ivf, self._K, self._V, self._n = None, None, None, 0
            self.t_search = self.t_attn = 0.0
            self.last_ids = None

        def on_cpu_tokens(self, keys, values, train_queries):
            import faiss

            t0 = time.perf_counter()
            t = keys.shape[1]
            if self._K is None or self._n + t > self._K.shape[1]:
                cap = max(2 * (self._n + t), 1024) if self._K is not None else self._n + t + 4096
                K = torch.zeros((keys.shape[0], cap, keys.shape[2]), dtype=keys.dtype)
                V = torch.zeros((values.shape[0], cap, values.shape[2]), dtype=values.dtype)
                if self._K is not None:
                    K[:, : self._n], V[:, : self._n] = self._K[:, : self._n], self._V[:, : self._n]
                self._K, self._V = K, V
            self._K[:, self._n : self._n + t] = keys
            self._V[:, self._n : self._n + t] = values
            self._n += t
            kf = keys.float().numpy()
            if self._ivf is None:
                n, d = keys.shape[1], keys.shape[2]
                nl = self.nlist or 2 ** math.ceil(math.log2(max(16.0, math.sqrt(n))))
                nl = max(1, min(nl, n))
                faiss.omp_set_num_threads(torch.get_num_threads())
                self._ivf = []
                for h in range(kf.shape[0]):
                    quant = faiss.IndexFlatIP(d)
                    idx = faiss.IndexIVFFlat(quant, d, nl, faiss.METRIC_INNER_PRODUCT)
                    idx.cp.seed = 1234 + h
                    idx.train(np.ascontiguousarray(kf[h]))
                    idx.add(np.ascontiguousarray(kf[h]))
                    self._ivf.append((idx, quant))
                self.nlist_used = nl
            else:
                for h, (idx, _) in enumerate(self._ivf):
                    idx.add(np.ascontiguousarray(kf[h]))
            self.set_nprobe(self.nprobe)
            self.build_seconds += time.perf_counter() - t0

        def set_nprobe(self, nprobe):
            self.nprobe = max(1, min(int(nprobe), self.nlist_used))
            for idx, _ in self._ivf:
                idx.nprobe = self.nprobe

        def search_ids(self, q_cpu):
            """q_cpu (H, m, d) float32 -> ids (H, m, k) int64."""
            H, m, d = q_cpu.shape
            G = H // len(self._ivf)
            k = min(self.cfg.top_k, self._n)
            qn = q_cpu.numpy()

            def one(h):
                return self._ivf[h // G][0].search(np.ascontiguousarray(qn[h]), k)[1]

            res = list(self.pool.map(one, range(H)))
            return torch.from_numpy(np.stack(res)).reshape(H, m, k)

        def visited(self, q_cpu):
            """Keys in the probed lists per (head, query) (the nlist centroid scan not counted)."""
            H, m, d = q_cpu.shape
            G = H // len(self._ivf)
            out = torch.empty(H, m, dtype=torch.int64)
            for h in range(H):
                idx, quant = self._ivf[h // G]
                _, lists = quant.search(np.ascontiguousarray(q_cpu[h].numpy()), self.nprobe)
                inv = idx.invlists
                for j in range(m):
                    out[h, j] = sum(inv.list_size(int(l)) for l in lists[j] if l >= 0)
            return out

        def cpu_retrieve_attend(self, q_cpu, scaling):
            t0 = time.perf_counter()
            ids = self.search_ids(q_cpu)
            t1 = time.perf_counter()
            out, lse = ra.sparse_attention(q_cpu, self._K, self._V, ids, scaling)
            t2 = time.perf_counter()
            self.t_search, self.t_attn = t1 - t0, t2 - t1
            if self.record:
                self.last_ids = ids
            vis = self.visited(q_cpu) if self.record else torch.zeros(q_cpu.shape[:2], dtype=torch.int64)
            return out, lse, vis

        @property
        def ivf_bytes(self):
            # IVF-Flat codes (float32) + ids (int64) + centroids
            if self._ivf is None:
                return 0
            return sum(idx.ntotal * (idx.d * 4 + 8) + idx.nlist * idx.d * 4 for idx, _ in self._ivf)

    class ThroughHookLayer(ra.RetrievalLayer):
        """ours through the cpu_retrieve_attend hook path of decode_attention (what research subclasses take), to
        time the built-in path's savings side by side."""

        def cpu_retrieve_attend(self, q_cpu, scaling):
            return super().cpu_retrieve_attend(q_cpu, scaling)

    return {"ours": ra.RetrievalLayer, "ours_cold": ra.RetrievalLayer, "ours_hook": ThroughHookLayer, "flat": ra.RetrievalLayer, "ivf": IVFLayer,
            "static": StaticOnlyLayer}


# ----------------------------------------------------------------------------------------------------------------
# one (context, method) cell
# ----------------------------------------------------------------------------------------------------------------
def run_full(args, T, datas, dev, flush, L_rep):
    """torch SDPA over all T + s keys on the device, per layer; KV written into preallocated buffers."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # cuDNN attention is left out: it builds a new execution plan for every new KV length (every decode step)
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    S, W = args.steps + args.warmup, args.warmup
    scale = args.head_dim ** -0.5
    per_step = []
    upd = []
    for s in range(S):
        tot = u = 0.0
        for data in datas:
            # full attention's cache update: write token T+s into the preallocated K/V buffers
            k_new, v_new = (x.clone() for x in data.new_token(s))
            sync(dev)
            t = time.perf_counter()
            data.keys[:, :, T + s : T + s + 1].copy_(k_new)
            data.values[:, :, T + s : T + s + 1].copy_(v_new)
            sync(dev)
            u += time.perf_counter() - t
            k, v = data.keys[:, :, : T + s + 1], data.values[:, :, : T + s + 1]
            # GQA decode: the G query heads of a kv group are G queries of that kv head (no mask: all keys visible)
            q = data.dec_q[s].reshape(1, args.kv_heads, args.q_heads // args.kv_heads, args.head_dim)
            flush()
            sync(dev)
            t = time.perf_counter()
            with sdpa_kernel(backends):
                F.scaled_dot_product_attention(q, k, v, scale=scale)
            sync(dev)
            tot += time.perf_counter() - t
        if s >= W:
            per_step.append(tot)
            upd.append(u)
    L = len(datas)
    ms_layer = 1e3 * sum(per_step) / len(per_step) / L
    kv32 = L_rep * 2 * args.kv_heads * T * args.head_dim * 2
    weights_8b = 16_060_000_000  # bf16 Llama-3-8B weights (8.03e9 parameters)
    fits = None
    if dev.type == "cuda":
        fits = kv32 + weights_8b <= torch.cuda.get_device_properties(dev).total_memory
    return {
        "ms_per_token": round(ms_layer * L_rep, 4) if fits is not False else None,
        "ms_per_token_if_fit": round(ms_layer * L_rep, 4),
        "update_ms_per_token": round(1e3 * sum(upd) / len(upd) / L * L_rep, 4),
        "gpu_attention_ms": round(ms_layer * L_rep, 4),
        "gpu_kv_bytes": kv32, "cpu_kv_bytes": 0, "cpu_index_bytes": 0,
        "recall": 1.0, "mass_frac_topk": 1.0, "cpu_mass_frac": 1.0, "scanned_frac": None,
        "fits_on_gpu_with_8b_weights": fits, "build_s": 0.0, "sdpa_backends": "flash,efficient,math",
    }


def profile_call(args, T, method, dev, fn):
    """--profile: fn() once under torch.profiler (CPU, plus CUDA on a GPU); the operator table goes to a text file."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    os.makedirs(args.profile, exist_ok=True)
    path = os.path.join(args.profile, f"profile_{T}_{method}.txt")
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=40) + "\n")
        f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40) + "\n")
    log(f"  {method}: profile of one decode_attention call -> {path}")


def run_retrieval(args, method, T, datas, dev, flush, classes, L_rep, shared):
    import concurrent.futures as cf

    import torch

    import retrieval_attention as ra
    from retrieval_attention.index import exact_knn
    from retrieval_attention.ops import dense_attention_any_device, merge_attention_any_device

    S, W = args.steps + args.warmup, args.warmup
    Hq, d = args.q_heads, args.head_dim
    scale = d ** -0.5
    params = dict(args.index_params)
    cfg = ra.RetrievalConfig(n_sink=args.n_sink, n_window=args.n_window, top_k=args.top_k, index=LIB_INDEX[method], ef=args.ef,
                             index_params=params if method in OURS else {},
                             index_sharing=args.index_sharing if method in OURS else "per_query_head",
                             max_train_queries=None if args.max_train_queries == 0 else args.max_train_queries,
                             evict_chunk=1,  # one token moves to the CPU per step: CPU id i <-> position n_sink + i below
                             max_unindexed_tokens=args.max_unindexed, warm_start=method != "ours_cold")
    cls = classes[method]
    extra = {}
    if method == "ivf":
        cls.nlist = args.ivf_nlist
        cls.nprobe = 1
        cls.pool = shared.setdefault("pool", cf.ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())))
    layers, build = [], []
    for l, data in enumerate(datas):
        layer = cls(cfg, Hq, args.kv_heads, d, l)
        if data.rope_inv_freq is not None:  # as RetrievalCache sets them from a model's config
            layer.rope_inv_freq = data.rope_inv_freq
            layer.train_shift_share = float(cfg.shift_train_queries)
        k, v = data.prompt()
        layer.update(k, v)
        sync(dev)
        layer.finish_prefill(data.train_q)  # on a GPU the CPU build runs in the library's background thread
        layers.append(layer)
    for l, layer in enumerate(layers):
        layer.wait_for_index()  # the layer's background build
        build.append(layer.build_seconds)  # synchronous part (GPU kNN, copies) + background build
        log(f"  {method} layer {l}: built in {layer.build_seconds:.2f}s (cpu tokens {layer.cpu_tokens}, static {layer.static_tokens})")
    sync(dev)
    n0 = layers[0].cpu_tokens
    d0 = datas[0]
    assert n0 == d0.cpu_end - d0.n_sink, (n0, d0.cpu_end, d0.n_sink)

    # --- recall / mass / scanned at the prefill state (layer 0; untimed) --------------------------------------------
    qp = d0.probe_q  # (Hq, S + P, d) float32: the decode queries + extra probes
    ex_ids, ex_kth, ex_lse_top, ex_lse_all = exact_topk(d0, qp, n0, args.top_k)
    rec = {"recall": None}
    lay0 = layers[0]
    if method == "ivf":
        lay0.record = True
        target = args.ivf_target_recall if args.ivf_target_recall is not None else shared.get("ours_recall") or 0.9
        if args.ivf_nprobe:
            lay0.set_nprobe(args.ivf_nprobe)
        else:  # the smallest nprobe whose recall on the recall heads reaches the target: powers of 2, then bisection
            chosen, sweep = None, []
            nl = lay0.nlist_used

            def ivf_recall(npb):
                lay0.set_nprobe(npb)
                r = recall_of(lay0.search_ids(qp), d0, qp, n0, ex_kth, args.top_k, list(range(Hq)))
                sweep.append((npb, round(r, 4)))
                return r

            below = 0  # largest nprobe known to stay under the target
            for npb in sorted({min(nl, 2 ** i) for i in range(0, int(math.log2(nl)) + 2)}):
                if ivf_recall(npb) >= target - 1e-9:
                    chosen = npb
                    break
                below = npb
            while chosen is not None and chosen - below > 1:  # recall grows with nprobe: bisect (below, chosen]
                mid = (below + chosen) // 2
                if ivf_recall(mid) >= target - 1e-9:
                    chosen = mid
                else:
                    below = mid
            chosen = chosen or nl
            lay0.set_nprobe(chosen)
            extra["ivf_nprobe_sweep"] = sweep
            extra["ivf_target_recall"] = round(target, 4)
        extra["ivf_nlist"] = lay0.nlist_used
        extra["ivf_nprobe"] = lay0.nprobe
        for lay in layers[1:]:
            lay.set_nprobe(lay0.nprobe)
    if method in ("ivf", "static"):
        out_c, lse_c, vis = lay0.cpu_retrieve_attend(qp, scale)
    if method == "ivf":
        rec["recall"] = recall_of(lay0.last_ids, d0, qp, n0, ex_kth, args.top_k, list(range(Hq)))
        lay0.record = False
    elif method == "static":
        rec["recall"] = 0.0
    else:
        # the layer's own retrieved ids, one call per probe position in order, as decode steps make them (the warm
        # start carries each head's results to the next position)
        out_c, lse_c, vis, ids = in_order_retrieve(lay0.offloaded, qp, cfg.top_k, cfg.search_beam(n0), scale)
        rec["recall"] = recall_of(ids, d0, qp, n0, ex_kth, args.top_k, list(range(Hq)))
        if method in ("ours", "ours_cold") and args.ef_sweep:
            sweep = []
            for ef in args.ef_sweep:
                _, _, v_ef, ids = in_order_retrieve(lay0.offloaded, qp, cfg.top_k, ef, scale)
                sweep.append((ef, round(recall_of(ids, d0, qp, n0, ex_kth, args.top_k, list(range(Hq))), 4),
                              round(float(v_ef.double().mean()) / n0, 5)))
            rec["ef_sweep"] = sweep  # (ef, recall, scanned_frac) on layer 0, all heads
            if args.ef_auto:
                ok = [e for e, r, _ in sweep if r >= args.target_recall]
                cfg.ef = min(ok) if ok else max(e for e, _, _ in sweep)
                log(f"  {method}: ef={cfg.ef} chosen (smallest of the sweep with recall >= {args.target_recall})")
                out_c, lse_c, vis, ids = in_order_retrieve(lay0.offloaded, qp, cfg.top_k, cfg.search_beam(n0), scale)
                rec["recall"] = recall_of(ids, d0, qp, n0, ex_kth, args.top_k, list(range(Hq)))
        rec["ef_used"] = cfg.search_beam(n0)
    if method == "ours" and rec["recall"] is not None:
        shared["ours_recall"] = rec["recall"]
    lse_c = lse_c.float()
    mass_topk = torch.exp(lse_c - ex_lse_top).clamp(max=1.0)  # share of the exact top-k's softmax mass retrieved
    mass_cpu = torch.exp(lse_c - ex_lse_all).clamp(max=1.0)   # share of all CPU keys' mass retrieved
    rec["mass_frac_topk"] = round(float(mass_topk.mean()), 4)
    rec["cpu_mass_frac"] = round(float(mass_cpu.mean()), 4)
    visited_mean = float(vis.double().mean()) if method != "static" else 0.0
    rec["keys_visited_per_query"] = round(visited_mean, 1)
    rec["scanned_frac"] = round(visited_mean / n0, 5)
    rec["recall_queries_per_head"] = int(qp.shape[1])

    # --- timed decode steps ----------------------------------------------------------------------------------------
    acc = {k: 0.0 for k in ("e2e", "update", "q2cpu", "gpu", "cpu", "cpu_attn", "cpu_search", "back", "merge", "cpu_in_step",
                            "before_cpu", "after_cpu", "sync")}
    builtin = type(layers[0]).cpu_retrieve_attend is ra.RetrievalLayer.cpu_retrieve_attend  # ours, flat
    if builtin:
        for layer in layers:
            layer.offloaded = StepCallTimer(layer.offloaded)
    thread_ns = [0, 0]  # summed over the timed calls
    for s in range(S):
        timed = s >= W
        for l, (layer, data) in enumerate(zip(layers, datas)):
            k_new, v_new = data.new_token(s)
            sync(dev)
            t = time.perf_counter()
            layer.update(k_new, v_new)
            sync(dev)
            t_upd = time.perf_counter() - t
            n_cpu = layer.cpu_tokens
            assert n_cpu == n0 + s, (n_cpu, n0, s)  # CPU-local id i <-> position n_sink + i
            q = data.dec_q[s]
            flush()
            sync(dev)
            if args.profile and l == 0 and s == W - 1:  # untimed step: where a decode step's time goes, op by op
                profile_call(args, T, method, dev, lambda: layer.decode_attention(q, scale))
                flush()
                sync(dev)
            if builtin:
                layer.offloaded.ns = 0
                layer.offloaded.first_start = None
                layer.offloaded.phase_ns = [0, 0]
            t0_ns = time.perf_counter_ns()
            t = time.perf_counter()
            out = layer.decode_attention(q, scale)
            t_ret_ns = time.perf_counter_ns()
            sync(dev)
            t_e2e = time.perf_counter() - t
            t_end_ns = time.perf_counter_ns()
            t_in_step = t_before = t_after = float("nan")
            if builtin:  # the step's wall time around its CPU call: before it, after it (Python, launches), the sync
                timer = layer.offloaded
                t_in_step = timer.ns / 1e9
                t_before = (timer.first_start - t0_ns) / 1e9
                t_after = (t_ret_ns - timer.last_end) / 1e9
            t_sync = (t_end_ns - t_ret_ns) / 1e9
            # the parts, one by one (each after a cache flush)
            flush()
            sync(dev)
            t = time.perf_counter()
            q_cpu = layer.wait_query(layer.query_to_host(q.reshape(Hq, 1, d)))  # the layer's own transfer path
            t_q = time.perf_counter() - t
            kf, vf = layer._flat_heads(layer.keys), layer._flat_heads(layer.values)
            qf = q.reshape(Hq, 1, d)
            sync(dev)
            t = time.perf_counter()
            o_g, l_g = dense_attention_any_device(qf, kf, vf, scale, causal=True)
            sync(dev)
            t_gpu = time.perf_counter() - t
            flush()
            if builtin:  # decode_attention's own fused call, timed inside the step; results of its shape for the copy
                t_cpu = t_in_step
                o_c = torch.zeros(Hq, 1, layer.values.shape[-1])
                l_c = torch.zeros(Hq, 1)
            else:
                t = time.perf_counter()
                o_c, l_c, _ = layer.cpu_retrieve_attend(q_cpu, scale)
                t_cpu = time.perf_counter() - t
            sync(dev)
            t = time.perf_counter()
            o_cd, l_cd = layer.results_to_device(o_c, l_c, o_g.device)
            sync(dev)
            t_back = time.perf_counter() - t
            t = time.perf_counter()
            merge_attention_any_device(o_g, l_g, o_cd, l_cd)
            sync(dev)
            t_merge = time.perf_counter() - t
            if method == "ivf":
                t_attn, t_search = layer.t_attn, layer.t_search
            elif method == "static":
                t_attn = t_search = 0.0
            elif builtin:
                # the fused call's wall time split in the proportion of its items' thread time (OffloadedLayer's
                # RetrievePhaseTimes): search (index or exact scan, merge) against attention over the selected keys
                ns = layer.offloaded.phase_ns
                share = ns[1] / max(1, ns[0] + ns[1])
                t_attn, t_search = t_cpu * share, t_cpu * (1.0 - share)
                if timed:
                    thread_ns[0] += ns[0]
                    thread_ns[1] += ns[1]
                layer.offloaded.phase_ns = [0, 0]
            else:  # a research hook's own call: not split
                t_attn = t_search = float("nan")
            del out
            if timed:
                for key, val in (("e2e", t_e2e), ("update", t_upd), ("q2cpu", t_q), ("gpu", t_gpu), ("cpu", t_cpu),
                                 ("cpu_attn", t_attn), ("cpu_search", t_search), ("back", t_back), ("merge", t_merge),
                                 ("cpu_in_step", t_in_step), ("before_cpu", t_before), ("after_cpu", t_after), ("sync", t_sync)):
                    acc[key] += val
    L = len(layers)
    per = {k: 1e3 * v / args.steps / L * L_rep for k, v in acc.items()}  # ms per token over L_rep layers
    st = [lay.stats() for lay in layers]
    gpu_b = sum(x["device_kv_bytes"] for x in st) / L * L_rep
    cpu_b = sum(x["cpu_kv_bytes"] for x in st) / L * L_rep
    idx_b = sum(x["cpu_index_bytes"] for x in st) / L * L_rep
    if method == "ivf":
        idx_b = sum(lay.ivf_bytes for lay in layers) / L * L_rep
        cpu_b = sum(2 * lay._n * lay._K.shape[0] * d * lay._K.element_size() for lay in layers) / L * L_rep
    # physical floor of the CPU side: bytes read per token / measured bandwidth
    elt = 2  # bf16 storage
    key_bytes = 4 if method == "ivf" else elt  # faiss IVF-Flat stores float32 codes
    k_eff = 0 if method == "static" else min(args.top_k, n0)
    if method == "flat":  # the exact scan reads each kv head's rows once for its whole GQA group (KeyIndex::exact)
        scan_bytes = L_rep * args.kv_heads * n0 * d * elt
    else:
        scan_bytes = L_rep * Hq * visited_mean * d * key_bytes
    floor_bytes = scan_bytes + L_rep * Hq * k_eff * (d + d) * elt
    res = {
        "ms_per_token": round(per["e2e"], 4),
        "update_ms_per_token": round(per["update"], 4),
        "gpu_static_ms": round(per["gpu"], 4),
        "cpu_search_ms": None if math.isnan(per["cpu_search"]) else round(per["cpu_search"], 4),  # None: a hook's call, not split
        "cpu_attention_ms": None if math.isnan(per["cpu_attn"]) else round(per["cpu_attn"], 4),
        "cpu_retrieve_attend_ms": round(per["cpu"], 4),
        # the same fused call timed inside the decode step (None: not the built-in retrieval)
        "cpu_call_in_step_ms": None if math.isnan(per["cpu_in_step"]) else round(per["cpu_in_step"], 4),
        # the rest of the timed step: from its start to the CPU call, from the call to decode_attention's return, the
        # final device sync (the GPU work still queued then)
        "step_before_cpu_ms": None if math.isnan(per["before_cpu"]) else round(per["before_cpu"], 4),
        "step_after_cpu_ms": None if math.isnan(per["after_cpu"]) else round(per["after_cpu"], 4),
        "step_sync_ms": round(per["sync"], 4),
        "transfer_ms": round(per["q2cpu"] + per["back"], 4),
        "transfer_q_to_cpu_ms": round(per["q2cpu"], 4),
        "transfer_out_to_gpu_ms": round(per["back"], 4),
        "merge_ms": round(per["merge"], 4),
        "parts_sum_ms": round(per["q2cpu"] + per["gpu"] + per["cpu"] + per["back"] + per["merge"], 4),
        "gpu_kv_bytes": int(gpu_b), "cpu_kv_bytes": int(cpu_b), "cpu_index_bytes": int(idx_b),
        "cpu_bytes_read_per_token": int(floor_bytes),
        "floor_ms": round(1e3 * floor_bytes / (shared["bw_gbs"] * 1e9), 4),
        "build_s": round(sum(build) / L, 3),
        "build_s_per_layer": [round(b, 3) for b in build],
        "build_s_32_layers_extrapolated": round(sum(build) / L * L_rep, 1),
        "cpu_search_ms_measured": method == "ivf",
        "cpu_split": {"ivf": "measured", "static": None}.get(method, "thread_time" if method in ("ours", "ours_cold", "flat") else None),
        "cpu_search_thread_ms": round(1e3 * thread_ns[0] / 1e9 / args.steps / L * L_rep, 4),
        "cpu_attention_thread_ms": round(1e3 * thread_ns[1] / 1e9 / args.steps / L * L_rep, 4),
        "train_queries_shifted": st[0]["train_queries_shifted"],
    }
    res.update(rec)
    res.update(extra)
    return res


def run_context(args, T, dev, shared, emit):
    import gc

    import torch

    L = args.layers_1m if T >= 524288 else args.layers
    S = args.steps + args.warmup
    flush = shared["flush"]
    classes = shared["classes"]
    t0 = time.perf_counter()
    datas = make_layer_datas(args, T, S, L, dev)
    sync(dev)
    log(f"context {T}: data for {L} layer(s) in {time.perf_counter() - t0:.1f}s")
    base = {"bench": "decode", "context": T, "device": device_desc(dev), "cpu": cpu_desc(), "threads": torch.get_num_threads(),
            "layers_measured": L, "layers_reported": args.layers_reported,
            "scaling": f"per-layer mean over {L} measured layer(s) x {args.layers_reported}",
            "q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": "bfloat16",
            "top_k": args.top_k, "ef": args.ef, "n_sink": args.n_sink, "n_window": args.n_window,
            "train_queries": min(int(datas[0].train_q.shape[2]), args.max_train_queries or T), "steps": args.steps,
            **({"data": "synthetic_ood+needles", "key_clusters": args.key_clusters, "cluster_frac": args.cluster_frac} if args.data == "synthetic"
               else {"data": "model_qk"}),
            "cpu_bw_gbs": round(shared["bw_gbs"], 2)}
    for method in args.methods:
        if args.budget_s is not None and time.perf_counter() - T0 > args.budget_s:
            log(f"context {T} {method}: skipped (past --budget-s {args.budget_s})")
            continue
        if method == "ivf" and not shared["have_faiss"]:
            log(f"context {T} ivf: skipped (faiss is not installed here)")
            continue
        t1 = time.perf_counter()
        try:
            if method == "full":
                r = run_full(args, T, datas, dev, flush, args.layers_reported)
            else:
                r = run_retrieval(args, method, T, datas, dev, flush, classes, args.layers_reported, shared)
        except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203
            log(f"context {T} {method}: out of device memory ({str(e)[:200]})")
            r = {"ms_per_token": None, "error": "out of memory"}
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rec = {**base, "method": method, **r, "cell_s": round(time.perf_counter() - t1, 1)}
        if method in OURS:
            rec["index_sharing"] = args.index_sharing
        emit(rec)
    del datas
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# end to end: a randomly initialised 8B-shaped Llama
# ----------------------------------------------------------------------------------------------------------------
def run_e2e(args, dev, emit):
    import gc

    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    import retrieval_attention as ra
    from retrieval_attention.compat import cache_kwarg, set_attn_implementation

    ctx, new = args.e2e_context, args.e2e_new_tokens
    q = args.quick
    # each layer's index build, as the library logs it, with this script's clock
    ra_log = logging.getLogger("retrieval_attention")
    handler = logging.Handler()
    handler.emit = lambda r: log(f"  [{r.threadName}] {r.getMessage()}")
    ra_log.addHandler(handler)
    ra_log.setLevel(logging.INFO)
    hidden, inter, heads, kvh = (256, 512, 8, 2) if q else (4096, 14336, 32, 8)
    conf = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=args.e2e_layers, num_attention_heads=heads,
                       num_key_value_heads=kvh, vocab_size=args.e2e_vocab, max_position_embeddings=ctx + new + 16,
                       rope_theta=500000.0, tie_word_embeddings=False)
    t0 = time.perf_counter()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(conf)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    cache_kw = cache_kwarg(model)
    sync(dev)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"e2e: random Llama ({n_params / 1e9:.2f}B parameters, {args.e2e_layers} layers) made on {dev} in {time.perf_counter() - t0:.1f}s")
    g = torch.Generator(device=dev).manual_seed(args.seed)
    ids = torch.randint(0, args.e2e_vocab, (1, ctx), device=dev, generator=g)
    base = {"bench": "decode_e2e", "context": ctx, "device": device_desc(dev), "params": n_params, "layers": args.e2e_layers,
            "hidden": hidden, "q_heads": heads, "kv_heads": kvh, "new_tokens": new, "weights": "random (bf16, made on the device)"}
    rcfg = ra.RetrievalConfig(n_sink=args.n_sink, n_window=args.n_window, top_k=args.top_k, index=args.e2e_index, ef=args.ef,
                              index_params=dict(args.index_params) if args.e2e_index == "query_guided" else {},
                              index_sharing=args.index_sharing,
                              max_train_queries=None if args.max_train_queries == 0 else args.max_train_queries,
                              decode_during_build=args.e2e_decode_during_build)
    for method in args.e2e_methods:
        if args.budget_s is not None and time.perf_counter() - T0 > args.budget_s:
            log(f"e2e {method}: skipped (past --budget-s)")
            continue
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        base_mem = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        if method == "full":
            set_attn_implementation(model, "sdpa")
            cache = DynamicCache()
        else:
            set_attn_implementation(model, "retrieval_attention")
            cache = ra.RetrievalCache(model.config, rcfg)
        try:
            with torch.no_grad():
                sync(dev)
                t = time.perf_counter()
                out = model(input_ids=ids, **{cache_kw: cache}, use_cache=True, logits_to_keep=1)
                sync(dev)
                prefill_s = time.perf_counter() - t
                peak_prefill = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
                nxt = out.logits[:, -1:].argmax(-1)
                del out
                t_prefilled = time.perf_counter()

                def decode_steps(n):
                    nonlocal nxt
                    times, building = [], []
                    for _ in range(n):
                        sync(dev)
                        t = time.perf_counter()
                        out = model(input_ids=nxt, **{cache_kw: cache}, use_cache=True)
                        nxt = out.logits[:, -1:].argmax(-1)
                        sync(dev)
                        times.append(time.perf_counter() - t)
                        del out
                        # layers whose indexes were still being built (their CPU rows scanned exactly) at this step
                        building.append(0 if method == "full" else sum(lay.building for lay in cache.layers))
                    return times, building

                step_s, building = decode_steps(new)
                log(f"e2e {method}: prefill {prefill_s:.1f}s, first decode step {step_s[0]:.2f}s, {new} steps in {sum(step_s):.1f}s "
                    f"(layers still building at the last: {building[-1]})")
                indexed = {}
                if method != "full":
                    # then the steady state: every layer indexed
                    cache.wait_for_indexes()
                    # when the last layer's indexes were made (timed by the layers; the decode steps above may have
                    # run past it); 0 when the prefill built them itself (CPU) or no layer had CPU tokens to index
                    made = [lay.indexed_at for lay in cache.layers if lay.indexed_at is not None]
                    ready_s = max(0.0, max(made) - t_prefilled) if made else 0.0
                    after_s, _ = decode_steps(new)
                    indexed = {"indexes_ready_after_prefill_s": round(ready_s, 3),
                               "decode_tokens_per_s_indexed": round(len(after_s[1:]) / sum(after_s[1:]), 3) if new > 1 else None,
                               "ms_per_token_indexed": round(1e3 * sum(after_s[1:]) / len(after_s[1:]), 3) if new > 1 else None,
                               "step_ms_indexed": [round(1e3 * x, 2) for x in after_s[1:]]}
                    log(f"e2e {method}: indexes ready {ready_s:.1f}s after the prefill; then {indexed['ms_per_token_indexed']} ms/token")
        except torch.cuda.OutOfMemoryError as e:
            log(f"e2e {method}: out of device memory ({str(e)[:200]})")
            emit({**base, "method": method, "error": "out of memory"})
            del cache
            gc.collect()
            continue
        timed = step_s[1:] if len(step_s) > 1 else step_s  # first decode step warms up
        rec = {**base, "method": method, "prefill_s": round(prefill_s, 3),
               "decode_tokens_per_s": round(len(timed) / sum(timed), 3), "ms_per_token": round(1e3 * sum(timed) / len(timed), 3),
               "gpu_peak_bytes_prefill": int(peak_prefill),
               "gpu_peak_bytes": int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else 0,
               "gpu_model_bytes": int(base_mem), "first_decode_step_s": round(step_s[0], 3),
               "step_ms": [round(1e3 * x, 2) for x in timed],  # each timed step: is the host steady?
               "layers_building_per_step": building[1:] if len(building) > 1 else building, **indexed}
        if method == "full":
            kv = sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values) if t is not None)
            rec.update({"gpu_kv_bytes": int(kv), "cpu_kv_bytes": 0, "index_build_s": 0.0})
        else:
            sm = cache.summary()
            rec.update({"gpu_kv_bytes": int(sm["device_kv_bytes"]), "cpu_kv_bytes": int(sm["cpu_kv_bytes"]),
                        "cpu_index_bytes": int(sm["cpu_index_bytes"]), "index_build_s": round(sm["index_build_s"], 3),
                        "knn_s": round(sm["knn_s"], 3), "knn_parts_s": {k: round(v, 3) for k, v in sm["knn_parts_s"].items()},
                        "offload_s": round(sm["offload_s"], 3), "max_train_queries": rcfg.max_train_queries,
                        "scanned_frac": round(sm["scanned_frac"], 5), "index": args.e2e_index, "index_sharing": args.index_sharing,
                        "decode_during_build": rcfg.decode_during_build,
                        "note": "on a GPU the index builds run in background threads during and after the prefill; the "
                                "first decode step waits for them unless decode_during_build (then layers not yet indexed "
                                "scan their CPU rows exactly: layers_building_per_step); decode_tokens_per_s: the steps "
                                "after the first; decode_tokens_per_s_indexed: the steps after wait_for_indexes()"})
        emit(rec)
        del cache
        gc.collect()
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------------
def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(results) -> str:
    rows = [r for r in results if r["bench"] == "decode"]
    head = (f"{'context':>8} {'method':<9} {'ms/token':>9} {'+update':>8} {'recall':>6} {'scan%':>6} {'gpuKV MB':>9} "
            f"{'cpuKV MB':>9} {'gpu_st':>7} {'search':>7} {'cpu_att':>7} {'cpu@st':>7} {'xfer':>6} {'merge':>6} {'floor':>6} {'build/L s':>9}")
    lines = [f"decode attention per token, summed over {rows[0]['layers_reported'] if rows else 32} layers "
             "(ms; measured layers x scale; breakdown parts timed separately; cpu@st: the CPU call inside the step)", head]
    for r in rows:
        ms = r.get("ms_per_token")
        if ms is None and r.get("ms_per_token_if_fit") is not None:
            ms_s = f"({r['ms_per_token_if_fit']:.2f})"  # would not fit next to 8B weights
        else:
            ms_s = fmt(ms)
        sf = r.get("scanned_frac")
        lines.append(
            f"{r['context']:>8} {r['method']:<9} {ms_s:>9} {fmt(r.get('update_ms_per_token')):>8} {fmt(r.get('recall'), 3):>6} "
            f"{fmt(None if sf is None else 100 * sf, 2):>6} {r.get('gpu_kv_bytes', 0) / 2**20:>9.1f} {r.get('cpu_kv_bytes', 0) / 2**20:>9.1f} "
            f"{fmt(r.get('gpu_static_ms', r.get('gpu_attention_ms'))):>7} {fmt(r.get('cpu_search_ms')):>7} {fmt(r.get('cpu_attention_ms')):>7} "
            f"{fmt(r.get('cpu_call_in_step_ms')):>7} {fmt(r.get('transfer_ms')):>6} {fmt(r.get('merge_ms')):>6} {fmt(r.get('floor_ms')):>6} {fmt(r.get('build_s'), 1):>9}")
    # the acceptance checks, per context where all needed methods ran
    by = {}
    for r in rows:
        by.setdefault(r["context"], {})[r["method"]] = r
    for T, m in sorted(by.items()):
        o = m.get("ours")
        if not o or o.get("ms_per_token") is None:
            continue
        parts = [f"context {T}: ours {o['ms_per_token']:.2f} ms (recall {fmt(o.get('recall'), 3)})"]
        if "flat" in m and m["flat"].get("ms_per_token"):
            parts.append(f"flat/ours = {m['flat']['ms_per_token'] / o['ms_per_token']:.1f}x (target >= 10)")
        if "ivf" in m and m["ivf"].get("ms_per_token"):
            iv = m["ivf"]
            parts.append(f"ivf/ours = {iv['ms_per_token'] / o['ms_per_token']:.1f}x at recall {fmt(iv.get('recall'), 3)} (target >= 3)")
        if "full" in m:
            parts.append(f"gpu KV ours/full = {100 * o['gpu_kv_bytes'] / m['full']['gpu_kv_bytes']:.2f}% (target <= 1%)")
        parts.append(f"floor {fmt(o.get('floor_ms'))} ms at {o['cpu_bw_gbs']} GB/s")
        lines.append("; ".join(parts))
    for r in results:
        if r["bench"] == "decode_e2e" and "error" not in r:
            lines.append(f"e2e {r['context']} {r['method']}: prefill {r['prefill_s']:.1f}s (index build {fmt(r.get('index_build_s'), 1)}s), "
                         f"{r['decode_tokens_per_s']:.2f} tokens/s, GPU KV {r['gpu_kv_bytes'] / 2**20:.0f} MB, "
                         f"GPU peak {r['gpu_peak_bytes'] / 2**30:.1f} GiB")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["bench"] == "decode"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for m in METHODS:
        pts = [(r["context"], r.get("ms_per_token") or r.get("ms_per_token_if_fit")) for r in rows if r["method"] == m]
        pts = [p for p in pts if p[1]]
        if pts:
            ax[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
        pts = [(r["context"], r["gpu_kv_bytes"] / 2**30) for r in rows if r["method"] == m and r.get("gpu_kv_bytes")]
        if pts:
            ax[1].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
    for a, yl in zip(ax, ("attention ms per token (32 layers)", "GPU KV GiB (32 layers)")):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("context tokens")
        a.set_ylabel(yl)
        a.grid(True, which="both", alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.watchdog_s:
        faulthandler.dump_traceback_later(args.watchdog_s, repeat=True, file=sys.stderr)
    import torch

    import retrieval_attention as ra  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    results = []
    jsonl = open(os.path.join(args.out, "decode_latency_quick.jsonl" if args.quick else "decode_latency.jsonl"), "w") if args.out else None

    def emit(rec):
        results.append(rec)
        line = json.dumps(rec)
        if args.json:
            print(line, flush=True)
        if jsonl:
            jsonl.write(line + "\n")
            jsonl.flush()
        if rec.get("method"):  # not the closing decode_env line
            log(f"{rec.get('context')} {rec['method']}: ms/token {rec.get('ms_per_token')} recall {rec.get('recall')}")

    try:
        import faiss  # noqa: F401

        have_faiss = True
    except ImportError:
        have_faiss = False
        if "ivf" in args.methods:
            log("note: faiss is not installed: the ivf method is skipped")
    bw = measure_cpu_bandwidth(64 if args.quick else 1024)
    log(f"device {device_desc(dev)}, cpu {cpu_desc()}, {torch.get_num_threads()} threads, CPU copy bandwidth {bw:.1f} GB/s")
    shared = {"bw_gbs": bw, "flush": CacheFlusher(args.flush_mb), "classes": make_layer_classes(args), "have_faiss": have_faiss}
    for T in args.contexts:
        if args.budget_s is not None and time.perf_counter() - T0 > args.budget_s:
            log(f"context {T}: skipped (past --budget-s {args.budget_s})")
            continue
        run_context(args, T, dev, shared, emit)
    if args.e2e:
        run_e2e(args, dev, emit)
    if args.watchdog_s:
        faulthandler.cancel_dump_traceback_later()
    if "pool" in shared:
        shared["pool"].shutdown()
    env = {"bench": "decode_env", "device": device_desc(dev), "cpu": cpu_desc(), "threads": torch.get_num_threads(),
           "cpu_bw_gbs": round(bw, 2), "numa_nodes": numa_nodes(), "torch": torch.__version__, "have_faiss": have_faiss, "quick": args.quick,
           "total_s": round(time.perf_counter() - T0, 1), "argv": sys.argv[1:] if argv is None else list(argv)}
    emit(env)
    txt = table(results)
    print(txt, file=sys.stderr, flush=True)
    if not args.json:
        print(txt)
    if jsonl:
        jsonl.close()
    if args.out and not args.no_plot and any(r["bench"] == "decode" for r in results):
        plot(results, os.path.join(args.out, "decode_latency_quick.png" if args.quick else "decode_latency.png"))
    return results


if __name__ == "__main__":
    main()
