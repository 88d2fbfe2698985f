"""The CUDA impls of the retrieval_attention ops against a float64 torch reference, and against the CPU impls.

Every test is marked `gpu` and skipped (with a reason) when torch.cuda is not available. On a CUDA machine the
extension must have been built with its CUDA kernels; if it was not, the tests fail (not skip) and say so.

Inputs are fresh random tensors from a per-case seed; RA_TEST_SEED=<int> changes the base seed. The reference
is computed in float64 from the *same* stored (possibly float16/bfloat16-rounded) keys and values and the
float32-rounded queries, so the error bounds measure only the kernels' float32 accumulation, whatever the
storage dtype. The ops allocate their outputs, so they cannot be poisoned directly; instead the CUDA caching
allocator is filled with NaN blocks right before each call (freed blocks are handed out again unchanged), so an
output element the kernels forget to write very likely shows up as NaN.
"""
import os
import zlib

import pytest
import torch

from conftest import in_subprocess
import retrieval_attention  # noqa: F401  (registers torch.ops.retrieval_attention)

ops = torch.ops.retrieval_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# float32 accumulation error only (see module docstring); a little wider for long key sets and peaky softmax.
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
LSE_TOL = 2e-5
BASE_SEED = int(os.environ.get("RA_TEST_SEED", "1234"))
NEG_INF = float("-inf")


@pytest.fixture(scope="module", autouse=True)
def _cuda_kernels_registered():
    for op in ("dense_attention", "sparse_attention", "merge_attention"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"retrieval_attention::{op}", "CUDA"), (
            f"retrieval_attention::{op} has no CUDA kernel: the extension was built without csrc/cuda/*.cu "
            "(rebuild with a CUDA torch and the CUDA toolkit, RA_FORCE_CPU unset)"
        )


def gen(*key):
    g = torch.Generator()
    g.manual_seed(BASE_SEED + zlib.crc32(repr(key).encode()))  # stable across processes (unlike hash())
    return g


def poison_allocator():
    """Fill the caching allocator's free blocks with NaN: small-pool (< 1 MiB) and large-pool allocations."""
    blocks = [torch.full((64 * 1024,), float("nan"), device="cuda") for _ in range(32)]  # 256 KiB each
    blocks += [torch.full((n,), float("nan"), device="cuda") for n in (1 << 20, 4 << 20, 16 << 20, 64 << 20)]
    torch.cuda.synchronize()
    del blocks


def make_qkv(g, hq, hkv, m, n, d, dv, dtype, q_scale=1.0):
    q = torch.randn(hq, m, d, generator=g) * q_scale
    keys = torch.randn(hkv, n, d, generator=g).to(dtype)
    values = torch.randn(hkv, n, dv, generator=g).to(dtype)
    return q, keys, values


def reference(q, keys, values, mask, scale):
    """float64 attention over a boolean (Hq, m, n) mask of visible keys (computed on the tensors' device)."""
    hq, hkv = q.shape[0], keys.shape[0]
    k = keys.double().repeat_interleave(hq // hkv, 0)
    v = values.double().repeat_interleave(hq // hkv, 0)
    s = torch.einsum("hmd,hnd->hmn", q.float().double(), k) * scale
    s = s.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return p @ v, lse


def causal_mask(hq, m, n, device):
    j = torch.arange(n, device=device)[None, None, :]
    last = (n - m + torch.arange(m, device=device))[None, :, None]
    return (j <= last).expand(hq, m, n)


def sparse_reference(q, keys, values, ids, scale):
    """float64 attention over the ids of each row (-1 skipped, duplicates counted), by gathering."""
    hq, hkv = q.shape[0], keys.shape[0]
    k = keys.double().repeat_interleave(hq // hkv, 0)
    v = values.double().repeat_interleave(hq // hkv, 0)
    valid = ids >= 0
    idx = ids.clamp(min=0)
    h = torch.arange(hq, device=ids.device)[:, None, None]
    kg, vg = k[h, idx], v[h, idx]  # (hq, m, k, d), (hq, m, k, dv)
    s = torch.einsum("hmd,hmkd->hmk", q.float().double(), kg) * scale
    s = s.masked_fill(~valid, NEG_INF)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return torch.einsum("hmk,hmkv->hmv", p, vg), lse


def check_result(out, lse, ref_out, ref_lse, out_tol, what):
    hq, m, dv = ref_out.shape
    assert out.is_cuda and lse.is_cuda, what
    assert out.dtype == torch.float32 and lse.dtype == torch.float32, what
    assert out.shape == (hq, m, dv) and lse.shape == (hq, m), f"{what}: shapes {tuple(out.shape)}, {tuple(lse.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in out (unwritten or bad math)"
    assert not torch.isnan(lse).any(), f"{what}: NaN in lse"
    assert torch.isfinite(out).all(), f"{what}: non-finite out"
    finite = torch.isfinite(ref_lse)
    assert torch.isfinite(lse[finite]).all(), f"{what}: lse not finite where the reference is"
    assert (lse[~finite] == NEG_INF).all(), f"{what}: empty key sets must give lse = -inf"
    assert (out[~finite] == 0).all(), f"{what}: empty key sets must give out = 0"
    torch.testing.assert_close(lse.double(), ref_lse, rtol=LSE_TOL, atol=LSE_TOL, msg=lambda s: f"{what}: lse: {s}")
    torch.testing.assert_close(out.double(), ref_out, rtol=out_tol, atol=out_tol, msg=lambda s: f"{what}: out: {s}")


# --------------------------------------------------------------------------------------------------
# dense (and causal) attention
# --------------------------------------------------------------------------------------------------
# (hq, hkv, m, n, d, dv, causal): GQA ratios 1/3/4, n from 1 to 5000, d = 64 / 128 (16-byte vector path) and
# other dims (generic path), rows few (many key splits) and many (one split), causal with m = 1, m < n, m = n.
DENSE_CASES = [
    (1, 1, 1, 1, 64, 64, False),
    (4, 4, 1, 7, 128, 128, False),
    (6, 2, 3, 129, 128, 128, False),
    (32, 8, 1, 640, 128, 128, False),  # Llama-3-8B decode over the default static set
    (32, 8, 1, 4096, 128, 128, False),
    (8, 2, 4, 5000, 64, 64, False),
    (1, 1, 1, 5000, 128, 128, False),  # one row: the most key splits
    (3, 1, 2, 2000, 64, 64, False),
    (32, 8, 64, 300, 128, 128, False),  # 2048 rows: one split
    (6, 2, 1, 640, 64, 64, True),  # decode step: m = 1 sees everything
    (6, 2, 16, 1000, 64, 64, True),
    (4, 4, 37, 37, 128, 128, True),  # prefill: m = n
    (3, 1, 5, 2000, 128, 128, True),
    (2, 1, 1, 5000, 128, 128, True),
    (32, 8, 8, 4096, 128, 128, True),
    (6, 2, 2, 333, 96, 96, False),  # generic path: d not 64/128
    (4, 2, 3, 700, 64, 32, True),  # generic path: d != dv
    (2, 2, 1, 50, 256, 256, False),  # generic path: largest supported dim
    (1, 1, 1, 3000, 8, 8, False),
    (4, 1, 2, 1, 1, 1, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv,m,n,d,dv,causal", DENSE_CASES)
def test_dense_attention_matches_float64_reference(dtype, hq, hkv, m, n, d, dv, causal):
    q, keys, values = make_qkv(gen("dense", hq, hkv, m, n, d, dv, causal, str(dtype)), hq, hkv, m, n, d, dv, dtype)
    q, keys, values = q.cuda(), keys.cuda(), values.cuda()
    scale = d**-0.5
    poison_allocator()
    out, lse = ops.dense_attention(q, keys, values, scale, causal)
    mask = causal_mask(hq, m, n, "cuda") if causal else torch.ones(hq, m, n, dtype=torch.bool, device="cuda")
    ref_out, ref_lse = reference(q, keys, values, mask, scale)
    check_result(out, lse, ref_out, ref_lse, OUT_TOL[dtype], f"dense {dtype} hq={hq} hkv={hkv} m={m} n={n} d={d} dv={dv} causal={causal}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [200, 4096])
def test_dense_peaky_softmax_with_late_maximum(dtype, n):
    """Large scores (no overflow: max subtraction) whose maximum sits in the last key (online rescaling)."""
    g = gen("peaky", n, str(dtype))
    hq, hkv, m, d = 8, 2, 1, 128
    q, keys, values = make_qkv(g, hq, hkv, m, n, d, d, dtype, q_scale=2.0)
    keys[:, -1] = (1.5 * q.reshape(hkv, hq // hkv, d).mean(1)).to(dtype)  # aligned with its group's queries: score ~190
    q, keys, values = q.cuda(), keys.cuda(), values.cuda()
    scale = 1.0  # scores in the hundreds: exp would overflow without the running max
    poison_allocator()
    out, lse = ops.dense_attention(q, keys, values, scale, False)
    ref_out, ref_lse = reference(q, keys, values, torch.ones(hq, m, n, dtype=torch.bool, device="cuda"), scale)
    assert ref_lse.min() > 100  # exp(score) overflows float32 (> 88) unless the running max is subtracted
    # scores ~128 carry float32 dot-product error ~1e-4 absolute, which the weights inherit
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out.double(), ref_out, rtol=5e-4, atol=5e-4)


def test_dense_empty_key_set_gives_zero_and_neg_inf():
    q = torch.randn(4, 3, 64, device="cuda")
    keys = torch.empty(2, 0, 64, device="cuda", dtype=torch.float16)
    values = torch.empty(2, 0, 64, device="cuda", dtype=torch.float16)
    poison_allocator()
    out, lse = ops.dense_attention(q, keys, values, 0.125, False)
    assert out.shape == (4, 3, 64) and lse.shape == (4, 3)
    assert (out == 0).all() and (lse == NEG_INF).all()


def test_dense_zero_queries():
    q = torch.randn(4, 0, 64, device="cuda")
    keys = torch.randn(2, 10, 64, device="cuda")
    out, lse = ops.dense_attention(q, keys, keys, 0.125, True)
    assert out.shape == (4, 0, 64) and lse.shape == (4, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_strided_and_misaligned_keys(dtype):
    """keys/values as slices of a larger buffer (read in place through strides), and 16-byte-misaligned storage
    (falls back to the generic kernel); both must match the contiguous result."""
    g = gen("strided", str(dtype))
    hq, hkv, m, n, d, cap = 8, 2, 2, 700, 128, 1000
    q = torch.randn(hq, m, d, generator=g).cuda()
    kbuf = torch.randn(hkv, cap, d, generator=g).to(dtype).cuda()
    vbuf = torch.randn(hkv, cap, d, generator=g).to(dtype).cuda()
    keys, values = kbuf[:, 100 : 100 + n], vbuf[:, 100 : 100 + n]  # non-contiguous, unit last stride
    assert not keys.is_contiguous()
    want_out, want_lse = reference(q, keys, values, torch.ones(hq, m, n, dtype=torch.bool, device="cuda"), d**-0.5)
    out, lse = ops.dense_attention(q, keys, values, d**-0.5, False)
    check_result(out, lse, want_out, want_lse, OUT_TOL[dtype], "strided")
    flat_k = torch.empty(keys.numel() + 1, dtype=dtype, device="cuda")
    flat_v = torch.empty(values.numel() + 1, dtype=dtype, device="cuda")
    mk = flat_k[1:].view(hkv, n, d)  # storage offset of one element: not 16-byte aligned
    mv = flat_v[1:].view(hkv, n, d)
    mk.copy_(keys)
    mv.copy_(values)
    out2, lse2 = ops.dense_attention(q, mk, mv, d**-0.5, False)
    check_result(out2, lse2, want_out, want_lse, OUT_TOL[dtype], "misaligned")
    # last dim not unit-stride: copied by the launcher, same result
    kt = keys.transpose(1, 2).contiguous().transpose(1, 2)
    out3, lse3 = ops.dense_attention(q, kt, values, d**-0.5, False)
    check_result(out3, lse3, want_out, want_lse, OUT_TOL[dtype], "last-dim strided")


def test_dense_query_dtypes_and_noncontiguous_query():
    g = gen("qdtype")
    hq, hkv, m, n, d = 6, 2, 3, 300, 64
    q, keys, values = make_qkv(g, hq, hkv, m, n, d, d, torch.bfloat16)
    q, keys, values = q.cuda(), keys.cuda(), values.cuda()
    for qq in (q.half(), q.bfloat16(), q.double(), q.transpose(0, 1).contiguous().transpose(0, 1)):
        out, lse = ops.dense_attention(qq, keys, values, 0.1, True)
        ref_out, ref_lse = reference(qq, keys, values, causal_mask(hq, m, n, "cuda"), 0.1)
        check_result(out, lse, ref_out, ref_lse, 2e-5, f"q dtype {qq.dtype}, contiguous={qq.is_contiguous()}")


def test_dense_is_deterministic():
    g = gen("det")
    q, keys, values = make_qkv(g, 32, 8, 1, 4096, 128, 128, torch.float16)
    q, keys, values = q.cuda(), keys.cuda(), values.cuda()
    a = ops.dense_attention(q, keys, values, 0.088, False)
    b = ops.dense_attention(q, keys, values, 0.088, False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_dense_runs_on_the_current_stream():
    g = gen("stream")
    q, keys, values = make_qkv(g, 8, 2, 1, 2000, 128, 128, torch.float16)
    q, keys, values = q.cuda(), keys.cuda(), values.cuda()
    want = ops.dense_attention(q, keys, values, 0.088, False)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = ops.dense_attention(q, keys, values, 0.088, False)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


# --------------------------------------------------------------------------------------------------
# sparse attention
# --------------------------------------------------------------------------------------------------
def make_ids(g, hq, m, n, k, pad_frac):
    ids = torch.randint(0, n, (hq, m, k), generator=g)  # duplicates allowed: they count twice
    pad = torch.rand(hq, m, k, generator=g) < pad_frac
    ids[pad] = -1
    if hq * m > 1:
        ids[0, 0] = -1  # one row with nothing to attend
    return ids


# (hq, hkv, m, n, k, d, dv, pad_frac)
SPARSE_CASES = [
    (1, 1, 1, 1, 1, 64, 64, 0.0),
    (4, 4, 2, 100, 16, 64, 64, 0.2),
    (6, 2, 3, 5000, 100, 128, 128, 0.2),  # paper default top_k
    (32, 8, 1, 4096, 2000, 128, 128, 0.1),  # top_k for key-value retrieval: key splits
    (8, 2, 4, 640, 300, 64, 64, 0.5),
    (3, 1, 2, 50, 200, 128, 128, 0.3),  # k > n: many duplicates
    (4, 2, 2, 500, 64, 80, 48, 0.2),  # generic path
    (2, 1, 3, 1000, 1, 128, 128, 0.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv,m,n,k,d,dv,pad_frac", SPARSE_CASES)
def test_sparse_attention_matches_float64_reference(dtype, hq, hkv, m, n, k, d, dv, pad_frac):
    g = gen("sparse", hq, hkv, m, n, k, d, dv, str(dtype))
    q, keys, values = make_qkv(g, hq, hkv, m, n, d, dv, dtype)
    ids = make_ids(g, hq, m, n, k, pad_frac)
    q, keys, values, ids = q.cuda(), keys.cuda(), values.cuda(), ids.cuda()
    scale = d**-0.5
    poison_allocator()
    out, lse = ops.sparse_attention(q, keys, values, ids, scale)
    ref_out, ref_lse = sparse_reference(q, keys, values, ids, scale)
    check_result(out, lse, ref_out, ref_lse, OUT_TOL[dtype], f"sparse {dtype} hq={hq} hkv={hkv} m={m} n={n} k={k} d={d} dv={dv}")


def test_sparse_all_padding_and_k_zero():
    q = torch.randn(4, 2, 64, device="cuda")
    keys = torch.randn(2, 30, 64, device="cuda")
    ids = torch.full((4, 2, 5), -1, dtype=torch.long, device="cuda")
    poison_allocator()
    out, lse = ops.sparse_attention(q, keys, keys, ids, 0.125)
    assert (out == 0).all() and (lse == NEG_INF).all()
    out, lse = ops.sparse_attention(q, keys, keys, ids[..., :0], 0.125)
    assert out.shape == (4, 2, 64) and (out == 0).all() and (lse == NEG_INF).all()


def test_sparse_with_all_ids_equals_dense():
    g = gen("sparse=dense")
    hq, hkv, m, n, d = 8, 2, 2, 1500, 128
    q, keys, values = make_qkv(g, hq, hkv, m, n, d, d, torch.float16)
    q, keys, values = q.cuda(), keys.cuda(), values.cuda()
    ids = torch.arange(n, device="cuda").expand(hq, m, n).contiguous()
    so, sl = ops.sparse_attention(q, keys, values, ids, 0.09)
    do, dl = ops.dense_attention(q, keys, values, 0.09, False)
    torch.testing.assert_close(so, do, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl, dl, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [-2, 30, 1 << 40])
@in_subprocess
def test_sparse_rejects_out_of_range_ids(bad):
    q = torch.randn(2, 1, 64, device="cuda")
    keys = torch.randn(1, 30, 64, device="cuda")
    ids = torch.tensor([[[0, 5, -1]], [[1, bad, 2]]], device="cuda")
    with pytest.raises(ValueError, match="out of range"):
        ops.sparse_attention(q, keys, keys, ids, 0.125)


# --------------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------------
def merge_reference(oa, la, ob, lb):
    oa, la, ob, lb = (t.double() for t in (oa, la, ob, lb))
    lse = torch.logaddexp(la, lb)
    wa = torch.exp(la - lse).nan_to_num(0.0).unsqueeze(-1)
    wb = torch.exp(lb - lse).nan_to_num(0.0).unsqueeze(-1)
    return wa * oa + wb * ob, lse


@pytest.mark.parametrize("shape", [(32, 1, 128), (5, 7, 3, 64), (10, 1), (128,), (4, 4, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_merge_matches_float64_reference(shape, dtype):
    g = gen("merge", shape, str(dtype))
    oa, ob = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    la, lb = torch.randn(shape[:-1], generator=g) * 20, torch.randn(shape[:-1], generator=g) * 20
    if la.numel() >= 4:  # empty a, empty b, both empty
        la.view(-1)[0] = NEG_INF
        lb.view(-1)[1] = NEG_INF
        la.view(-1)[2] = NEG_INF
        lb.view(-1)[2] = NEG_INF
        oa.view(-1, shape[-1])[[0, 2]] = 0
        ob.view(-1, shape[-1])[[1, 2]] = 0
    oa, la, ob, lb = (t.to(dtype).cuda() for t in (oa, la, ob, lb))
    poison_allocator()
    out, lse = ops.merge_attention(oa, la, ob, lb)
    ref_out, ref_lse = merge_reference(oa, la, ob, lb)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == oa.shape and lse.shape == la.shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    tol = 1e-5  # the reference sees the same rounded inputs
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    if la.numel() >= 4:
        assert lse.view(-1)[2] == NEG_INF and (out.view(-1, shape[-1])[2] == 0).all()


def test_split_attention_merged_equals_dense():
    """dense over the first part (as the GPU static set) + sparse over the rest (as the CPU part), merged."""
    g = gen("split-merge")
    hq, hkv, m, n, d, split = 32, 8, 1, 3000, 128, 640
    q, keys, values = make_qkv(g, hq, hkv, m, n, d, d, torch.bfloat16)
    q, keys, values = q.cuda(), keys.cuda(), values.cuda()
    oa, la = ops.dense_attention(q, keys[:, :split].contiguous(), values[:, :split].contiguous(), 0.088, False)
    ids = (split + torch.arange(n - split, device="cuda")).expand(hq, m, n - split).contiguous()
    ob, lb = ops.sparse_attention(q, keys, values, ids, 0.088)
    out, lse = ops.merge_attention(oa, la, ob, lb)
    full_out, full_lse = ops.dense_attention(q, keys, values, 0.088, False)
    torch.testing.assert_close(out, full_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, full_lse, rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------------------------------
# CPU vs CUDA: the same op on the same inputs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv,m,n,d,causal", [(6, 2, 1, 640, 64, True), (32, 8, 2, 1200, 128, False), (4, 4, 9, 9, 128, True), (3, 1, 2, 257, 96, False)])
def test_dense_cpu_and_cuda_agree(dtype, hq, hkv, m, n, d, causal):
    q, keys, values = make_qkv(gen("cpu-cuda-dense", hq, hkv, m, n, d, causal, str(dtype)), hq, hkv, m, n, d, d, dtype)
    cpu = ops.dense_attention(q, keys, values, d**-0.5, causal)
    gpu = ops.dense_attention(q.cuda(), keys.cuda(), values.cuda(), d**-0.5, causal)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv,m,n,k,d", [(6, 2, 1, 3000, 100, 64), (32, 8, 1, 5000, 2000, 128), (4, 2, 3, 50, 80, 48)])
def test_sparse_cpu_and_cuda_agree(dtype, hq, hkv, m, n, k, d):
    g = gen("cpu-cuda-sparse", hq, hkv, m, n, k, d, str(dtype))
    q, keys, values = make_qkv(g, hq, hkv, m, n, d, d, dtype)
    ids = make_ids(g, hq, m, n, k, 0.2)
    cpu = ops.sparse_attention(q, keys, values, ids, d**-0.5)
    gpu = ops.sparse_attention(q.cuda(), keys.cuda(), values.cuda(), ids.cuda(), d**-0.5)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=2e-5, atol=2e-5)


def test_merge_cpu_and_cuda_agree():
    g = gen("cpu-cuda-merge")
    oa, ob = torch.randn(32, 3, 128, generator=g), torch.randn(32, 3, 128, generator=g)
    la, lb = torch.randn(32, 3, generator=g) * 10, torch.randn(32, 3, generator=g) * 10
    la[0, 0] = NEG_INF
    lb[1, 1] = NEG_INF
    la[2, 2] = lb[2, 2] = NEG_INF
    cpu = ops.merge_attention(oa, la, ob, lb)
    gpu = ops.merge_attention(oa.cuda(), la.cuda(), ob.cuda(), lb.cuda())
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-6, atol=1e-6)


def test_merge_out_dtype_on_cuda_rounds_like_to():
    """The CUDA merge's out_dtype narrows in the kernel exactly as .to(out_dtype) of its float32 output does."""
    g = gen("cuda-merge-out-dtype")
    oa, ob = torch.randn(32, 3, 128, generator=g).cuda(), torch.randn(32, 3, 128, generator=g).cuda()
    la, lb = (torch.randn(32, 3, generator=g) * 10).cuda(), (torch.randn(32, 3, generator=g) * 10).cuda()
    la[2, 2] = lb[2, 2] = NEG_INF
    out, lse = ops.merge_attention(oa, la, ob, lb)
    for dt in (torch.float16, torch.bfloat16):
        o, l = ops.merge_attention(oa, la, ob, lb, out_dtype=dt)
        assert o.dtype == dt and torch.equal(o, out.to(dt)) and torch.equal(l, lse)


def test_merge_reads_cpu_partials_in_place_or_copies_them():
    """out_b / lse_b on the CPU (the decode step's CPU half): read by the kernel from page-locked memory, copied from
    pageable memory; the same result as from device tensors either way."""
    g = gen("cuda-merge-host-b")
    oa, la = torch.randn(32, 1, 128, generator=g).cuda(), torch.randn(32, 1, generator=g).cuda()
    ob, lb = torch.randn(32, 1, 128, generator=g), torch.randn(32, 1, generator=g)
    want = ops.merge_attention(oa, la, ob.cuda(), lb.cuda(), out_dtype=torch.bfloat16)
    for b_out, b_lse in ((ob.pin_memory(), lb.pin_memory()), (ob, lb)):
        got = ops.merge_attention(oa, la, b_out, b_lse, out_dtype=torch.bfloat16)
        assert got[0].is_cuda and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.cuda.synchronize()


@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16])
def test_narrow_queries_are_widened_in_the_kernel(q_dtype):
    """dense/sparse attention read float16/bfloat16 queries as they are: the same results as their float32 copies."""
    g = gen(f"narrow-q-{q_dtype}")
    q = torch.randn(8, 2, 128, generator=g).to(q_dtype).cuda()
    keys = torch.randn(2, 700, 128, generator=g).to(torch.bfloat16).cuda()
    values = torch.randn(2, 700, 128, generator=g).to(torch.bfloat16).cuda()
    ids = torch.randint(0, 700, (8, 2, 50), generator=g).cuda()
    for a, b in ((ops.dense_attention(q, keys, values, 0.1, causal=True), ops.dense_attention(q.float(), keys, values, 0.1, causal=True)),
                 (ops.sparse_attention(q, keys, values, ids, 0.1), ops.sparse_attention(q.float(), keys, values, ids, 0.1))):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------------
# bad inputs: clear Python errors, never a crash
# --------------------------------------------------------------------------------------------------
@in_subprocess
def test_bad_inputs_raise_clear_errors():
    q = torch.randn(4, 1, 64, device="cuda")
    keys = torch.randn(2, 10, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="keys must be a CUDA tensor"):
        ops.dense_attention(q, keys.cpu(), keys, 0.1, False)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        ops.dense_attention(q[:3], keys, keys, 0.1, False)
    with pytest.raises(ValueError, match="head_dim"):
        ops.dense_attention(q[..., :32], keys, keys, 0.1, False)
    with pytest.raises(ValueError, match="q must have shape"):
        ops.dense_attention(q[0], keys, keys, 0.1, False)
    with pytest.raises(TypeError, match="keys must be float32, float16 or bfloat16"):
        ops.dense_attention(q, keys.double(), keys.double(), 0.1, False)
    with pytest.raises(TypeError, match="values dtype"):
        ops.dense_attention(q, keys, keys.float(), 0.1, False)
    with pytest.raises(ValueError, match="causal attention needs"):
        ops.dense_attention(torch.randn(4, 11, 64, device="cuda"), keys, keys, 0.1, True)
    with pytest.raises(ValueError, match="value_dim <= 256"):
        big = torch.randn(2, 10, 512, device="cuda")
        ops.dense_attention(torch.randn(4, 1, 512, device="cuda"), big, big, 0.1, False)
    with pytest.raises(TypeError, match="ids must be int64"):
        ops.sparse_attention(q, keys, keys, torch.zeros(4, 1, 3, device="cuda", dtype=torch.int32), 0.1)
    with pytest.raises(ValueError, match="ids shape"):
        ops.sparse_attention(q, keys, keys, torch.zeros(4, 2, 3, device="cuda", dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="lse_a"):
        ops.merge_attention(torch.zeros(4, 8, device="cuda"), torch.zeros(5, device="cuda"), torch.zeros(4, 8, device="cuda"),
                            torch.zeros(5, device="cuda"))
    with pytest.raises(ValueError, match="lse_a must be a CUDA tensor"):  # only out_b / lse_b may be CPU tensors
        ops.merge_attention(torch.zeros(4, 8, device="cuda"), torch.zeros(4), torch.zeros(4, 8, device="cuda"),
                            torch.zeros(4, device="cuda"))
    with pytest.raises(ValueError, match="same shape"):
        ops.merge_attention(torch.zeros(4, 8, device="cuda"), torch.zeros(4, device="cuda"), torch.zeros(4, 7).pin_memory(),
                            torch.zeros(4).pin_memory())
    with pytest.raises(TypeError, match="out_dtype"):
        ops.merge_attention(torch.zeros(4, 8, device="cuda"), torch.zeros(4, device="cuda"), torch.zeros(4, 8, device="cuda"),
                            torch.zeros(4, device="cuda"), out_dtype=torch.float64)
    torch.cuda.synchronize()  # the context is still healthy


def test_opcheck_on_cuda():
    """Schema, fake (meta) impl and dispatch of the CUDA impls (the fake impls live in retrieval_attention.ops)."""
    g = gen("opcheck")
    q, keys, values = make_qkv(g, 4, 2, 2, 300, 64, 64, torch.float16)
    q, keys, values = q.cuda(), keys.cuda(), values.cuda()
    ids = make_ids(g, 4, 2, 300, 40, 0.2).cuda()
    torch.library.opcheck(ops.sparse_attention.default, (q, keys, values, ids, 0.125))
    torch.library.opcheck(ops.dense_attention.default, (q, keys, values, 0.125, True))
    o, l = ops.dense_attention(q, keys, values, 0.125, False)
    torch.library.opcheck(ops.merge_attention.default, (o, l, o.clone(), l.clone()))


def test_exact_key_knn_on_cuda_matches_the_cpu_lists():
    """The key-to-key lists the GPU prefill gives the graph builds (float16 candidates, float32 re-ranking) are the
    exact float32 CPU lists but where float16 rounding lost a neighbour: rank by rank, the distances agree for >= 99.9%
    of the entries, also for keys of large or small norm (the float16 stage rescales them). Every id is a valid other
    key of the same group, without repeats, nearest first."""
    from retrieval_attention.index import exact_key_knn

    g = torch.Generator().manual_seed(12)
    base = torch.randn(3, 5000, 64, generator=g) * 3 + torch.randn(3, 1, 64, generator=g) * 5
    for factor in (1.0, 300.0, 3e-5):
        keys = (base * factor).bfloat16()  # both devices see the same stored keys
        cpu = exact_key_knn(keys, 16)
        gpu = exact_key_knn(keys.cuda(), 16).cpu()
        assert gpu.shape == cpu.shape == (3, 5000, 16)
        assert bool(((gpu >= 0) & (gpu < 5000)).all()) and not bool((gpu == torch.arange(5000)[None, :, None]).any())
        ordered = gpu.sort(-1).values
        assert not bool((ordered[..., 1:] == ordered[..., :-1]).any()), "repeated ids"
        kd = keys.double()
        dist = [torch.cdist(kd[h : h + 1], kd[h : h + 1])[0] for h in range(3)]
        d_gpu = torch.stack([dist[h].gather(1, gpu[h]) for h in range(3)])
        d_cpu = torch.stack([dist[h].gather(1, cpu[h]) for h in range(3)])
        assert bool((d_gpu[..., 1:] >= d_gpu[..., :-1] * (1 - 1e-6)).all()), "not nearest first"
        same = torch.isclose(d_gpu, d_cpu, rtol=1e-6, atol=0).double().mean().item()
        assert same >= 0.999, (factor, same)


@pytest.mark.parametrize("dim,n_left,n_right,stride,m", [(64, 1000, 1000, 1, 32), (128, 777, 389, 2, 32), (256, 130, 45, 3, 30),
                                                         (128, 64, 20, 0, 32), (128, 300, 5000, 0, 1)])
def test_score_top_candidates_is_the_top_m_of_its_scores(dim, n_left, n_right, stride, m):
    """The fused score + top-m kernel (score_top.cuh) against float64 scores of the same float16 operands: per row, the
    returned columns are the m best (up to the kernel's float32 summation error, 1e-4 here), best first; the row itself
    (column c with c * stride == row) never comes back; -1 fills the rows with fewer than m other columns; a sub-range
    of rows gives the same lists as the whole; two calls give the same ids."""
    g = torch.Generator().manual_seed(dim + n_left + stride)
    left = (torch.randn(2, n_left, dim, generator=g) * 2).half()
    right = (torch.randn(2, n_right, dim, generator=g) * 2).half()
    bias = torch.randn(2, n_right, generator=g) * 10
    ids = ops.score_top_candidates(left.cuda(), right.cuda(), bias.cuda(), 0, n_left, stride, m).cpu()
    assert ids.shape == (2, n_left, m) and ids.dtype == torch.int64
    ref = torch.einsum("gid,gjd->gij", left.double(), right.double()) + bias.double()[:, None, :]
    if stride > 0:  # the row itself is out
        r = torch.arange(n_left)
        c = torch.arange(n_right)
        ref.masked_fill_((c[None, :] * stride == r[:, None])[None], float("-inf"))
    avail = torch.isfinite(ref).sum(-1)  # other columns per row
    want = avail.clamp(max=m)
    valid = torch.arange(m)[None, None, :] < want[..., None]
    assert bool((ids[valid] >= 0).all()) and bool((ids[~valid] == -1).all())
    got = ref.gather(-1, ids.clamp(min=0)).masked_fill(~valid, float("-inf"))
    assert bool(torch.isfinite(got[valid]).all()), "an excluded or padding column came back"
    best = torch.nn.functional.pad(ref, (0, m), value=float("-inf")).sort(-1, descending=True).values[..., :m]
    tol = 1e-4 * ref.masked_fill(~torch.isfinite(ref), 0).abs().amax()
    assert bool(((got - best).abs()[valid] <= tol).all()), "not the top m, best first"
    ordered = ids.sort(-1).values
    assert not bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()), "repeated ids"
    part = ops.score_top_candidates(left.cuda(), right.cuda(), bias.cuda(), 7, n_left - 20, stride, m).cpu()
    assert torch.equal(part, ids[:, 7 : n_left - 13])
    again = ops.score_top_candidates(left.cuda(), right.cuda(), bias.cuda(), 0, n_left, stride, m).cpu()
    assert torch.equal(again, ids)
    nobias = ops.score_top_candidates(left.cuda(), right.cuda(), None, 0, n_left, stride, m).cpu()
    ref0 = torch.einsum("gid,gjd->gij", left.double(), right.double()).masked_fill(~torch.isfinite(ref), float("-inf"))
    top0 = ref0.gather(-1, nobias[..., :1].clamp(min=0))
    assert bool(((top0 - ref0.amax(-1, keepdim=True)).abs() <= tol).all()), "without a bias: not the best column first"


def test_score_top_candidates_rejects_bad_input():
    """Clear errors: dims other than 64 / 128 / 256, m beyond 32, rows outside left, float32 operands, a bias of the
    wrong shape."""
    left = torch.zeros(1, 100, 128, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="dim 64, 128 or 256"):
        ops.score_top_candidates(left[..., :96].contiguous(), left[..., :96].contiguous(), None, 0, 100, 1, 16)
    with pytest.raises(ValueError, match="m <= 32"):
        ops.score_top_candidates(left, left, None, 0, 100, 1, 33)
    with pytest.raises(ValueError, match="outside"):
        ops.score_top_candidates(left, left, None, 50, 51, 1, 16)
    with pytest.raises(TypeError, match="float16"):
        ops.score_top_candidates(left.float(), left.float(), None, 0, 100, 1, 16)
    with pytest.raises(ValueError, match="bias"):
        ops.score_top_candidates(left, left, torch.zeros(1, 99, device="cuda"), 0, 100, 1, 16)


def test_exact_key_knn_fused_path_matches_the_cpu_lists_with_column_stride():
    """exact_key_knn on a GPU takes the fused kernel for head dims up to 256: with every other key as a column (the
    builds' KEY_LIST_COLUMN_STRIDE) and head dim 128, or 80 (the operands zero-padded to 128), its
    lists are the CPU's float32 lists rank by rank for >= 99.9% of the entries."""
    from retrieval_attention.index import _fused_key_knn_fits, exact_key_knn

    g = torch.Generator().manual_seed(21)
    for d in (128, 80):
        keys = (torch.randn(2, 3001, d, generator=g) * 2 + torch.randn(2, 1, d, generator=g) * 4).bfloat16()
        assert _fused_key_knn_fits(keys.cuda(), 16)
        cpu = exact_key_knn(keys, 16, column_stride=2)
        gpu = exact_key_knn(keys.cuda(), 16, column_stride=2).cpu()
        assert gpu.shape == cpu.shape == (2, 3001, 16)
        assert bool((gpu % 2 == 0).all()) and not bool((gpu == torch.arange(3001)[None, :, None]).any())
        kd = keys.double()
        dist = [torch.cdist(kd[h : h + 1], kd[h : h + 1])[0] for h in range(2)]
        d_gpu = torch.stack([dist[h].gather(1, gpu[h]) for h in range(2)])
        d_cpu = torch.stack([dist[h].gather(1, cpu[h]) for h in range(2)])
        same = torch.isclose(d_gpu, d_cpu, rtol=1e-6, atol=0).double().mean().item()
        assert same >= 0.999, (d, same)


def test_exact_knn_on_cuda_is_the_topk_of_its_scores():
    """The training queries' neighbour lists on a GPU (16-bit GEMM, top-k over each row's best column chunks) are the
    exact top-k: with small integer entries every score is an integer that 16-bit floats hold exactly, so rank by
    rank the scores of the returned ids equal a full torch.topk's (ties may pick other ids of the same score), and
    the ids are distinct keys of the right group. Also for n not a multiple of the chunk and several query blocks."""
    from retrieval_attention.index import exact_knn

    g = torch.Generator().manual_seed(14)
    for dtype in (torch.bfloat16, torch.float16):
        keys = torch.randint(-2, 3, (2, 9000, 64), generator=g).to(dtype).cuda()  # |score| <= 256: exact in bf16
        queries = torch.randint(-2, 3, (6, 300, 64), generator=g).float().cuda()
        got = exact_knn(keys, queries, 20, max_block_bytes=6 * 9000 * 4 * 64)  # 71 chunks of 128 > 2 x 20: chunked
        assert got.shape == (6, 300, 20)
        for h in range(6):
            scores = queries[h].double() @ keys[h // 3].double().T
            ref = scores.topk(20, dim=-1).values
            mine = scores.gather(1, got[h])
            assert torch.equal(mine, ref), (dtype, h)
            ordered = got[h].sort(-1).values
            assert not bool((ordered[:, 1:] == ordered[:, :-1]).any()), "repeated ids"
            assert bool(((got[h] >= 0) & (got[h] < 9000)).all())


def test_query_guided_index_from_cuda_tensors_uses_device_lists():
    """ra.QueryGuidedIndex on CUDA keys and queries (bipartite kNN, projection and key-to-key lists on the GPU) answers like the
    CPU-built index: recall@10 against the exact top-10 within a few points, and high."""
    import retrieval_attention as ra

    g = torch.Generator().manual_seed(13)
    keys = torch.randn(6000, 32, generator=g) + 2.0 * torch.randn(1, 32, generator=g)
    train = torch.randn(1500, 32, generator=g) + 3.0 * torch.randn(1, 32, generator=g)
    test = train[:100] + 0.3 * torch.randn(100, 32, generator=g)
    exact = (test @ keys.T).topk(10, dim=1).indices
    recalls = []
    for dev in ("cpu", "cuda"):
        idx = ra.QueryGuidedIndex(keys.to(dev), train.to(dev))
        ids, _ = idx.search(test, 10, 64)
        recalls.append(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, exact)) / exact.numel())
    assert recalls[1] > 0.9 and recalls[1] > recalls[0] - 0.05, recalls


def test_chunk_top_candidates_on_cuda_equals_the_cpu_impl():
    """The GPU kernel behind the neighbour lists gives exactly the CPU impl's columns (whose contract test_ops.py
    checks), in the same order: float16 and bfloat16 scores with many ties, NaN, +-inf and -0; every chunk width it
    takes; kc = all chunks and m = all kept entries; the 8B, 128K shapes of the key-to-key lists (1,019 chunks of 128,
    kc 32, m 64) and of the bipartite lists (2,038 chunks of 64, kc = m = 100), and its largest (8,192 chunks). Shapes
    it does not take, and other dtypes, are clear errors."""
    g = torch.Generator().manual_seed(22)
    cases = [(300, 1019 * 128, 128, 32, 64), (64, 40 * 8, 8, 40, 320), (33, 50 * 16, 16, 3, 7), (17, 9 * 32, 32, 9, 288),
             (20, 77 * 64, 64, 12, 100), (11, 30 * 256, 256, 30, 7680), (3, 8192 * 128, 128, 16, 64), (1, 128, 128, 1, 1),
             (200, 2038 * 64, 64, 100, 100)]
    for rows, cols, chunk, kc, m in cases:
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(rows, cols, generator=g)
            x = ((x * 8).round() / 8).to(dtype)  # few distinct values: ties everywhere
            x[0, ::5] = float("nan")
            if rows > 3:
                x[1, 7] = float("inf")
                x[2] = float("-inf")
                x[3, ::2] = -0.0
            cpu = ops.chunk_top_candidates(x, chunk, kc, m)
            poison_allocator()
            gpu = ops.chunk_top_candidates(x.cuda(), chunk, kc, m).cpu()
            assert torch.equal(gpu, cpu), (rows, cols, chunk, kc, m, dtype, (gpu != cpu).sum().item())
    x = torch.randn(4, 1024, device="cuda").half()
    with pytest.raises(ValueError, match="power of two"):
        ops.chunk_top_candidates(x, 4, 2, 4)  # chunk below 8
    with pytest.raises(ValueError, match="kept entries"):
        ops.chunk_top_candidates(torch.randn(2, 128 * 128, device="cuda").half(), 128, 65, 4)  # 8,320 kept entries
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        ops.chunk_top_candidates(x.float(), 8, 2, 4)
    torch.library.opcheck(ops.chunk_top_candidates.default, (x, 8, 3, 10))


def test_rerank_l2_on_cuda_agrees_with_the_cpu_impl():
    """The GPU re-ranking of the key lists (one warp per key) lists the same candidates as the CPU impl, nearest
    first: rank by rank the same float64 distances up to float32 rounding, the same ids but at near-ties, -1 where
    fewer than k are valid; float32, float16 and bfloat16 keys, d of 128 (the 8B shape), 40 and 256, m up to 256."""
    g = torch.Generator().manual_seed(24)
    for dtype, d, m, k in ((torch.bfloat16, 128, 64, 16), (torch.float16, 40, 256, 100), (torch.float32, 256, 33, 33),
                           (torch.bfloat16, 128, 1, 1)):
        keys = (torch.randn(3, 2000, d, generator=g) + 2).to(dtype)
        cand = torch.stack([torch.randperm(2000, generator=g)[:m] for _ in range(3 * 300)]).view(3, 300, m)
        cand[:, ::7, ::3] = -1
        cpu = ops.rerank_l2(keys, 1500, cand, k)
        poison_allocator()
        gpu = ops.rerank_l2(keys.cuda(), 1500, cand.cuda(), k).cpu()
        assert gpu.shape == cpu.shape == (3, 300, k)
        assert torch.equal(gpu < 0, cpu < 0)
        kd = keys.double()
        full = torch.cdist(kd[:, 1500:1800], kd)
        d_gpu, d_cpu = full.gather(-1, gpu.clamp(min=0)), full.gather(-1, cpu.clamp(min=0))
        assert torch.allclose(d_gpu, d_cpu, rtol=1e-5, atol=1e-6), (dtype, d, m)
        assert (gpu == cpu).double().mean() >= 0.999, (dtype, d, m)
    keys = torch.randn(1, 50, 300, device="cuda")
    with pytest.raises(ValueError, match="d <= 256"):
        ops.rerank_l2(keys, 0, torch.zeros(1, 2, 4, dtype=torch.int64, device="cuda"), 2)
    with pytest.raises(ValueError, match="out of range"):
        ops.rerank_l2(keys[..., :8], 0, torch.full((1, 2, 4), 50, dtype=torch.int64, device="cuda"), 2)
    bad = torch.tensor([[[3, 99, 7, -5, 12, 50]]])  # check_ids=False: out-of-range ids count as none, never read
    assert torch.equal(ops.rerank_l2(keys[..., :8].cuda(), 0, bad.cuda(), 4, False).cpu(), ops.rerank_l2(keys[..., :8].cpu(), 0, bad, 4, False))
    torch.library.opcheck(ops.rerank_l2.default, (keys[..., :8].contiguous(), 3, torch.randint(-1, 50, (1, 5, 6), device="cuda"), 4))


def test_gpu_prefill_never_waits_for_the_device():
    """A layer's finish_prefill on CUDA tensors queues the bipartite kNN, the key-to-key lists and the copies of the
    rows, training queries and id lists without one device sync (torch's sync debug mode raises on any), so a prefill
    queues its next layers while the GPU works. The layer built that way then decodes like full attention (exactness
    mode: top_k >= its CPU tokens), with its indexes built from those copies."""
    import retrieval_attention as ra
    from retrieval_attention.cache import RetrievalLayer

    g = torch.Generator().manual_seed(21)
    hq, hkv, T, d = 4, 2, 3000, 64
    keys = (torch.randn(1, hkv, T + 1, d, generator=g) + torch.randn(1, hkv, 1, d, generator=g)).to("cuda", torch.bfloat16)
    values = torch.randn(1, hkv, T + 1, d, generator=g).to("cuda", torch.bfloat16)
    queries = torch.randn(1, hq, T, d, generator=g).to("cuda", torch.bfloat16)
    cfg = ra.RetrievalConfig(n_sink=16, n_window=64, top_k=4096, max_train_queries=1000)
    layer = RetrievalLayer(cfg, hq, hkv, d, 0)
    layer.update(keys[:, :, :T], values[:, :, :T])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer.finish_prefill(queries)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.cpu_tokens == T - 16 - 64  # waits for the rows
    layer._wait_for_build()
    assert layer.offloaded.size == T - 16 - 64 and not layer.building
    stats = layer.stats()
    assert 0 < stats["knn_s"] < 60  # the kNN's GPU time, from events, and its parts
    assert set(stats["knn_parts_s"]) == {"bipartite", "projection", "key_lists", "copies"}
    assert all(v >= 0 for v in stats["knn_parts_s"].values()) and stats["knn_parts_s"]["bipartite"] > 0
    assert abs(sum(stats["knn_parts_s"].values()) - stats["knn_s"]) < 1e-9
    layer.update(keys[:, :, T:], values[:, :, T:])
    q = torch.randn(1, hq, 1, d, generator=g).to("cuda", torch.bfloat16)
    got = layer.decode_attention(q, d ** -0.5).float()  # (1, 1, hq, d)
    kf, vf = keys.double().repeat_interleave(hq // hkv, 1), values.double().repeat_interleave(hq // hkv, 1)
    want = torch.softmax((q.double() @ kf.transpose(-1, -2)) * d ** -0.5, -1) @ vf  # (1, hq, 1, d)
    torch.testing.assert_close(got.double(), want.transpose(1, 2), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hkv,per,n,m,d,degree,k_train", [(2, 2, 700, 60, 16, 12, 20), (2, 4, 5000, 300, 128, 32, 100)])
def test_projection_lists_cpu_and_cuda_agree(dtype, hkv, per, n, m, d, degree, k_train):
    # small-integer keys: the float32 sums are exact in any order, so the CUDA warps select exactly what the CPU does
    from retrieval_attention.index import exact_knn, projection_lists

    g = torch.Generator().manual_seed(n + d)
    keys = torch.randint(-4, 5, (hkv, n, d), generator=g).to(dtype)
    train = torch.randint(-4, 5, (hkv * per, m, d), generator=g).float()
    knn = exact_knn(keys, train, k_train)
    want = projection_lists(keys, knn, 4, degree)
    got = projection_lists(keys.cuda(), knn.cuda(), 4, degree)
    assert got.dtype == torch.int32 and got.is_cuda
    assert torch.equal(got.cpu(), want)
    assert (want[..., 0] >= 0).sum() > 100
