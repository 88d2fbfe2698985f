"""Where the prefill's offload of one 8B-shaped layer goes (GPU machine): the CPU part's keys and values from the device
to the C++ stores, step by step, each timed on its own (median of --repeats).

    python scripts/dev/offload_time.py [--tokens 131072] [--repeats 3]

Steps: gather the CPU part of the (1, 8, T, 128) bf16 keys and values into (8, n, 128) on the device; copy them to
pageable CPU memory (what RetrievalLayer._to_cpu does); to page-locked memory instead (allocated once, and the
allocation itself timed); OffloadedLayer.build(index_now=False), i.e. the C++ stores' copy. One JSON line.
"""
import argparse
import json
import statistics
import time

import torch

import retrieval_attention as ra


def timed(fn, repeats):
    out, times = None, []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return out, round(statistics.median(times), 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    dev = torch.device("cuda")
    hkv, d, T, s0, s1 = 8, 128, a.tokens, 128, a.tokens - 512
    keys = torch.randn((1, hkv, T, d), device=dev, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    res = {"bench": "offload_time", "tokens": T, "cpu_tokens": s1 - s0, "bytes_kv": 2 * hkv * (s1 - s0) * d * 2}
    gathered, res["gather_on_device_s"] = timed(lambda: keys[:, :, s0:s1].reshape(hkv, s1 - s0, d).contiguous(), a.repeats)
    _, res["to_pageable_s"] = timed(lambda: keys[:, :, s0:s1].reshape(hkv, s1 - s0, d).to("cpu").contiguous(), a.repeats)
    t = time.perf_counter()
    pinned = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
    res["pinned_alloc_s"] = round(time.perf_counter() - t, 4)
    _, res["gathered_to_pinned_s"] = timed(lambda: pinned.copy_(gathered, non_blocking=True), a.repeats)
    _, res["to_pinned_incl_gather_s"] = timed(lambda: pinned.copy_(keys[:, :, s0:s1].reshape(hkv, s1 - s0, d), non_blocking=True), a.repeats)
    k_cpu = keys[:, :, s0:s1].reshape(hkv, s1 - s0, d).to("cpu").contiguous()
    v_cpu = values[:, :, s0:s1].reshape(hkv, s1 - s0, d).to("cpu").contiguous()
    train = torch.zeros((4 * hkv, 0, d))

    def store(k, v):
        layer = ra._ext._C.OffloadedLayer(torch.bfloat16, 4 * hkv, hkv, d, d, "query_guided", {}, 4096, "per_kv_head")
        layer.build(k, v, train, index_now=False)
        return layer

    _, res["store_from_pageable_s"] = timed(lambda: store(k_cpu, v_cpu), a.repeats)
    pinned_v = torch.empty_like(pinned)
    pinned.copy_(k_cpu)
    pinned_v.copy_(v_cpu)
    _, res["store_from_pinned_s"] = timed(lambda: store(pinned, pinned_v), a.repeats)
    res["threads"] = torch.get_num_threads()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
