"""The three ops from TorchScript and under torch.compile (fullgraph), compared with eager calls.

test_ops.py already covers opcheck and one torch.compile(backend="eager") call of dense + merge; this file adds
TorchScript (torch.jit.script) for all three ops, the sparse op under torch.compile, the "aot_eager" backend
(which traces through the fake kernels registered in ops.py), and a pipeline of all three ops in one graph.
"""
import pytest
import torch

import retrieval_attention as ra  # noqa: F401  (registers torch.ops.retrieval_attention.*)

# torch 2.13 deprecates torch.jit.script/save/load; they still work and users of TorchScript still need the ops
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

SCALE = 0.25


def _inputs(seed=0, hq=4, hkv=2, m=2, n=40, d=16, k=7):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, m, d, generator=g)
    keys, values = torch.randn(hkv, n, d, generator=g), torch.randn(hkv, n, d, generator=g)
    ids = torch.randint(-1, n, (hq, m, k), generator=g)
    return q, keys, values, ids


def _eager_pipeline(q, keys, values, ids):
    """Sparse attention over `ids`, dense attention over all keys, and their merge: the decode step's op sequence."""
    o_s, l_s = ra.sparse_attention(q, keys, values, ids, SCALE)
    o_d, l_d = ra.dense_attention(q, keys, values, SCALE, causal=False)
    o_m, l_m = ra.merge_attention(o_s, l_s, o_d, l_d)
    return o_s, l_s, o_d, l_d, o_m, l_m


# -- TorchScript ---------------------------------------------------------------------------------------------------
def _scripted_sparse(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor):
    return torch.ops.retrieval_attention.sparse_attention(q, keys, values, ids, 0.25)


def _scripted_dense(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: bool):
    return torch.ops.retrieval_attention.dense_attention(q, keys, values, 0.25, causal)


def _scripted_dense_default(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    # the schema's default causal=False must be usable from TorchScript
    return torch.ops.retrieval_attention.dense_attention(q, keys, values, 0.25)


def _scripted_merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    return torch.ops.retrieval_attention.merge_attention(out_a, lse_a, out_b, lse_b)


def _scripted_pipeline(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor):
    o_s, l_s = torch.ops.retrieval_attention.sparse_attention(q, keys, values, ids, 0.25)
    o_d, l_d = torch.ops.retrieval_attention.dense_attention(q, keys, values, 0.25, False)
    o_m, l_m = torch.ops.retrieval_attention.merge_attention(o_s, l_s, o_d, l_d)
    return o_s, l_s, o_d, l_d, o_m, l_m


def test_torchscript_each_op_matches_eager():
    q, keys, values, ids = _inputs()
    o, l = torch.jit.script(_scripted_sparse)(q, keys, values, ids)
    ro, rl = ra.sparse_attention(q, keys, values, ids, SCALE)
    torch.testing.assert_close(o, ro, rtol=0, atol=0)
    torch.testing.assert_close(l, rl, rtol=0, atol=0)

    dense = torch.jit.script(_scripted_dense)
    for causal in (False, True):
        o, l = dense(q, keys, values, causal)
        ro, rl = ra.dense_attention(q, keys, values, SCALE, causal=causal)
        torch.testing.assert_close(o, ro, rtol=0, atol=0)
        torch.testing.assert_close(l, rl, rtol=0, atol=0)
    o, l = torch.jit.script(_scripted_dense_default)(q, keys, values)
    ro, rl = ra.dense_attention(q, keys, values, SCALE)
    torch.testing.assert_close(o, ro, rtol=0, atol=0)

    oa, la = ra.dense_attention(q, keys[:, :20], values[:, :20], SCALE)
    ob, lb = ra.dense_attention(q, keys[:, 20:], values[:, 20:], SCALE)
    o, l = torch.jit.script(_scripted_merge)(oa, la, ob, lb)
    ro, rl = ra.merge_attention(oa, la, ob, lb)
    torch.testing.assert_close(o, ro, rtol=0, atol=0)
    torch.testing.assert_close(l, rl, rtol=0, atol=0)


def test_torchscript_graph_contains_the_ops_and_survives_save_load(tmp_path):
    scripted = torch.jit.script(_scripted_pipeline)
    graph = str(scripted.graph)
    for name in ("sparse_attention", "dense_attention", "merge_attention"):
        assert f"retrieval_attention::{name}" in graph, graph
    # a scripted module round-trips through torch.jit.save/load (the ops are resolved by name on load)

    class Step(torch.nn.Module):
        def forward(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor):
            return _scripted_pipeline(q, keys, values, ids)

    path = tmp_path / "step.pt"
    torch.jit.save(torch.jit.script(Step()), str(path))
    loaded = torch.jit.load(str(path))
    q, keys, values, ids = _inputs(seed=1)
    for got, want in zip(loaded(q, keys, values, ids), _eager_pipeline(q, keys, values, ids)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_torchscript_bad_input_raises_not_aborts():
    # TorchScript calls the op directly (no Python checks in ops.py): the C++ checks must raise, not crash
    q, keys, values, ids = _inputs()
    with pytest.raises(RuntimeError):
        torch.jit.script(_scripted_sparse)(q, keys, values, torch.full_like(ids, 10**6))


# -- torch.compile ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_pipeline_matches_eager(backend):
    torch._dynamo.reset()

    @torch.compile(backend=backend, fullgraph=True)
    def step(q, keys, values, ids):
        o_s, l_s = torch.ops.retrieval_attention.sparse_attention(q, keys, values, ids, SCALE)
        o_d, l_d = torch.ops.retrieval_attention.dense_attention(q, keys, values, SCALE, True)
        o_m, l_m = torch.ops.retrieval_attention.merge_attention(o_s, l_s, o_d, l_d)
        return o_s, l_s, o_d, l_d, o_m * 2.0, l_m + 1.0  # torch ops around the custom ops join the same graph

    q, keys, values, ids = _inputs(seed=2)
    got = step(q, keys, values, ids)
    o_s, l_s = ra.sparse_attention(q, keys, values, ids, SCALE)
    o_d, l_d = ra.dense_attention(q, keys, values, SCALE, causal=True)
    o_m, l_m = ra.merge_attention(o_s, l_s, o_d, l_d)
    for g_, w in zip(got, (o_s, l_s, o_d, l_d, o_m * 2.0, l_m + 1.0)):
        torch.testing.assert_close(g_, w, rtol=1e-6, atol=1e-6)

    # new shapes (more keys, more queries) go through the same compiled function (recompiling or dynamic shapes)
    q2, keys2, values2, ids2 = _inputs(seed=3, m=3, n=64, k=11)
    got2 = step(q2, keys2, values2, ids2)
    torch.testing.assert_close(got2[0], ra.sparse_attention(q2, keys2, values2, ids2, SCALE)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compile_fake_kernels_give_eager_shapes_and_dtypes(backend, dtype):
    """The fake kernels' output metadata (shape, float32 dtype) must match the real kernels for every key dtype."""
    torch._dynamo.reset()
    q, keys, values, ids = _inputs(seed=4, hq=6, hkv=3, m=1, n=33, d=8, k=5)
    keys, values = keys.to(dtype), values[..., :4].contiguous().to(dtype)  # value dim != head dim

    @torch.compile(backend=backend, fullgraph=True)
    def f(q, keys, values, ids):
        a = torch.ops.retrieval_attention.sparse_attention(q, keys, values, ids, SCALE)
        b = torch.ops.retrieval_attention.dense_attention(q, keys, values, SCALE, False)
        return a, b, torch.ops.retrieval_attention.merge_attention(a[0], a[1], b[0], b[1])

    got = f(q, keys, values, ids)
    want_a = ra.sparse_attention(q, keys, values, ids, SCALE)
    want_b = ra.dense_attention(q, keys, values, SCALE)
    want = (want_a, want_b, ra.merge_attention(*want_a, *want_b))
    for pair_g, pair_w in zip(got, want):
        for g_, w in zip(pair_g, pair_w):
            assert g_.shape == w.shape and g_.dtype == w.dtype == torch.float32
            torch.testing.assert_close(g_, w, rtol=1e-6, atol=1e-6)
