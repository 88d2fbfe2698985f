"""Time of one flat (exact) OffloadedLayer.retrieve_attend at 8B decode shapes, caches evicted before each call.

    python scripts/dev/flat_scan_time.py [label]

131,072 random bf16 keys per kv head, 32 query heads over 8 kv heads, one query each, top-100. Prints the median ms per
call and a hash of the ids (equal hashes: identical results), for comparing two builds of the extension.
"""
import hashlib
import statistics
import sys
import time

import torch

import retrieval_attention as ra


def main():
    torch.manual_seed(0)
    hq, hkv, d, n = 32, 8, 128, 131072
    keys = torch.randn(hkv, n, d).bfloat16()
    layer = ra._ext._C.OffloadedLayer(torch.bfloat16, hq, hkv, d, d, "flat", {}, 0, "per_query_head")
    layer.build(keys, keys.clone(), torch.zeros(hq, 0, d))
    q = torch.randn(hq, 1, d)
    flush = torch.ones(64 << 20)  # 256 MB
    times = []
    for _ in range(7):
        float(flush.sum())
        t = time.perf_counter()
        out = layer.retrieve_attend(q, 100, 16, 0.1, return_ids=True)
        times.append(time.perf_counter() - t)
    label = sys.argv[1] if len(sys.argv) > 1 else ""
    print(f"{label} flat, 128K keys, 32 query heads over 8 kv heads, {torch.get_num_threads()} threads: "
          f"median {1e3 * statistics.median(times[1:]):.1f} ms per layer call, ids {hashlib.sha1(out[3].numpy().tobytes()).hexdigest()[:10]}")


if __name__ == "__main__":
    main()
