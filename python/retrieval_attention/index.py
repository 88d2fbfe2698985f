"""Key indexes for maximum-inner-product search: the exact FlatIndex and the QueryGuidedIndex.

    idx = ra.FlatIndex(keys)                              # keys: (n, d) float32/float16/bfloat16, tensor or numpy
    ids, scores = idx.search(queries, k=100)              # (m, d) -> (m, k) int64, (m, k) float32, best first
    idx.last_search_stats["visited"]                      # (m,) int64: keys whose score was computed
    idx.add(new_keys); idx.save(path); idx2 = ra.load_index(path)

Keys are copied into the index (in their dtype); queries are used as float32. Searches release the GIL and run
in parallel over queries; `add` may be called while other threads search (they see the index before or after).
"""
from __future__ import annotations

import os
import time

import torch

from . import _ext
from ._checks import FLOAT_STORAGE, as_tensor, check_finite, check_float, check_positive_int, check_rank


def _prepare_keys(keys, name="keys") -> torch.Tensor:
    t = as_tensor(keys, name)
    check_rank(t, 2, name, "(n, dim)")
    check_float(t, name, FLOAT_STORAGE)
    if t.shape[0] == 0:
        raise ValueError(f"{name} must not be empty")
    if t.shape[1] == 0:
        raise ValueError(f"{name} must have a positive dimension")
    check_finite(t, name)
    return t.detach().to("cpu").contiguous()


class _IndexBase:
    """Shared behaviour of the index classes; use FlatIndex, QueryGuidedIndex or load_index."""

    _type = ""

    def __init__(self, handle):
        self._handle = handle
        self.last_search_stats: dict = {}
        self.build_seconds: float = 0.0

    @property
    def size(self) -> int:
        return self._handle.size

    def __len__(self) -> int:
        return self._handle.size

    @property
    def dim(self) -> int:
        return self._handle.dim

    @property
    def dtype(self) -> torch.dtype:
        return self._handle.dtype

    @property
    def index_type(self) -> str:
        return self._handle.type

    def memory_bytes(self) -> dict:
        return {"vectors": self._handle.vector_bytes, "structure": self._handle.structure_bytes}

    def search(self, queries, k: int = 100, ef: int = 128, seeds=None):
        """Top-k keys by inner product for each query row. Returns (ids (m, k) int64, scores (m, k) float32).

        seeds (optional, (m, s) int64 key ids, or (s,) for every query): keys a graph search also starts from besides its
        entry point, e.g. a previous, similar query's result (RetrievalConfig.warm_start does this per decode step).
        They are scored and count as visited; ids outside [0, size) are skipped. Exact indexes ignore them."""
        q = as_tensor(queries, "queries")
        if q.dim() == 1:
            q = q.unsqueeze(0)
        check_rank(q, 2, "queries", "(m, dim)")
        check_float(q, "queries", FLOAT_STORAGE + (torch.float64,))
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]}, the index has dim {self.dim}")
        check_finite(q, "queries")
        k = check_positive_int(k, "k")
        if k > self.size:
            raise ValueError(f"k={k} exceeds the number of indexed keys ({self.size})")
        ef = min(check_positive_int(ef, "ef"), self.size)  # a beam wider than the index changes nothing
        q = q.detach().to("cpu", torch.float32).contiguous()
        if seeds is not None:
            seeds = as_tensor(seeds, "seeds")
            if seeds.dtype != torch.int64:
                raise TypeError(f"seeds must be int64 key ids, got {seeds.dtype}")
            if seeds.dim() == 1:
                seeds = seeds.unsqueeze(0).expand(q.shape[0], -1)
            if seeds.dim() != 2 or seeds.shape[0] != q.shape[0]:
                raise ValueError(f"seeds must be (m, s) with one row per query (m={q.shape[0]}), got {tuple(seeds.shape)}")
            seeds = seeds.detach().to("cpu").contiguous()
        t0 = time.perf_counter()
        ids, scores, visited = self._handle.search(q, k, ef, seeds)
        elapsed = time.perf_counter() - t0
        self.last_search_stats = {
            "visited": visited,
            "scanned_frac": float(visited.double().mean() / max(self.size, 1)) if visited.numel() else 0.0,
            "seconds": elapsed,
            "queries": int(q.shape[0]),
        }
        return ids, scores

    def add(self, new_keys) -> None:
        """Append keys (ids continue from the current size) and index them."""
        t = _prepare_keys(new_keys, "new_keys")
        if t.shape[1] != self.dim:
            raise ValueError(f"new_keys have dim {t.shape[1]}, the index has dim {self.dim}")
        if t.dtype != self.dtype:
            raise TypeError(f"new_keys dtype {t.dtype} differs from the index dtype {self.dtype}")
        self._handle.add(t)

    def save(self, path) -> None:
        """Write the index (keys included) to `path` atomically (temp file + rename)."""
        path = os.fspath(path)
        if not isinstance(path, str) or not path or "\0" in path:
            raise ValueError(f"path must be a non-empty file name without NUL bytes, got {path!r}")
        self._handle.save(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.size}, dim={self.dim}, dtype={self.dtype})"


class FlatIndex(_IndexBase):
    """Exact maximum-inner-product search: scores every key. The reference for all other indexes."""

    _type = "flat"

    def __init__(self, keys):
        t = _prepare_keys(keys)
        t0 = time.perf_counter()
        super().__init__(_ext._C.KeyIndex.build(t, None, "flat", {}))
        self.build_seconds = time.perf_counter() - t0


def rope_shift(queries: torch.Tensor, delta, inv_freq: torch.Tensor) -> torch.Tensor:
    """Moves post-RoPE vectors by `delta` positions: the vector the same pre-RoPE vector would have `delta` positions
    later. queries (..., m, d) (tensor or numpy array), delta (m,) integers (one per row along dim -2; may be negative), inv_freq (r/2,) the
    model's RoPE inverse frequencies (transformers' rotate_half layout over the first r <= d dimensions; the rest is
    left as is). Returns a new tensor of the queries' shape, dtype and device.

    RoPE rotates each plane (i, i + r/2) by position * inv_freq[i], and rotations add, so rotating once more by delta *
    inv_freq gives position p + delta. RetrievalCache trains its graphs on the prompt's queries moved to the first
    decode position this way (RetrievalConfig.shift_train_queries, by default every other one): each then scores the
    keys as a decode query would, from the same relative positions (docs/TUNING.md, "shift_train_queries"). Angles are
    computed in float64 (a position near 1M times a frequency near 1 would lose radians in float32)."""
    q = as_tensor(queries, "queries")
    check_float(q, "queries")
    if q.dim() < 2:
        raise ValueError(f"rope_shift: queries must have shape (..., m, d), got {tuple(q.shape)}")
    d, m = q.shape[-1], q.shape[-2]
    inv = torch.as_tensor(inv_freq, dtype=torch.float64).to(q.device).reshape(-1)
    half = inv.numel()
    if half == 0 or 2 * half > d:
        raise ValueError(f"rope_shift: inv_freq has {half} frequencies; queries of dim {d} hold at most {d // 2}")
    delta = torch.as_tensor(delta).to(q.device).reshape(-1)
    if delta.numel() != m or delta.is_floating_point() or delta.dtype == torch.bool:
        raise ValueError(f"rope_shift: delta must hold {m} integers (one per query row), got {tuple(delta.shape)} {delta.dtype}")
    ang = delta.double()[:, None] * inv[None, :]
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()  # (m, r/2)
    rows = q.reshape(-1, m, d)
    out = torch.empty_like(rows)
    for i in range(rows.shape[0]):  # one (m, d) slice at a time: float32 temporaries of one head, not of all
        x = rows[i].float()
        lo, hi = x[:, :half], x[:, half : 2 * half]
        out[i, :, :half] = lo * cos - hi * sin
        out[i, :, half : 2 * half] = hi * cos + lo * sin
        out[i, :, 2 * half :] = rows[i, :, 2 * half :]
    return out.reshape(q.shape)


def shifted_rows(m: int, share: float, device=None) -> torch.Tensor:
    """(m,) bool: which of m training queries a share in [0, 1] of them moves (RetrievalConfig.shift_train_queries),
    spread evenly: row i moves when floor((i + 1) * share) > floor(i * share), so 0.5 moves the odd rows, 1 all, 0 none."""
    i = torch.arange(m, dtype=torch.float64, device=device)
    return torch.floor((i + 1) * share) > torch.floor(i * share)


def _chunk_max_step(t: torch.Tensor, chunk: int) -> int:
    """On a GPU, a max over strided groups of 4 columns and then over the 4 takes half the time of one max over each
    chunk's contiguous columns (on the CPU, 5 times more): the group width for t's device."""
    return 4 if t.is_cuda and chunk % 4 == 0 else 1


def _top_chunks(scores: torch.Tensor, n_chunks: int, chunk: int, kc: int):
    """scores (G, R, n_chunks * chunk), contiguous -> (the kc chunks of `chunk` columns with the largest maxima in each
    row (G, R, kc), their entries (G, R, kc * chunk)). A row's r best entries lie in its r best chunks."""
    groups, rows = scores.shape[:2]
    flat = scores.view(groups * rows * n_chunks, chunk)  # one chunk a row
    step = _chunk_max_step(scores, chunk)
    cmax = flat.view(-1, chunk // step, step).amax(1).amax(-1)
    top = cmax.view(groups, rows, n_chunks).topk(kc, dim=-1).indices
    chunk_rows = torch.arange(groups * rows, device=scores.device).view(groups, rows, 1) * n_chunks + top
    return top, flat.index_select(0, chunk_rows.view(-1)).view(groups, rows, kc * chunk)


def _chunk_columns(top: torch.Tensor, pos: torch.Tensor, chunk: int) -> torch.Tensor:
    """Positions in _top_chunks' entries -> column ids of the score matrix."""
    return top.gather(-1, pos // chunk) * chunk + pos % chunk


def _chunk_candidates(scores: torch.Tensor, chunk: int, kc: int, m: int) -> torch.Tensor:
    """scores (G, R, n_chunks * chunk), contiguous -> (G, R, m) int64: the columns of each row's m largest entries
    among the entries of its kc chunks with the largest maxima, largest first (ties: smaller column first).

    The extension's chunk_top_candidates op (one pass over the scores, csrc/cuda: include/retrieval_attention/cuda/
    chunk_top.cuh; CPU: chunk_top.h) where it applies; torch ops otherwise (a CUDA build of torch without the
    package's kernels, or shapes the kernel does not take), which give the same set up to ties."""
    groups, rows, cols = scores.shape
    flat = scores.view(groups * rows, cols)
    if scores.is_cuda:
        usable = _ext.HAS_CUDA_KERNELS and scores.dtype in (torch.float16, torch.bfloat16) and _chunk_top_fits(cols, chunk, kc, m)
    else:
        usable = scores.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if usable:
        return torch.ops.retrieval_attention.chunk_top_candidates(flat, chunk, kc, m).view(groups, rows, m)
    return _chunk_candidates_torch(scores, chunk, kc, m)


def _chunk_candidates_torch(scores: torch.Tensor, chunk: int, kc: int, m: int) -> torch.Tensor:
    """_chunk_candidates in torch ops (the fallback)."""
    top_chunks, kept = _top_chunks(scores, scores.shape[2] // chunk, chunk, kc)  # (G, R, kc), (G, R, kc * chunk)
    return _chunk_columns(top_chunks, kept.topk(m, dim=-1).indices, chunk)


def _nearest_candidates(keys: torch.Tensor, kf: torch.Tensor, row_start: int, cand: torch.Tensor, k: int) -> torch.Tensor:
    """keys (G, n, d) and their float32 copy kf, cand (G, b, m) int64 (-1: none) -> (G, b, k): for key row_start + r of
    each group, its k nearest candidates by float32 L2 distance, nearest first (ties: smaller id first).

    The extension's rerank_l2 op (CPU: chunk_top.h; CUDA: chunk_top.cuh, one warp per key) where it applies; torch ops
    otherwise (a CUDA build of torch without the package's kernels), which may order equal distances differently."""
    m, d = cand.shape[2], keys.shape[2]
    if not keys.is_cuda or (_ext.HAS_CUDA_KERNELS and d <= 256 and m <= 256 and keys.shape[1] < 2**31):
        # the ids come from chunk_top_candidates: checking them would cost a device sync per key block
        return torch.ops.retrieval_attention.rerank_l2(keys, row_start, cand, k, False)
    return _nearest_candidates_torch(kf, row_start, cand, k)


def _nearest_candidates_torch(kf: torch.Tensor, row_start: int, cand: torch.Tensor, k: int) -> torch.Tensor:
    """_nearest_candidates in torch ops (the fallback), from the keys' float32 copy kf (G, n, d)."""
    groups, b, m = cand.shape
    d = kf.shape[2]
    flat = kf.reshape(-1, d)
    first = (torch.arange(groups, device=kf.device) * kf.shape[1]).view(groups, 1, 1)  # each group's key 0 in `flat`
    vec = flat.index_select(0, (cand.clamp(min=0) + first).view(-1)).view(groups, b, m, d)
    dist = torch.linalg.vector_norm(vec.sub_(kf[:, row_start : row_start + b].unsqueeze(2)), dim=-1)
    dist.masked_fill_(cand < 0, float("inf"))
    del vec
    return cand.gather(-1, dist.topk(k, dim=-1, largest=False, sorted=True).indices)


# kChunkTopMaxEntries of chunk_top.cuh: the CUDA chunk-top kernel takes at most this many chunks per row and kept
# entries (kc * chunk)
CHUNK_TOP_MAX_ENTRIES = 8192


def _chunk_top_fits(cols: int, chunk: int, kc: int, m: int) -> bool:
    """Whether the CUDA chunk-top kernel takes these shapes (chunk_top_supported() in chunk_top.cuh)."""
    n_chunks = cols // chunk
    return (8 <= chunk <= 256 and chunk & (chunk - 1) == 0 and cols % chunk == 0 and n_chunks <= CHUNK_TOP_MAX_ENTRIES
            and 1 <= kc <= n_chunks and kc * chunk <= CHUNK_TOP_MAX_ENTRIES and 1 <= m <= kc * chunk)


def _knn_chunk(k: int) -> int:
    """exact_knn's default chunk width: 128 columns, narrower where k chunks of 128 exceed what the chunk-top kernel
    keeps (k = 100, the default k_train: 64), down to 8."""
    chunk = 128
    while chunk > 8 and k * chunk > CHUNK_TOP_MAX_ENTRIES:
        chunk //= 2
    return chunk


def exact_knn(keys: torch.Tensor, queries: torch.Tensor, k: int, max_block_bytes: int = 1 << 30, chunk: int | None = None) -> torch.Tensor:
    """Top-k key ids (by inner product) of each query, on the tensors' device, in query blocks.

    keys (G, n, d), queries (H, m, d) with H a multiple of G (query head h uses key group h // (H // G)) ->
    ids (H, m, min(k, n)) int64. This is the bipartite kNN of the query-guided graph build; on a GPU it is one batched
    GEMM + topk per block of queries (all heads at once) and only the id lists travel to the CPU. When the keys make
    more than 2k chunks of `chunk` columns (default: _knn_chunk(k)), each row's top k come from the entries of its k
    chunks with the largest maxima only, where they lie: one pass of the extension's chunk_top_candidates kernel over
    the block's scores on a GPU (torch ops where it does not apply), the same lists up to the order of equal scores.

    Exact on the CPU (float32 scores). On a GPU with 16-bit keys the GEMM's scores are rounded to that dtype, so near-ties
    may swap: on the bundled model's 32K Q/K with bfloat16 scores, 98.4-99.2% of the top-100 entries and 96-98% of the
    first 4 (the graph's pivots) agree with the float32 lists, and the graphs reach the same recall per key scanned
    (RESULTS.md, fourteenth session).
    """
    groups, n, d = keys.shape
    heads, m, _ = queries.shape
    per = heads // groups
    k = min(k, n)
    # GPUs score in the keys' 16-bit dtype (tensor cores); the CPU scores in float32
    dtype = keys.dtype if keys.is_cuda and keys.dtype in (torch.float16, torch.bfloat16) else torch.float32
    # With many more columns than k, each row's top k lie in the k `chunk`-column chunks with the largest maxima: the
    # top-k runs over those k * chunk entries instead of all n (ties aside, the same lists).
    chunk = _knn_chunk(k) if chunk is None else check_positive_int(chunk, "chunk")
    n_chunks = -(-n // chunk)
    chunked = n_chunks > 2 * k
    kt = keys.to(dtype).transpose(1, 2)  # (G, d, n)
    if chunked and n_chunks * chunk > n:  # whole chunks: zero columns up to a multiple of the chunk, masked below
        kt = torch.cat([kt, kt.new_zeros((groups, d, n_chunks * chunk - n))], dim=2)
    q = queries.to(dtype).reshape(groups, per, m, d)
    block = max(1, min(m, max_block_bytes // max(1, heads * n * 4)))  # bounds the (G, per*block, n) score matrix
    out = torch.empty((groups, per, m, k), dtype=torch.int64, device=keys.device)
    for s in range(0, m, block):
        qb = q[:, :, s : s + block]
        b = qb.shape[2]
        rows = per * b
        scores = torch.bmm(qb.reshape(groups, rows, d), kt)  # (G, per*b, n_cols)
        if chunked:
            scores[:, :, n:] = float("-inf")
            ids = _chunk_candidates(scores, chunk, k, k)
        else:
            ids = torch.topk(scores.float(), k, dim=-1, sorted=True).indices
        out[:, :, s : s + b] = ids.reshape(groups, per, b, k)
    return out.reshape(heads, m, k)


# QueryGuidedGraph::kPruneScan: a prune's RNG pass looks at its kPruneScan * degree nearest candidates (at least 64)
PRUNE_SCAN = 32
# The prefill makes the graphs' projections on the GPU only while one key group's (pivot, candidate) pairs stay below
# this (about 80 bytes of temporaries each, so about 5 GiB); past it (e.g. every prompt query of a long prompt as a
# training query) the CPU builds make their own.
PROJECTION_MAX_GROUP_PAIRS = 1 << 26


def projection_fits(keys_shape, knn_shape, n_pivots: int) -> bool:
    """Whether projection_lists takes keys of keys_shape (G, n, d) and lists of knn_shape (I, m, kk) within
    PROJECTION_MAX_GROUP_PAIRS pairs per key group and its 63-bit sort keys."""
    groups, n, _ = keys_shape
    idx_count, m, kk = knn_shape
    return idx_count * (n + 1) < 1 << 31 and (idx_count // groups) * m * n_pivots * kk <= PROJECTION_MAX_GROUP_PAIRS


def projection_lists(keys: torch.Tensor, knn: torch.Tensor, n_pivots: int, degree: int, max_pairs: int = 1 << 25) -> torch.Tensor:
    """The projection phase of query-guided graph builds, on the tensors' device: keys (G, n, d), knn (I, m, kk) int64
    (each training query's exact neighbours, best first, -1 padding; index i uses key group i // (I // G)) ->
    (I, n, degree) int32, each key's pruned list (-1 padding), for OffloadedLayer.build(..., projection=).

    The graph build's own projection (query_guided_graph.h) on the CPU: each query's first n_pivots keys (pivots) get its
    other neighbours as candidates; a pivot's candidates, deduplicated in order of appearance, are pruned (RNG-style in
    L2, then the largest inner products; projection_prune.h). Here torch gathers the (pivot, candidate) pairs, drops the
    repeats and sorts them (stable sorts, so ties break by appearance as on the CPU), and the extension's
    projection_prune op (one CUDA warp per pivot) selects. Nothing waits for the device. The lists equal the CPU
    build's where the float32 sums are exact (tested with small-integer keys); otherwise near-ties may differ.

    The (pivot, candidate) pairs of whole key groups are made at once, about max_pairs at a time (memory: about 60
    bytes per pair): n_pivots * kk per training query."""
    groups, n, _ = keys.shape
    idx_count, m, kk = knn.shape
    if idx_count * (n + 1) >= 1 << 31:
        raise ValueError(f"projection_lists: {idx_count} indexes x {n} keys overflow its sort keys (at most 2^31 in all)")
    per = idx_count // groups
    step = max(1, max_pairs // max(1, per * m * n_pivots * kk))
    parts = [_projection_block(keys[g : g + step], knn[g * per : (g + step) * per], n_pivots, degree) for g in range(0, groups, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _projection_block(keys: torch.Tensor, knn: torch.Tensor, n_pivots: int, degree: int, block_bytes: int = 1 << 29) -> torch.Tensor:
    groups, n, d = keys.shape
    idx_count, m, kk = knn.shape
    dev = keys.device
    per = idx_count // groups
    if m == 0 or kk == 0 or n == 0:
        return torch.full((idx_count, n, degree), -1, dtype=torch.int32, device=dev)
    valid = knn >= 0
    first = torch.where(valid.any(-1), valid.to(torch.int8).argmax(-1), torch.full_like(knn[..., 0], kk))  # leading -1s skipped
    slot = first.unsqueeze(-1) + torch.arange(n_pivots, device=dev)  # (I, m, P)
    piv = torch.gather(knn, 2, slot.clamp(max=kk - 1))
    piv_ok = (slot < kk) & (piv >= 0)
    cand_ok = valid & (torch.arange(kk, device=dev) >= first.unsqueeze(-1))  # (I, m, kk)
    # Pairs (pivot, candidate) in the flat order (index, query, pivot slot, rank): within one pivot's pairs that is the
    # order in which the CPU gathers its candidates (a pivot holds at most one slot of a query), so the stable sorts
    # below break ties as the CPU does.
    ok = piv_ok.unsqueeze(-1) & cand_ok.unsqueeze(-2) & (knn.unsqueeze(-2) != piv.unsqueeze(-1))  # (I, m, P, kk)
    sentinel = idx_count * (n + 1)
    index_of = torch.arange(idx_count, device=dev).view(-1, 1, 1, 1)
    pivot = torch.where(ok, index_of * (n + 1) + piv.unsqueeze(-1), sentinel).reshape(-1)
    cand = knn.unsqueeze(-2).expand(ok.shape).reshape(-1).clamp(min=0)
    # a pair's repeats (the same candidate from another query of the pivot) are dropped: the first appearance stays
    order = torch.sort(pivot * (n + 1) + cand, stable=True).indices
    pair = (pivot * (n + 1) + cand)[order]
    repeat_sorted = torch.zeros_like(pair, dtype=torch.bool)
    repeat_sorted[1:] = pair[1:] == pair[:-1]
    repeat = torch.empty_like(repeat_sorted).scatter_(0, order, repeat_sorted)
    pivot = torch.where(repeat, sentinel, pivot)
    del order, pair, repeat_sorted, repeat
    # inner products of each query's pivots with its candidates (float32, from the rows as the CPU build widens them),
    # a batched matmul over blocks of queries; then |k_p|^2 + |k_c|^2 - 2 k_p.k_c as the CPU writes it
    rows = keys.reshape(groups * n, d)
    base = (torch.arange(idx_count, device=dev) // per * n).view(-1, 1, 1)
    ip = torch.empty(ok.shape, dtype=torch.float32, device=dev)
    step = max(1, block_bytes // max(1, idx_count * (kk + n_pivots) * d * 4))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        for s in range(0, m, step):
            cr = rows[base + knn[:, s : s + step].clamp(min=0)].float()  # (I, b, kk, d)
            pr = rows[base + piv[:, s : s + step].clamp(min=0)].float()  # (I, b, P, d)
            ip[:, s : s + step] = pr @ cr.transpose(-1, -2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    ip = ip.reshape(-1)
    sq = rows.float().pow(2).sum(-1)
    p_sq = sq[base.unsqueeze(-1) + piv.clamp(min=0).unsqueeze(-1)].expand(ok.shape).reshape(-1)
    c_sq = sq[base + knn.clamp(min=0)].unsqueeze(-2).expand(ok.shape).reshape(-1)
    dist = (p_sq + c_sq) - 2.0 * ip
    del p_sq, c_sq

    # sort keys as the CPU's: (pivot, 32 order-preserving bits of the value); max(dist, 0) for the RNG pass (dist >= 0,
    # so its float bits order as integers), -k_p.k_c mapped to unsigned order for the inner-product edges
    def bits(x):
        return x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF

    near_bits = bits(torch.where(dist < 0, torch.zeros_like(dist), dist))
    neg = bits(-ip)
    mips_bits = torch.where(neg >= 1 << 31, 0xFFFFFFFF - neg, neg | (1 << 31))
    near_order = torch.sort((pivot << 32) | near_bits, stable=True).indices
    mips_order = torch.sort((pivot << 32) | mips_bits, stable=True).indices
    del near_bits, neg, mips_bits
    pivot_sorted = pivot[near_order]
    live = pivot_sorted < sentinel
    start = live.clone()
    start[1:] &= pivot_sorted[1:] != pivot_sorted[:-1]
    seg = torch.cumsum(start, 0) - 1
    counts = torch.stack([start.sum(), live.sum()])
    room = min(pivot.numel(), idx_count * n)  # segments: at most one per (index, key)
    begin = torch.zeros(room + 1, dtype=torch.int64, device=dev)  # entry `room` takes the non-starts' writes
    begin.scatter_(0, torch.where(start, seg, room), torch.arange(pivot.numel(), device=dev))
    return torch.ops.retrieval_attention.projection_prune(
        keys.contiguous(), per, begin[:room], counts, pivot_sorted, cand[near_order], dist[near_order], cand[mips_order], degree,
        max(PRUNE_SCAN * degree, 64), False)  # made above: checking them would wait for the device


# The GPU neighbour lists of the graph builds seek each key's nearest among every KEY_LIST_COLUMN_STRIDE-th key
# (exact_key_knn's column_stride). 2 halves the score matrix for the same graph quality on the model's Q/K (RESULTS.md,
# fifteenth session) and takes 5.2 s off a 128K 8B prefill on the H200. Its CPU builds are about 10% slower (the even
# keys gather the weak keys' in-edges, and the in-degree balance has more to do); since the builds became faster
# (twentieth session) they keep pace, and the first token comes 5 s sooner (24.8 against 29.9 s from the start).
KEY_LIST_COLUMN_STRIDE = 2


def build_key_lists(keys: torch.Tensor, k: int) -> torch.Tensor | None:
    """The key-to-key lists a graph build takes (keys (G, n, d) on the GPU): exact_key_knn at KEY_LIST_COLUMN_STRIDE,
    on the keys' device; None when there is no other candidate key to link to."""
    lists = exact_key_knn(keys, k, column_stride=KEY_LIST_COLUMN_STRIDE)
    return lists if lists.shape[-1] > 0 else None


def exact_key_knn(keys: torch.Tensor, k: int, max_block_bytes: int = 1 << 30, chunk: int = 128,
                  column_stride: int = 1) -> torch.Tensor:
    """Each key's k nearest other keys of its group by L2 distance, on the keys' device, in key blocks.

    keys (G, n, d) -> ids (G, n, min(k, c - 1)) int64, nearest first, where the neighbours are sought among the c keys
    0, s, 2s, ... (s = column_stride; c = n for s = 1). The query-guided graph links the keys its projection leaves
    with few edges (the "weak" keys) from these lists instead of searching for them (ef_weak long: see
    RetrievalLayer.finish_prefill). Seeking them among every other key (s = 2) halves the score matrix, and on the
    model's 32K Q/K the graphs scan 5.56% of the keys at recall@100 0.95 against 5.51% with all keys (s = 4: 5.96%;
    benchmarks/RESULTS.md, fifteenth session); KEY_LIST_COLUMN_STRIDE is what the builds use.

    Two stages per key block. Candidates: scores 2 x_i.x_j - |x_j|^2 (x: the keys minus their group mean, scaled by a
    power of two; same ranking as the L2 distance) come out of one matmul of [x_i, 1] by [2 x_j, -|x_j|^2], float16
    with float32 accumulation on a GPU (writing and reading the score matrix dominates the time) and float32 on the
    CPU. The entries of approximate rank <= r lie in the `chunk`-column chunks with the r largest maxima, so each block
    ranks only the entries of its top kc chunks and keeps the best m of them: kc = 2k, m = 4k on a GPU, kc = k, m = 2k
    on the CPU (fewer when there are fewer chunks). The extension's chunk_top_candidates op does this in one pass over
    the block's scores (_chunk_candidates). On a GPU that takes the fused score + top-m kernel (_fused_key_knn_fits:
    H100 / H200, k <= 16), the candidates come instead from that kernel, which never writes the scores out
    (_fused_key_knn; the same lists, about 1.4x faster at 128K). Re-ranking: those candidates' float32 distances
    |k_i - k_j| from the keys as given, the k smallest first.

    Exact up to the candidate stage's rounding: every returned distance is computed in float32 and the list is
    ordered by it, but on a GPU a true neighbour is missed when the float16 rounding of the scores (about 2^-11 of
    max |x|^2, a relative error of the inputs and of each output) pushes it past approximate rank 2k (past it, it may
    still be kept). On the CPU the candidate scores are float32 and the lists equal the exact float32 lists, up to
    float32 near-ties. Measured on an H200 for random keys, and for anisotropic keys with a common offset
    (8 x 130,432 x 128, k=16): every sampled entry's distance equals the float64 brute force's at its rank."""
    groups, n, d = keys.shape
    stride = check_positive_int(column_stride, "column_stride")
    n_cols = -(-n // stride)
    k = min(k, n_cols - 1)
    dev = keys.device
    if k <= 0:
        return torch.empty((groups, n, 0), dtype=torch.int64, device=dev)
    half = keys.is_cuda  # the CPU has no fast float16 matmul
    sdtype, sbytes = (torch.float16, 2) if half else (torch.float32, 4)
    n_pad = -(-n_cols // chunk) * chunk
    n_chunks = n_pad // chunk
    d_aug = -(-(d + 1) // 8) * 8
    # Margins against the candidate scores' rounding: a neighbour of approximate rank <= kc always lies in the kept
    # chunks. Float32 ranks only err at near-ties, so the CPU (where gathering the candidates' rows costs most) keeps
    # less.
    margin = 2 if half else 1
    kc = min(margin * k, n_chunks)
    m = min(2 * margin * k, kc * chunk)
    kf = keys.float()
    # Distances do not change under a shift, and centring shrinks |x|^2 (LLM keys share a large offset), hence the
    # float16 scores' absolute rounding error. A power-of-two scale is exact and keeps the ranking; it puts
    # max |x|^2 in [2^10, 2^12) per group, so |score| <= 2|x_i||x_j| + |x_j|^2 < 3 * 2^12, far below float16's 65504,
    # and the inputs (|x| in [32, 64) for the largest) far above its subnormals (< 2^-14) but for negligible entries.
    x = kf - kf.mean(1, keepdim=True)
    sq = (x * x).sum(-1)
    # on the device: nothing in this function waits for it (a prefill queues the next layers meanwhile)
    exps = torch.frexp(sq.amax(-1)).exponent  # max |x|^2 = f * 2^e, f in [0.5, 1)
    scale = torch.ldexp(torch.ones(groups, device=dev), torch.div(12 - exps, 2, rounding_mode="floor")).view(groups, 1, 1)
    x = x * scale
    sq = sq * (scale * scale).view(groups, 1)
    if _fused_key_knn_fits(keys, k):
        return _fused_key_knn(keys, kf, x, sq, k, stride, max_block_bytes)
    step = _chunk_max_step(keys, chunk)
    left = torch.zeros((groups, n, d_aug), dtype=sdtype, device=dev)
    left[:, :, :d] = x
    left[:, :, d] = 1.0
    right = torch.zeros((groups, n_pad, d_aug), dtype=sdtype, device=dev)  # padding columns score 0: masked below
    right[:, :n_cols, :d] = 2.0 * x[:, ::stride]
    right[:, :n_cols, d] = -sq[:, ::stride]
    right = right.transpose(1, 2)
    del x, sq
    # bytes per block row: scores, chunk maxima (and the step before), the kept chunks' entries, the candidates' key
    # rows (and ids)
    per_row = groups * ((n_pad + (step + 1) * n_chunks + kc * chunk) * sbytes + m * (4 * d + 32))
    block = max(1, min(n, max_block_bytes // per_row))
    out = torch.empty((groups, n, k), dtype=torch.int64, device=dev)
    # float16 products must accumulate in float32: cuBLAS may otherwise reduce in float16
    reduced = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    try:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        for s in range(0, n, block):
            b = min(block, n - s)
            sc = torch.bmm(left[:, s : s + b], right)  # (G, b, n_pad)
            rows = torch.arange(s, s + b, device=dev)
            # not itself: the block's rows that are also columns (keys s0, s0 + stride, ... of columns s0 / stride,
            # s0 / stride + 1, ...) lie on a diagonal of a strided view
            s0 = -(-s // stride) * stride
            own = -(-(s + b - s0) // stride)
            sc[:, s0 - s :: stride, s0 // stride : s0 // stride + own].diagonal(dim1=1, dim2=2).fill_(float("-inf"))
            sc[:, :, n_cols:] = float("-inf")  # padding columns never rank
            col = _chunk_candidates(sc, chunk, kc, m)  # (G, b, m), best approximate score first
            del sc
            cand = col * stride
            # self and padding come in only when fewer than m other keys sit in the kept chunks
            cand.masked_fill_((col >= n_cols) | (cand == rows.view(1, b, 1)), -1)
            out[:, s : s + b] = _nearest_candidates(keys, kf, s, cand, k)
    finally:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced
    return out


# kScoreTopMaxM of score_top.cuh: the fused kernel keeps at most this many candidates per row
SCORE_TOP_MAX_M = 32


def _score_top_dim(d: int) -> int:
    """The operand width the fused kernel runs for head dim d (64, 128 or 256; zero padding changes no product)."""
    return 64 if d <= 64 else (128 if d <= 128 else 256)


def _score_top_smem_bytes(dim: int) -> int:
    """score_top_smem_bytes() of score_top.cuh: a ring of float16 column tiles of 64 x (dim + 8) (three for dim <= 128,
    two for 256), 128 row buffers of 128 64-bit keys, the rows' bounds and counts, a tile of float32 biases per slot."""
    stages = 3 if dim <= 128 else 2
    return stages * 64 * (dim + 8) * 2 + 128 * 128 * 8 + 128 * (8 + 4) + stages * 64 * 4


def _fused_key_knn_fits(keys: torch.Tensor, k: int) -> bool:
    """Whether exact_key_knn takes the fused score + top-m kernel (score_top.cuh): CUDA keys with the package's kernels
    on a GPU of compute capability 8.0 or newer whose blocks may take its shared memory (181 KiB at head dim 128: H100 /
    H200 yes, A100 and consumer GPUs no), head dim <= 256, k <= SCORE_TOP_MAX_M / 2."""
    if not (keys.is_cuda and _ext.HAS_CUDA_KERNELS and keys.shape[2] <= 256 and 2 * k <= SCORE_TOP_MAX_M
            and keys.shape[1] < 2**31 and torch.cuda.get_device_capability(keys.device)[0] >= 8):
        return False
    props = torch.cuda.get_device_properties(keys.device)
    return getattr(props, "shared_memory_per_block_optin", 0) >= _score_top_smem_bytes(_score_top_dim(keys.shape[2]))


def _fused_key_knn(keys: torch.Tensor, kf: torch.Tensor, x: torch.Tensor, sq: torch.Tensor, k: int, stride: int,
                   max_block_bytes: int) -> torch.Tensor:
    """exact_key_knn on a GPU through the score_top_candidates op, from the centred and scaled keys x and their squared
    norms sq: the scores 2 x_i.x_j - |x_j|^2 (float16 operands, float32 accumulation, the bias |x_j|^2 in float32) are
    ranked inside the kernel and never written out; each key's m = 2k best columns are re-ranked by float32 distance
    (_nearest_candidates). 2k, where the chunk-top path keeps 4k: only the operands' float16 rounding is left here (that
    path also rounds every score, bias included, to float16)."""
    groups, n, d = keys.shape
    dim = _score_top_dim(d)
    m = 2 * k
    left = torch.zeros((groups, n, dim), dtype=torch.float16, device=keys.device)
    left[:, :, :d] = x
    cols = x[:, ::stride]
    right = torch.zeros((groups, cols.shape[1], dim), dtype=torch.float16, device=keys.device)
    right[:, :, :d] = 2.0 * cols
    bias = (-sq[:, ::stride]).contiguous()
    out = torch.empty((groups, n, k), dtype=torch.int64, device=keys.device)
    block = max(1, min(n, max_block_bytes // (groups * m * 24)))  # candidates and the re-rank's ids per row
    for s in range(0, n, block):
        b = min(block, n - s)
        col = torch.ops.retrieval_attention.score_top_candidates(left, right, bias, s, b, stride, m)  # (G, b, m), -1: none
        cand = torch.where(col >= 0, col * stride, col)
        out[:, s : s + b] = _nearest_candidates(keys, kf, s, cand, k)
    return out


class QueryGuidedIndex(_IndexBase):
    """The query-guided proximity graph (RetrievalAttention / RoarGraph): maximum-inner-product search for queries
    that come from another distribution than the keys.

    keys (n, d) and train_queries (m, d) (e.g. prefill attention queries). If both are CUDA tensors, the bipartite
    kNN (each training query's exact top-k_train keys), the graph's projection (projection_lists) and each key's
    ef_weak nearest keys (from which the build links the keys the training queries leave weakly connected) run on the
    GPU, and only the id lists go to the CPU.
    degree: max out-degree; k_train: neighbours per training query; ef_build: beam width of incremental inserts
    (`add`) and connectivity repair; ef_weak: beam width of the build's searches that link keys the projection left
    with few out-edges (they also start from the nearest of a few hub keys); n_pivots: leading keys of each training
    query's neighbour list that receive the query's other neighbours as edge candidates. docs/TUNING.md has the
    measurements behind the defaults.
    """

    _type = "query_guided"

    def __init__(self, keys, train_queries, degree: int = 32, k_train: int = 100, ef_build: int = 64,
                 ef_weak: int = 16, n_pivots: int = 4):
        params = {
            "degree": check_positive_int(degree, "degree", 2),
            "k_train": check_positive_int(k_train, "k_train"),
            "ef_build": check_positive_int(ef_build, "ef_build"),
            "ef_weak": check_positive_int(ef_weak, "ef_weak"),
            "n_pivots": check_positive_int(n_pivots, "n_pivots"),
        }
        t0 = time.perf_counter()
        device_keys = as_tensor(keys, "keys")
        tq = as_tensor(train_queries, "train_queries")
        check_rank(tq, 2, "train_queries", "(m, dim)")
        check_float(tq, "train_queries", FLOAT_STORAGE + (torch.float64,))
        check_finite(tq, "train_queries")
        k = _prepare_keys(device_keys)
        if tq.shape[1] != k.shape[1]:
            raise ValueError(f"train_queries have dim {tq.shape[1]}, keys have dim {k.shape[1]}")
        knn = key_knn = proj = None
        if device_keys.is_cuda and tq.is_cuda and tq.shape[0] > 0:
            knn_dev = exact_knn(device_keys.unsqueeze(0), tq.float().unsqueeze(0), params["k_train"])
            rows = device_keys.to(k.dtype).unsqueeze(0)  # the rows as the CPU build holds them
            if projection_fits(rows.shape, knn_dev.shape, params["n_pivots"]):
                proj = projection_lists(rows, knn_dev, params["n_pivots"], params["degree"])[0].cpu()
            knn = knn_dev[0].cpu()
            key_knn = build_key_lists(device_keys.unsqueeze(0), params["ef_weak"])
            key_knn = key_knn[0].cpu() if key_knn is not None else None
        tq = tq.detach().to("cpu", torch.float32).contiguous()
        super().__init__(_ext._C.KeyIndex.build(k, tq, "query_guided", params, knn, key_knn, proj))
        self.build_seconds = time.perf_counter() - t0


def load_index(path):
    """Load an index saved with `.save(path)`; corrupt, truncated or foreign files raise RuntimeError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no index file at {path}")
    handle = _ext._C.KeyIndex.load(path)
    cls = _INDEX_CLASSES.get(handle.type, _IndexBase)
    obj = cls.__new__(cls)
    _IndexBase.__init__(obj, handle)
    return obj


_INDEX_CLASSES = {"flat": FlatIndex, "query_guided": QueryGuidedIndex}
