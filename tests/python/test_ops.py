"""The torch ops against a float64 torch reference, opcheck, and bad inputs."""
import pytest
import torch

import retrieval_attention as ra

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}  # storage is exact; math is float32


def reference(q, keys, values, mask, scale):
    """float64 attention with a boolean (Hq, m, n) mask of visible keys."""
    hq, hkv = q.shape[0], keys.shape[0]
    k = keys.double().repeat_interleave(hq // hkv, 0)
    v = values.double().repeat_interleave(hq // hkv, 0)
    s = torch.einsum("hmd,hnd->hmn", q.double(), k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return p @ v, lse


def ids_mask(ids, n):
    hq, m, _ = ids.shape
    mask = torch.zeros(hq, m, n + 1, dtype=torch.bool)  # column n collects the -1 padding
    mask.scatter_(2, torch.where(ids >= 0, ids, n), True)
    return mask[..., :n]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,m,n,d,dv,k", [(1, 1, 1, 1, 8, 8, 1), (6, 2, 1, 300, 64, 64, 50), (8, 2, 3, 129, 32, 16, 129), (4, 4, 2, 1000, 128, 128, 7)])
def test_sparse_attention_matches_reference(dtype, hq, hkv, m, n, d, dv, k):
    g = torch.Generator().manual_seed(hq * 100 + n)
    q = torch.randn(hq, m, d, generator=g)
    keys = torch.randn(hkv, n, d, generator=g).to(dtype)
    values = torch.randn(hkv, n, dv, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(n, generator=g)[: min(k, n)] for _ in range(hq * m)]).reshape(hq, m, -1)
    ids[..., ::3] = -1  # padding entries
    out, lse = ra.sparse_attention(q, keys, values, ids, d**-0.5)
    ref_out, ref_lse = reference(q, keys, values, ids_mask(ids, n), d**-0.5)
    assert out.dtype == torch.float32 and out.shape == (hq, m, dv)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-5, atol=1e-5)
    assert torch.isinf(lse[~finite]).all()
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_dense_attention_matches_reference(dtype, causal):
    g = torch.Generator().manual_seed(7)
    hq, hkv, m, n, d = 6, 2, 4, 77, 64
    q = torch.randn(hq, m, d, generator=g) * 2
    keys = torch.randn(hkv, n, d, generator=g).to(dtype)
    values = torch.randn(hkv, n, d, generator=g).to(dtype)
    out, lse = ra.dense_attention(q, keys, values, 0.125, causal=causal)
    mask = torch.ones(hq, m, n, dtype=torch.bool)
    if causal:
        mask = torch.arange(n)[None, None, :] <= (n - m + torch.arange(m))[None, :, None]
        mask = mask.expand(hq, m, n)
    ref_out, ref_lse = reference(q, keys, values, mask, 0.125)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["prefix_of_buffer", "one_head_prefix", "every_other_row", "transposed_rows", "expanded_head"])
def test_dense_attention_reads_strided_keys_like_contiguous_ones(layout):
    """A cache's static set is the first n rows of a larger buffer: read in place, same result as a packed copy
    (and layouts whose rows are not contiguous are copied first, also the same result)."""
    g = torch.Generator().manual_seed(11)
    hq, m, n, d = 6, 2, 40, 16
    hkv = 1 if layout in ("one_head_prefix", "expanded_head") else 2
    big_k, big_v = torch.randn(hkv, 2 * n + 3, d, generator=g).bfloat16(), torch.randn(hkv, 2 * n + 3, d, generator=g).bfloat16()
    if layout in ("prefix_of_buffer", "one_head_prefix"):
        keys, values = big_k[:, :n], big_v[:, :n]
    elif layout == "every_other_row":
        keys, values = big_k[:, : 2 * n : 2], big_v[:, : 2 * n : 2]
    elif layout == "transposed_rows":
        keys = big_k[:, :n].transpose(1, 2).contiguous().transpose(1, 2)
        values = big_v[:, :n].transpose(1, 2).contiguous().transpose(1, 2)
    else:  # one kv head seen as two through a zero head stride
        hkv = 2
        keys, values = big_k[:, :n].expand(2, n, d), big_v[:, :n].expand(2, n, d)
    assert keys.is_contiguous() == (layout == "one_head_prefix")  # a single head's stride does not count in torch
    q = torch.randn(hq, m, d, generator=g)
    out, lse = ra.dense_attention(q, keys, values, 0.25, causal=True)
    ref_out, ref_lse = ra.dense_attention(q, keys.contiguous(), values.contiguous(), 0.25, causal=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_merge_of_two_halves_equals_full_attention():
    g = torch.Generator().manual_seed(3)
    hq, hkv, m, n, d = 4, 2, 2, 200, 32
    q = torch.randn(hq, m, d, generator=g)
    keys, values = torch.randn(hkv, n, d, generator=g), torch.randn(hkv, n, d, generator=g)
    perm = torch.randperm(n, generator=g)
    ids_a = perm[:120].expand(hq, m, 120).contiguous()
    ids_b = perm[120:].expand(hq, m, 80).contiguous()
    oa, la = ra.sparse_attention(q, keys, values, ids_a, 0.2)
    ob, lb = ra.sparse_attention(q, keys, values, ids_b, 0.2)
    out, lse = ra.merge_attention(oa, la, ob, lb)
    full_out, full_lse = ra.dense_attention(q, keys, values, 0.2)
    torch.testing.assert_close(out, full_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, full_lse, rtol=1e-6, atol=1e-6)
    # one empty side: result is the other side; both empty: zeros and -inf
    ninf = torch.full_like(la, float("-inf"))
    out2, lse2 = ra.merge_attention(oa, la, ob, ninf)
    torch.testing.assert_close(out2, oa)
    out3, lse3 = ra.merge_attention(oa, ninf, ob, ninf)
    assert (out3 == 0).all() and torch.isinf(lse3).all()


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 2, 16, generator=g)
    keys, values = torch.randn(2, 30, 16, generator=g), torch.randn(2, 30, 16, generator=g)
    ids = torch.randint(-1, 30, (4, 2, 5), generator=g)
    torch.library.opcheck(torch.ops.retrieval_attention.sparse_attention.default, (q, keys, values, ids, 0.25))
    torch.library.opcheck(torch.ops.retrieval_attention.dense_attention.default, (q, keys, values, 0.25, True))
    o, l = ra.dense_attention(q, keys, values, 0.25)
    torch.library.opcheck(torch.ops.retrieval_attention.merge_attention.default, (o, l, o.clone(), l.clone()))
    torch.library.opcheck(torch.ops.retrieval_attention.chunk_top_candidates.default, (torch.randn(6, 64, generator=g), 8, 3, 10))
    cand = torch.randint(-1, 30, (2, 5, 6), generator=g)
    torch.library.opcheck(torch.ops.retrieval_attention.rerank_l2.default, (keys, 3, cand, 4))


def test_ops_under_torch_compile():
    q = torch.randn(4, 1, 16)
    keys, values = torch.randn(2, 30, 16), torch.randn(2, 30, 16)

    @torch.compile(backend="eager", fullgraph=True)
    def f(q, k, v):
        o, l = torch.ops.retrieval_attention.dense_attention(q, k, v, 0.25, False)
        return torch.ops.retrieval_attention.merge_attention(o, l, o, l)

    out, lse = f(q, keys, values)
    ref, ref_lse = ra.dense_attention(q, keys, values, 0.25)
    torch.testing.assert_close(out, ref)


def _ok_args():
    return torch.randn(4, 1, 8), torch.randn(2, 10, 8), torch.randn(2, 10, 8), torch.zeros(4, 1, 3, dtype=torch.long)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: (a[0].double().int(), *a[1:]), TypeError, "q must have dtype"),
        (lambda a: (a[0], a[1].int(), *a[2:]), TypeError, "keys must have dtype"),
        (lambda a: (a[0][0], *a[1:]), ValueError, "q must have shape"),
        (lambda a: (a[0], a[1][:, :, :4], *a[2:]), ValueError, "head_dim"),
        (lambda a: (a[0], a[1], a[2][:, :5], a[3]), ValueError, "values shape"),
        (lambda a: (torch.randn(3, 1, 8), *a[1:3], torch.zeros(3, 1, 3, dtype=torch.long)), ValueError, "multiple of kv_heads"),
        (lambda a: (*a[:3], a[3].int()), TypeError, "ids must be int64"),
        (lambda a: (*a[:3], torch.full((4, 1, 3), 10, dtype=torch.long)), ValueError, "out of range"),
        (lambda a: (*a[:3], torch.full((4, 1, 3), -5, dtype=torch.long)), ValueError, "out of range"),
        (lambda a: (*a[:3], torch.zeros(4, 2, 3, dtype=torch.long)), ValueError, "ids shape"),
        (lambda a: (a[0], a[1].to(torch.float16), *a[2:]), TypeError, "differs from keys dtype"),
        (lambda a: ("q", *a[1:]), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_sparse_attention_bad_inputs(mutate, exc, match):
    args = mutate(_ok_args())
    with pytest.raises(exc, match=match):
        ra.sparse_attention(*args, 0.5)


def test_merge_out_dtype_rounds_the_float32_merge():
    """merge_attention(..., out_dtype=) writes the output as .to(out_dtype) of the float32 merge would (lse float32)."""
    g = torch.Generator().manual_seed(8)
    oa, ob = torch.randn(4, 2, 16, generator=g), torch.randn(4, 2, 16, generator=g)
    la, lb = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    out, lse = ra.merge_attention(oa, la, ob, lb)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        o, l = ra.merge_attention(oa, la, ob, lb, out_dtype=dt)
        assert o.dtype == dt and torch.equal(o, out.to(dt)) and torch.equal(l, lse)
    with pytest.raises(TypeError, match="out_dtype"):
        ra.merge_attention(oa, la, ob, lb, out_dtype=torch.float64)


def test_dense_and_merge_bad_inputs():
    q, k, v, _ = _ok_args()
    with pytest.raises(ValueError, match="causal"):
        ra.dense_attention(torch.randn(4, 11, 8), k, v, 0.5, causal=True)
    o, l = ra.dense_attention(q, k, v, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        ra.merge_attention(o, l, o[:, :, :4], l)
    with pytest.raises(ValueError, match="lse_a"):
        ra.merge_attention(o, l[:2], o, l)
    with pytest.raises(TypeError, match="out_b must be a torch.Tensor"):
        ra.merge_attention(o, l, None, l)


def chunk_top_reference(scores, chunk, kc, m):
    """chunk_top_candidates by its contract, in float64 torch: chunks ranked by their maximum, entries of the kc best
    chunks by value, NaN as -inf, equal values by smaller chunk / column first (stable sorts)."""
    x = scores.double().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    rows, cols = x.shape
    cmax = x.view(rows, cols // chunk, chunk).amax(-1)
    top = cmax.sort(dim=-1, descending=True, stable=True).indices[:, :kc].sort(-1).values  # kept chunks, in column order
    kept_cols = (top.unsqueeze(-1) * chunk + torch.arange(chunk)).reshape(rows, kc * chunk)
    order = x.gather(1, kept_cols).sort(dim=-1, descending=True, stable=True).indices[:, :m]
    return kept_cols.gather(1, order)


def test_chunk_top_candidates_matches_its_contract():
    """The candidate columns of the neighbour lists (CPU impl): the m best entries of each row's kc best chunks, best
    first, with ties (many in 16-bit floats), NaN, +-inf and -0 ranked as the contract says, for float32, float16 and
    bfloat16 scores; kc = all chunks and m = all kept entries included. The CUDA impl is held to this impl in
    test_cuda_ops.py."""
    op = torch.ops.retrieval_attention.chunk_top_candidates
    g = torch.Generator().manual_seed(21)
    cases = [(40, 32 * 64, 64, 5, 40), (7, 16 * 8, 8, 16, 128), (9, 3 * 128, 128, 1, 1), (5, 256 * 4, 256, 4, 1024)]
    for rows, cols, chunk, kc, m in cases:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(rows, cols, generator=g)
            if dtype != torch.float32:
                x = (x * 4).round() / 4  # few distinct values: ties everywhere
            x[0, :: 7] = float("nan")
            x[1, 3] = float("inf")
            x[2] = float("-inf")
            x[3, : cols // 2] = -0.0
            x[3, cols // 2 :] = 0.0
            x = x.to(dtype)
            got = op(x, chunk, kc, m)
            assert got.dtype == torch.int64 and got.shape == (rows, m)
            assert torch.equal(got, chunk_top_reference(x, chunk, kc, m)), (rows, cols, chunk, kc, m, dtype)


@pytest.mark.parametrize("args, exc, match", [
    ((torch.zeros(4, 100), 8, 2, 4), ValueError, "multiple of chunk"),
    ((torch.zeros(4, 64), 8, 9, 4), ValueError, "kc must be in"),
    ((torch.zeros(4, 64), 8, 2, 17), ValueError, "m must be in"),
    ((torch.zeros(4, 64), 0, 2, 4), ValueError, "chunk must be"),
    ((torch.zeros(64), 8, 2, 4), ValueError, "2 dims"),
    ((torch.zeros(4, 64, dtype=torch.float64), 8, 2, 4), TypeError, "float32, float16 or bfloat16"),
])
def test_chunk_top_candidates_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        torch.ops.retrieval_attention.chunk_top_candidates(*args)


def test_rerank_l2_matches_its_contract():
    """The key lists' re-ranking (CPU impl): for key row_start + r, the k nearest of its candidates by float32 L2
    distance, nearest first, with -1 candidates skipped and -1 padding when fewer than k are valid; a float64
    reference agrees rank by rank (distances to float32 rounding), for float32, float16 and bfloat16 keys."""
    op = torch.ops.retrieval_attention.rerank_l2
    g = torch.Generator().manual_seed(23)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        keys = torch.randn(3, 500, 40, generator=g).to(dtype)
        cand = torch.stack([torch.randperm(500, generator=g)[:64] for _ in range(3 * 70)]).view(3, 70, 64)
        cand[:, :, ::9] = -1
        got = op(keys, 100, cand, 20)
        assert got.shape == (3, 70, 20) and got.dtype == torch.int64
        kd = keys.double()
        dist = torch.cdist(kd[:, 100:170], kd).gather(-1, cand.clamp(min=0)).masked_fill(cand < 0, float("inf"))
        ref = dist.topk(20, largest=False)
        mine = torch.cdist(kd[:, 100:170], kd).gather(-1, got)
        assert torch.allclose(mine, ref.values, rtol=1e-5, atol=0), dtype
        assert (got == cand.gather(-1, ref.indices)).double().mean() >= 0.999
    few = torch.full((1, 2, 6), -1, dtype=torch.int64)
    few[0, :, :2] = torch.tensor([[5, 7], [9, 3]])
    got = op(torch.randn(1, 12, 4, generator=g), 0, few, 4)
    assert torch.equal(got[:, :, 2:], torch.full((1, 2, 2), -1)) and set(got[0, 1, :2].tolist()) == {9, 3}


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: {**a, "cand": a["cand"].int()}, TypeError, "int64"),
    (lambda a: {**a, "keys": a["keys"].double()}, TypeError, "float32, float16 or bfloat16"),
    (lambda a: {**a, "k": 0}, ValueError, "k must be in"),
    (lambda a: {**a, "k": 9}, ValueError, "k must be in"),
    (lambda a: {**a, "row_start": 45}, ValueError, "must lie in"),
    (lambda a: {**a, "cand": a["cand"][:1]}, ValueError, "groups"),
    (lambda a: {**a, "cand": a["cand"].clone().fill_(50)}, ValueError, "out of range"),
    (lambda a: {**a, "cand": a["cand"].clone().fill_(-2)}, ValueError, "out of range"),
    (lambda a: {**a, "keys": a["keys"][0]}, ValueError, "3 dims"),
])
def test_rerank_l2_bad_inputs(mutate, exc, match):
    args = {"keys": torch.randn(2, 50, 8), "row_start": 0, "cand": torch.zeros(2, 10, 8, dtype=torch.int64), "k": 4}
    a = mutate(args)
    with pytest.raises(exc, match=match):
        torch.ops.retrieval_attention.rerank_l2(a["keys"], a["row_start"], a["cand"], a["k"])


def test_rerank_l2_without_the_id_check_skips_bad_ids():
    """check_ids=False (the prefill's own calls, which would pay a device sync per key block for the check): ids
    outside [0, n) count as none, are never read, and the list is what the valid candidates give."""
    op = torch.ops.retrieval_attention.rerank_l2
    g = torch.Generator().manual_seed(25)
    keys = torch.randn(1, 30, 8, generator=g)
    cand = torch.tensor([[[3, 99, 7, -5, 12, 30]]])
    got = op(keys, 0, cand, 4, False)
    ok = op(keys, 0, torch.tensor([[[3, -1, 7, -1, 12, -1]]]), 4)
    assert torch.equal(got, ok) and got[0, 0, 3] == -1
