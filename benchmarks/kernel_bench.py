"""Latency of the CUDA dense_attention (static-set decode attention) against torch SDPA at Llama-3-8B shapes.

One JSON object per result line on stdout (everything else on stderr):
  {"bench": "kernel", "op": "dense_attention" | "sdpa" | "merge_attention", "dtype": "bfloat16", "q_heads": 32,
   "kv_heads": 8, "head_dim": 128, "m": 1, "n": 640, "causal": true, "us_loop": 12.3, "us_graph": 6.1,
   "kv_gb_per_s": 850.0, "max_abs_err_vs_sdpa": 1e-6, "device": "NVIDIA H200"}
us_loop: mean per call over a Python loop of back-to-back calls (includes dispatch / launch overhead);
us_graph: mean per call replaying a CUDA graph of the same calls (device time; null if capture failed).
kv_gb_per_s: bytes of keys + values read once per call / us_graph (or us_loop) -- an effective rate, since
GQA query heads re-read their group's keys (from L2).

Usage: python benchmarks/kernel_bench.py [--quick] [--json] [--n 640 4096] [--dtype bfloat16 float16]
Without a CUDA device it prints a note on stderr and exits 0 with no results.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F


def log(*a):
    print(*a, file=sys.stderr)


def time_loop(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def time_graph(fn, iters: int, per_graph: int = 20):
    """Mean microseconds per call, replaying a CUDA graph of `per_graph` calls; None if capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(per_graph):
                fn()
        g.replay()
        torch.cuda.synchronize()
        reps = max(1, iters // per_graph)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / (reps * per_graph)
    except Exception as exc:  # noqa: BLE001 - report, don't fail the benchmark
        log(f"graph capture failed: {type(exc).__name__}: {exc}")
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations (well under 60 s)")
    ap.add_argument("--json", action="store_true", help="JSON lines only on stdout (the default output is the same JSON)")
    ap.add_argument("--n", type=int, nargs="+", default=[640, 4096], help="static-set sizes")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float16"])
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--m", type=int, default=1, help="queries per head (1 = one decode step)")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        log("kernel_bench: no CUDA device; nothing to measure")
        return 0
    import retrieval_attention  # noqa: F401  (registers the ops)

    ops = torch.ops.retrieval_attention
    if not torch._C._dispatch_has_kernel_for_dispatch_key("retrieval_attention::dense_attention", "CUDA"):
        log("kernel_bench: the extension has no CUDA kernels (built without csrc/cuda); nothing to measure")
        return 1
    iters, warmup = (200, 20) if args.quick else (2000, 100)
    dev_name = torch.cuda.get_device_name()
    hq, hkv, d, m = args.q_heads, args.kv_heads, args.head_dim, args.m
    scale = d**-0.5
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for n in args.n:
            g = torch.Generator(device="cuda").manual_seed(n)
            q = torch.randn(hq, m, d, device="cuda", dtype=dtype, generator=g)
            keys = torch.randn(hkv, n, d, device="cuda", dtype=dtype, generator=g)
            values = torch.randn(hkv, n, d, device="cuda", dtype=dtype, generator=g)
            kv_bytes = 2 * keys.numel() * keys.element_size()
            causal = True

            def ours():
                return ops.dense_attention(q, keys, values, scale, causal)

            # SDPA with the same bottom-right causal semantics: for m == 1 no mask is needed.
            mask = None
            if m > 1:
                mask = torch.arange(n, device="cuda")[None, :] <= (n - m + torch.arange(m, device="cuda"))[:, None]
            q4, k4, v4 = q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0)

            def sdpa():
                return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=True)

            out, _ = ours()
            ref = sdpa()[0].float()
            err = float((out - ref).abs().max())
            base = {"bench": "kernel", "dtype": dtype_name, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "m": m, "n": n,
                    "causal": causal, "device": dev_name}
            for name, fn in (("dense_attention", ours), ("sdpa", sdpa)):
                us_loop = time_loop(fn, iters, warmup)
                us_graph = time_graph(fn, iters)
                t = us_graph if us_graph is not None else us_loop
                rec = dict(base, op=name, us_loop=round(us_loop, 2), us_graph=None if us_graph is None else round(us_graph, 2),
                           kv_gb_per_s=round(kv_bytes / (t * 1e-6) / 1e9, 1))
                if name == "dense_attention":
                    rec["max_abs_err_vs_sdpa"] = err
                print(json.dumps(rec), flush=True)
    # merge of two (Hq, m, dv) partials
    oa = torch.randn(hq, m, d, device="cuda")
    la = torch.randn(hq, m, device="cuda")

    def merge():
        return ops.merge_attention(oa, la, oa, la)

    us_loop = time_loop(merge, iters, warmup)
    us_graph = time_graph(merge, iters)
    print(json.dumps({"bench": "kernel", "op": "merge_attention", "q_heads": hq, "m": m, "head_dim": d, "us_loop": round(us_loop, 2),
                      "us_graph": None if us_graph is None else round(us_graph, 2), "device": dev_name}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
