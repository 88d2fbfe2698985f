"""Cold-cache retrieval time of one synthetic decode layer (decode_latency.py's data), for A/B of search changes.

    python scripts/dev/search_cold.py [--n 131072] [--q-heads 8] [--kv-heads 2] [--train 8192] [--threads 2]
                                      [--ef 1024] [--calls 40] [--cache DIR]

Builds (or loads from --cache) one OffloadedLayer with query-guided graphs over n synthetic OOD keys per kv head,
then times OffloadedLayer.retrieve_attend of one decode query per head, each call after a 256 MB read that evicts
the CPU caches (as decode_latency.py does between layers). Prints ms per call, keys scored per query and a hash of
the returned ids (equal hashes: identical results), so two builds of the extension can be compared on one layer.
"""
import argparse
import hashlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import decode_latency as dl  # noqa: E402

import retrieval_attention as ra  # noqa: E402
from retrieval_attention._C import OffloadedLayer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--q-heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--train", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ef", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--flush-mb", type=int, default=256)
    ap.add_argument("--cache", default="/tmp/search_cold")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    args = dl.parse_args(["--q-heads", str(a.q_heads), "--kv-heads", str(a.kv_heads), "--max-train-queries", str(a.train),
                          "--n-sink", "0", "--n-window", "0", "--probe-queries", str(a.calls)])
    data = dl.LayerData(args, a.n, 1, 0, torch.device("cpu"))
    k, v = data.prompt()
    Hq, Hkv, d = a.q_heads, a.kv_heads, args.head_dim
    os.makedirs(a.cache, exist_ok=True)
    path = os.path.join(a.cache, f"layer_n{a.n}_q{Hq}_kv{Hkv}_t{a.train}.bin")
    make = dict(dtype=torch.bfloat16, q_heads=Hq, kv_heads=Hkv, head_dim=d, value_dim=d, index_type="query_guided", params={})
    if os.path.exists(path):
        layer = OffloadedLayer.load(path, **make)
    else:
        layer = OffloadedLayer(**make)
        t0 = time.perf_counter()
        layer.build(k[0].contiguous(), v[0].contiguous(), data.train_q[0].float().contiguous())
        print(f"built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        layer.save(path)
    q = data.probe_q  # (Hq, calls + 1, d) float32
    flush = dl.CacheFlusher(a.flush_mb)
    times, vis, h = [], [], hashlib.sha1()
    for c in range(q.shape[1]):
        qc = q[:, c : c + 1].contiguous()
        flush()
        t0 = time.perf_counter()
        out, lse, visited, ids = layer.retrieve_attend(qc, 100, a.ef, d ** -0.5, return_ids=True)
        times.append(time.perf_counter() - t0)
        vis.append(float(visited.double().mean()))
        h.update(ids.numpy().tobytes())
    times = sorted(times[1:])
    med = times[len(times) // 2]
    mean_vis = sum(vis) / len(vis)
    print(f"n {a.n} heads {Hq} threads {torch.get_num_threads()} ef {a.ef}: median {1e3 * med:.3f} ms/call, "
          f"mean {1e3 * sum(times) / len(times):.3f}, keys scored/query {mean_vis:.0f}, "
          f"ns per key per thread {1e9 * med * torch.get_num_threads() / (mean_vis * Hq):.0f}, ids {h.hexdigest()[:12]}")


if __name__ == "__main__":
    main()
