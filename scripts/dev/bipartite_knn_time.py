"""Where exact_knn's time goes on a GPU (the bipartite lists of a prefill): one 8B layer at 128K, 8 kv heads x --tokens
bf16 keys, 32 query heads x --train training queries, k 100. Alternated --repeats times in one process:
  * kernel: exact_knn as the package runs it (bf16 GEMM per query block, chunk_top_candidates over chunks of 64);
  * torch: the same with the package's torch fallback (HAS_CUDA_KERNELS off: chunk maxima, topk, gather, topk);
  * before: the nineteenth session's code path (chunks of 128, topk over the float32 copy of the kept entries);
  * gemm: the block GEMMs alone.
Prints one JSON line with the medians, the share of list entries equal to `before`'s and the rank-by-rank score check.
    bash scripts/gpu_run.sh bipknn   (or PYTHONPATH=python python3 scripts/dev/bipartite_knn_time.py)
"""
import argparse
import json
import statistics
import time

import torch

import retrieval_attention.index as index


def before(keys, queries, k, max_block_bytes=1 << 30, chunk=128):
    """exact_knn as of c3f1cf6 (the reference of this A/B)."""
    groups, n, d = keys.shape
    heads, m, _ = queries.shape
    per = heads // groups
    n_chunks = -(-n // chunk)
    kt = keys.transpose(1, 2)
    if n_chunks * chunk > n:
        kt = torch.cat([kt, kt.new_zeros((groups, d, n_chunks * chunk - n))], dim=2)
    q = queries.to(keys.dtype).reshape(groups, per, m, d)
    block = max(1, min(m, max_block_bytes // max(1, heads * n * 4)))
    out = torch.empty((groups, per, m, k), dtype=torch.int64, device=keys.device)
    for s in range(0, m, block):
        qb = q[:, :, s : s + block]
        b = qb.shape[2]
        scores = torch.bmm(qb.reshape(groups, per * b, d), kt)
        scores[:, :, n:] = float("-inf")
        top_chunks, kept = index._top_chunks(scores, n_chunks, chunk, k)
        ids = index._chunk_columns(top_chunks, torch.topk(kept.float(), k, dim=-1, sorted=True).indices, chunk)
        out[:, :, s : s + b] = ids.reshape(groups, per, b, k)
    return out.reshape(heads, m, k)


def gemm_only(keys, queries, max_block_bytes=1 << 30):
    groups, n, d = keys.shape
    heads, m, _ = queries.shape
    per = heads // groups
    kt = keys.transpose(1, 2)
    q = queries.to(keys.dtype).reshape(groups, per, m, d)
    block = max(1, min(m, max_block_bytes // max(1, heads * n * 4)))
    for s in range(0, m, block):
        torch.bmm(q[:, :, s : s + block].reshape(groups, -1, d), kt)


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=130432)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--train", type=int, default=2048)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    # keys with a shared offset and a few dominant directions, queries off their distribution (as attention's are)
    keys = (torch.randn((a.kv_heads, a.tokens, 128), device="cuda", generator=g)
            + 3 * torch.randn((a.kv_heads, 1, 128), device="cuda", generator=g)).bfloat16()
    queries = (torch.randn((a.q_heads, a.train, 128), device="cuda", generator=g)
               + 2 * torch.randn((a.q_heads, 1, 128), device="cuda", generator=g)).bfloat16()

    def package(kernel):
        had = index._ext.HAS_CUDA_KERNELS
        index._ext.HAS_CUDA_KERNELS = had and kernel
        try:
            return index.exact_knn(keys, queries, a.k)
        finally:
            index._ext.HAS_CUDA_KERNELS = had

    variants = {"kernel": lambda: package(True), "torch": lambda: package(False),
                "before": lambda: before(keys, queries, a.k), "gemm": lambda: gemm_only(keys, queries)}
    times = {v: [] for v in variants}
    outs = {}
    for v, fn in variants.items():  # warm-up (and the outputs)
        outs[v] = timed(fn)[1]
    for _ in range(a.repeats):
        for v, fn in variants.items():
            times[v].append(round(timed(fn)[0], 4))
    ref = outs["before"]
    res = {"bench": "bipartite_knn_time", "tokens": a.tokens, "kv_heads": a.kv_heads, "q_heads": a.q_heads, "train": a.train, "k": a.k,
           "chunk": index._knn_chunk(a.k), "has_cuda_kernels": index._ext.HAS_CUDA_KERNELS}
    res.update({f"{v}_s": statistics.median(t) for v, t in times.items()})
    res["times"] = times
    per = a.q_heads // a.kv_heads
    for v in ("kernel", "torch"):
        res[f"{v}_same_entries"] = round(float((outs[v] == ref).double().mean()), 5)
        # rank by rank the same bf16 scores as `before` (ties may pick other ids), checked on two heads
        ok = True
        for h in (0, a.q_heads - 1):
            sc = (queries[h] @ keys[h // per].T)  # bf16 scores, as the GEMM rounds them
            ok &= bool(torch.equal(sc.gather(1, outs[v][h]), sc.gather(1, ref[h])))
        res[f"{v}_same_scores"] = ok
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
