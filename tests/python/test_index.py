"""FlatIndex (and every index type registered in INDEX_FACTORIES): exact results, add, persistence, bad inputs, threads."""
import os
import threading

import numpy as np
import pytest
import torch

import retrieval_attention as ra


def make_flat(keys, train=None):
    return ra.FlatIndex(keys)


INDEX_FACTORIES = {"flat": make_flat}
if hasattr(ra, "QueryGuidedIndex"):
    INDEX_FACTORIES["query_guided"] = lambda keys, train=None: ra.QueryGuidedIndex(keys, train if train is not None else keys[:64].float())


def exact_topk(keys, q, k):
    return torch.topk(q.double() @ keys.double().T, k, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_flat_index_is_exact(dtype):
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(3000, 64, generator=g).to(dtype)
    q = torch.randn(20, 64, generator=g)
    idx = ra.FlatIndex(keys)
    ids, scores = idx.search(q, k=50)
    ref_scores, ref_ids = exact_topk(keys, q, 50)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=1e-4, atol=1e-4)
    # ids agree wherever the reference scores are not near-tied
    gaps = (ref_scores[:, :-1] - ref_scores[:, 1:]).abs() > 1e-3
    assert (ids[:, :-1][gaps] == ref_ids[:, :-1][gaps]).all()
    stats = idx.last_search_stats
    assert stats["visited"].dtype == torch.int64 and (stats["visited"] == 3000).all()
    assert stats["scanned_frac"] == 1.0


def test_numpy_inputs_and_single_query():
    keys = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)  # unit keys: each key is its own best inner-product match
    idx = ra.FlatIndex(keys)
    ids, scores = idx.search(keys[3] * 100, k=1)
    assert ids.shape == (1, 1) and ids[0, 0] == 3


@pytest.mark.parametrize("kind", list(INDEX_FACTORIES))
def test_add_then_search_finds_new_keys(kind):
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(500, 32, generator=g)
    idx = INDEX_FACTORIES[kind](keys)
    new = torch.randn(50, 32, generator=g) * 3  # larger norms: each new key is the best match of its own direction
    idx.add(new)
    assert idx.size == 550
    ids, _ = idx.search(new * 10, k=1, ef=64)
    assert (ids[:, 0] >= 500).float().mean() >= 0.9


@pytest.mark.parametrize("kind", list(INDEX_FACTORIES))
def test_save_load_round_trip_and_corruption(kind, tmp_path):
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(400, 16, generator=g).to(torch.float16)
    idx = INDEX_FACTORIES[kind](keys)
    q = torch.randn(10, 16, generator=g)
    path = tmp_path / "a.raidx"
    idx.save(path)
    idx2 = ra.load_index(path)
    assert type(idx2) is type(idx) and idx2.size == 400 and idx2.dtype == torch.float16
    a, b = idx.search(q, k=10), idx2.search(q, k=10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    data = path.read_bytes()
    for pos in (0, 20, len(data) // 2, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        (tmp_path / "bad").write_bytes(bytes(bad))
        with pytest.raises(RuntimeError, match="index file"):
            ra.load_index(tmp_path / "bad")
    (tmp_path / "short").write_bytes(data[:-9])
    with pytest.raises(RuntimeError, match="index file"):
        ra.load_index(tmp_path / "short")
    (tmp_path / "foreign").write_bytes(b"PK\x03\x04 definitely not an index" * 10)
    with pytest.raises(RuntimeError, match="bad magic"):
        ra.load_index(tmp_path / "foreign")
    with pytest.raises(FileNotFoundError):
        ra.load_index(tmp_path / "missing")


def test_failed_save_keeps_the_old_file(tmp_path):
    idx = ra.FlatIndex(torch.randn(10, 4))
    path = tmp_path / "idx"
    idx.save(path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        idx.save(tmp_path / "no_such_dir" / "idx")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp files left behind


@pytest.mark.parametrize(
    "keys,exc,match",
    [
        (torch.randn(10), ValueError, "keys must have shape"),
        (torch.zeros(0, 4), ValueError, "must not be empty"),
        (torch.randn(5, 4).int(), TypeError, "keys must have dtype"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN"),
        ([[1.0, 2.0]], TypeError, "torch.Tensor or numpy"),
    ],
)
def test_bad_keys(keys, exc, match):
    with pytest.raises(exc, match=match):
        ra.FlatIndex(keys)


def test_bad_search_and_add_arguments():
    idx = ra.FlatIndex(torch.randn(10, 4))
    with pytest.raises(ValueError, match="exceeds the number of indexed keys"):
        idx.search(torch.randn(2, 4), k=11)
    with pytest.raises(ValueError, match="k must be >= 1"):
        idx.search(torch.randn(2, 4), k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        idx.search(torch.randn(2, 4), k=2.5)
    with pytest.raises(ValueError, match="dim"):
        idx.search(torch.randn(2, 5), k=1)
    with pytest.raises(ValueError, match="NaN"):
        idx.search(torch.tensor([[float("inf"), 0, 0, 0]]), k=1)
    with pytest.raises(ValueError, match="ef must be >= 1"):
        idx.search(torch.randn(1, 4), k=1, ef=0)
    with pytest.raises(TypeError, match="dtype"):
        idx.add(torch.randn(3, 4).half())
    with pytest.raises(ValueError, match="dim"):
        idx.add(torch.randn(3, 5))
    assert idx.size == 10  # failed adds changed nothing
    with pytest.raises(TypeError, match="seeds must be int64"):
        idx.search(torch.randn(2, 4), k=1, seeds=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one row per query"):
        idx.search(torch.randn(2, 4), k=1, seeds=torch.zeros(3, 3, dtype=torch.int64))


def test_search_seeds_start_the_graph_search():
    """Seeds are extra starting points: seeded with the exact top-k, a beam of k keeps exactly them; seeds outside
    [0, size) are skipped (the search is then the unseeded one); the flat index ignores seeds."""
    g = torch.Generator().manual_seed(21)
    keys = torch.randn(4000, 24, generator=g)
    q = torch.randn(16, 24, generator=g) + 1.5
    idx = ra.QueryGuidedIndex(keys, torch.randn(400, 24, generator=g) + 1.5, degree=12, k_train=16)
    k = 10
    exact = torch.topk(q @ keys.T, k, dim=1).indices
    ids, _ = idx.search(q, k=k, ef=k, seeds=exact)
    assert torch.equal(ids.sort(1).values, exact.sort(1).values)
    plain, _ = idx.search(q, k=k, ef=k)
    plain_visited = idx.last_search_stats["visited"]
    skipped, _ = idx.search(q, k=k, ef=k, seeds=torch.tensor([-3, 4000, 10**9]))
    assert torch.equal(skipped, plain) and torch.equal(idx.last_search_stats["visited"], plain_visited)
    flat = ra.FlatIndex(keys)
    assert torch.equal(flat.search(q, k=k, seeds=exact[:, :2])[0], flat.search(q, k=k)[0])


@pytest.mark.parametrize("kind", list(INDEX_FACTORIES))
def test_concurrent_searches_match_sequential_and_release_the_gil(kind):
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(20000, 64, generator=g)
    idx = INDEX_FACTORIES[kind](keys)
    queries = [torch.randn(64, 64, generator=g) for _ in range(6)]
    expected = [idx.search(q, k=20, ef=64)[0] for q in queries]
    results = [None] * len(queries)
    ticks = []
    stop = threading.Event()

    def ticker():  # runs only if the searches release the GIL
        while not stop.is_set():
            ticks.append(1)
            stop.wait(0.001)

    def worker(i):
        for _ in range(3):
            results[i] = idx.search(queries[i], k=20, ef=64)[0]

    t = threading.Thread(target=ticker)
    t.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(queries))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stop.set()
    t.join()
    for r, e in zip(results, expected):
        assert torch.equal(r, e)
    assert len(ticks) > 1


@pytest.mark.parametrize("kind", list(INDEX_FACTORIES))
def test_add_while_searching_is_safe(kind):
    g = torch.Generator().manual_seed(5)
    idx = INDEX_FACTORIES[kind](torch.randn(2000, 16, generator=g))
    errors = []

    def searcher():
        try:
            for _ in range(20):
                ids, _ = idx.search(torch.randn(8, 16), k=10, ef=32)
                assert ((ids >= 0) & (ids < idx.size)).all()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for th in threads:
        th.start()
    for _ in range(10):
        idx.add(torch.randn(20, 16))
    for th in threads:
        th.join()
    assert not errors and idx.size == 2200


def test_exact_knn_matches_topk_per_head():
    """The bipartite kNN used for graph builds (GQA groups, query blocks) equals a per-head torch.topk."""
    from retrieval_attention.index import exact_knn

    g = torch.Generator().manual_seed(6)
    keys, queries = torch.randn(2, 300, 16, generator=g), torch.randn(6, 50, 16, generator=g)
    got = exact_knn(keys, queries, 7, max_block_bytes=6 * 300 * 4 * 8)  # forces several query blocks
    for h in range(6):
        ref = torch.topk(queries[h] @ keys[h // 3].T, 7, dim=1).indices
        assert torch.equal(got[h], ref)
    assert exact_knn(keys, queries, 1000).shape == (6, 50, 300)  # k clamped to n
    # many more columns than k: the topk runs over each row's k best chunks (n not a multiple of the chunk)
    keys, queries = torch.randn(2, 5000, 16, generator=g), torch.randn(4, 70, 16, generator=g)
    for chunk in (128, 64):
        got = exact_knn(keys, queries, 9, max_block_bytes=4 * 5000 * 4 * 16, chunk=chunk)
        for h in range(4):
            assert torch.equal(got[h], torch.topk(queries[h] @ keys[h // 2].T, 9, dim=1).indices)


def assert_nearest_lists(got, dist, k):
    """got (G, n, k) ids against float64 distances dist (G, n, c): rank by rank the same distances up to float32
    rounding, and the same ids but where two distances are float32 near-ties (which may swap)."""
    ref = dist.topk(k, largest=False)
    assert got.shape == ref.indices.shape
    assert torch.allclose(dist.gather(-1, got), ref.values, rtol=1e-6, atol=0)
    assert got.numel() == 0 or (got == ref.indices).double().mean() >= 0.999
    ordered = got.sort(-1).values
    assert not bool((ordered[..., 1:] == ordered[..., :-1]).any()), "repeated ids"


def test_exact_key_knn_matches_brute_force():
    """Each key's nearest other keys (L2, itself excluded; key blocks and chunk maxima) equal a brute-force topk, for n
    not a multiple of the chunk, several blocks, and k clamped to n - 1 (float32 near-ties may swap)."""
    from retrieval_attention.index import exact_key_knn

    g = torch.Generator().manual_seed(8)
    for groups, n, d, k in ((2, 1000, 16, 16), (1, 300, 8, 5), (3, 129, 4, 200), (1, 1, 4, 3)):
        keys = torch.randn(groups, n, d, generator=g)
        got = exact_key_knn(keys, k, max_block_bytes=1 << 16)
        dist = torch.cdist(keys.double(), keys.double())
        dist[:, torch.arange(n), torch.arange(n)] = float("inf")
        assert got.shape == (groups, n, min(k, n - 1))
        assert_nearest_lists(got, dist, min(k, n - 1))


def test_key_list_stages_torch_fallbacks_agree_with_the_ops():
    """The torch ops that stand in for the two key-list ops where the package has no CUDA kernels give what the ops
    give: the same candidate columns in the same order (distinct scores), and the same re-ranked lists up to float32
    near-ties of the norm against the sum of squares."""
    from retrieval_attention import index

    g = torch.Generator().manual_seed(19)
    scores = torch.randperm(3 * 40 * 64 * 30, generator=g).float().view(3, 40, 64 * 30)  # distinct values
    for chunk, kc, m in ((64, 4, 50), (32, 9, 288), (128, 1, 1)):
        assert torch.equal(index._chunk_candidates_torch(scores, chunk, kc, m), index._chunk_candidates(scores, chunk, kc, m))
    keys = torch.randn(2, 400, 24, generator=g)
    cand = torch.stack([torch.randperm(400, generator=g)[:48] for _ in range(2 * 100)]).view(2, 100, 48)
    cand[:, :, ::5] = -1
    ops_lists = index._nearest_candidates(keys, keys, 150, cand, 12)
    torch_lists = index._nearest_candidates_torch(keys, 150, cand, 12)
    dist = torch.cdist(keys[:, 150:250].double(), keys.double())
    assert torch.allclose(dist.gather(-1, ops_lists), dist.gather(-1, torch_lists), rtol=1e-6, atol=0)
    assert (ops_lists == torch_lists).double().mean() >= 0.999


def test_key_knn_among_every_sth_key():
    """column_stride s: each key's nearest other keys among keys 0, s, 2s, ... equal a brute-force topk over those
    columns (ids in the original numbering), for rows that are columns and rows that are not, several blocks, k
    clamped to the columns less one; a bad stride is a clear error."""
    from retrieval_attention.index import exact_key_knn

    g = torch.Generator().manual_seed(18)
    for groups, n, d, k, s in ((2, 1000, 16, 16, 2), (1, 301, 8, 5, 3), (3, 129, 4, 200, 2), (1, 5, 4, 3, 4)):
        keys = torch.randn(groups, n, d, generator=g)
        got = exact_key_knn(keys, k, max_block_bytes=1 << 16, column_stride=s)
        cols = torch.arange(0, n, s)
        dist = torch.cdist(keys.double(), keys[:, cols].double())
        dist[:, cols, torch.arange(len(cols))] = float("inf")  # a column row is not its own neighbour
        kk = min(k, len(cols) - 1)
        assert got.shape == (groups, n, kk)
        assert torch.equal(got, cols[dist.topk(kk, largest=False).indices])
    assert exact_key_knn(torch.randn(1, 2, 4), 16, column_stride=2).shape == (1, 2, 0)
    with pytest.raises(ValueError, match="column_stride"):
        exact_key_knn(torch.randn(1, 10, 4), 3, column_stride=0)


def test_exact_key_knn_large_and_small_norm_keys():
    """Keys with a large common offset, scaled far up or down (the candidate stage rescales them by a power of two):
    the lists' distances equal the brute-force k smallest, rank by rank (ids may swap only at float32 near-ties)."""
    from retrieval_attention.index import exact_key_knn

    g = torch.Generator().manual_seed(9)
    base = torch.randn(2, 700, 32, generator=g) + 4 * torch.randn(2, 1, 32, generator=g)
    for factor in (300.0, 1e-4):
        keys = base * factor
        got = exact_key_knn(keys, 16, max_block_bytes=1 << 18)
        dist = torch.cdist(keys.double(), keys.double())
        dist[:, torch.arange(700), torch.arange(700)] = float("inf")
        assert torch.allclose(dist.gather(-1, got), dist.topk(16, largest=False).values, rtol=1e-6, atol=0), factor


@pytest.mark.skipif(not hasattr(ra, "QueryGuidedIndex"), reason="no query_guided index")
def test_query_guided_build_knobs():
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(3000, 32, generator=g)
    train = torch.randn(600, 32, generator=g) * 2 + 1
    q = torch.randn(40, 32, generator=g) * 2 + 1
    truth = exact_topk(keys, q, 10).indices
    for kw in ({}, {"ef_weak": 64, "n_pivots": 1}, {"ef_weak": 4, "n_pivots": 8}):
        idx = ra.QueryGuidedIndex(keys, train, k_train=50, **kw)
        ids, _ = idx.search(q, k=10, ef=64)
        rec = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(ids, truth)])
        assert rec >= 0.9, (kw, rec)
    for bad in ({"ef_weak": 0}, {"n_pivots": 0}, {"n_pivots": 1000}):
        with pytest.raises(ValueError):
            ra.QueryGuidedIndex(keys, train, **bad)


def _layer_hash(keys, values, train, knn, params, sharing, projection=None):
    import hashlib
    import tempfile

    from retrieval_attention import _ext

    hq, hkv, d = train.shape[0], keys.shape[0], keys.shape[-1]
    layer = _ext._C.OffloadedLayer(keys.dtype, hq, hkv, d, values.shape[-1], "query_guided", params, 0, sharing)
    layer.build(keys, values, train, knn, projection=projection)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer.ra")
        layer.save(path)
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("sharing", ["per_query_head", "per_kv_head"])
@pytest.mark.parametrize("degree,n_pivots,k_train", [(12, 4, 20), (8, 2, 30)])
def test_projection_lists_give_the_cpu_builds_graph(sharing, degree, n_pivots, k_train):
    # small-integer keys and queries: every dot product and distance is exact in float32 whatever the summation order,
    # and they tie often, so the lists must match the CPU projection's tie-breaking too: the saved layers are identical
    from retrieval_attention.index import exact_knn, projection_lists

    g = torch.Generator().manual_seed(degree + k_train)
    hq, hkv, n, m, d = 4, 2, 700, 60, 16
    keys = torch.randint(-4, 5, (hkv, n, d), generator=g).to(torch.bfloat16)
    values = torch.randn(hkv, n, d, generator=g).to(torch.bfloat16)
    train = torch.randint(-4, 5, (hq, m, d), generator=g).float()
    knn = exact_knn(keys, train, k_train)
    knn[0, 3, :2] = -1  # a list with leading padding: its pivots start after it
    per_index = knn.reshape(hkv, -1, knn.shape[-1]) if sharing == "per_kv_head" else knn
    proj = projection_lists(keys, per_index, n_pivots, degree, max_pairs=5000)  # several blocks of key groups
    assert proj.shape == (per_index.shape[0], n, degree) and proj.dtype == torch.int32
    assert (proj[..., 0] >= 0).sum() > 100  # many pivots got lists
    params = {"degree": degree, "k_train": k_train, "n_pivots": n_pivots}
    assert _layer_hash(keys, values, train, knn, params, sharing, proj) == _layer_hash(keys, values, train, knn, params, sharing)


def test_projection_lists_are_checked():
    from retrieval_attention import _ext
    from retrieval_attention.index import exact_knn, projection_lists

    keys = torch.randint(-4, 5, (1, 200, 8)).to(torch.bfloat16)
    train = torch.randint(-4, 5, (2, 20, 8)).float()
    knn = exact_knn(keys, train, 10)
    proj = projection_lists(keys, knn, 4, 8)
    layer = lambda: _ext._C.OffloadedLayer(torch.bfloat16, 2, 1, 8, 8, "query_guided", {"degree": 8, "k_train": 10}, 0, "per_query_head")
    with pytest.raises(TypeError, match="int32"):
        layer().build(keys, keys, train, knn, projection=proj.long())
    with pytest.raises(ValueError, match="shape"):
        layer().build(keys, keys, train, knn, projection=proj[:1])
    with pytest.raises(ValueError, match="knn"):
        layer().build(keys, keys, train, None, projection=proj)
    for bad, what in ((200, "out of range"), (-3, "out of range"), ("self", "self-loop"), ("repeat", "repeated")):
        p = proj.clone()
        row = int((p[0, :, 1] >= 0).nonzero()[0])
        p[0, row, 0] = row if bad == "self" else p[0, row, 1] if bad == "repeat" else bad
        with pytest.raises(ValueError, match=what):
            layer().build(keys, keys, train, knn, projection=p)
    # the layer checks every list once for its builds (which then trust them), the kNN and key lists too
    for bad in (200, -2):
        k2 = knn.clone()
        k2[1, 7, 3] = bad
        with pytest.raises(ValueError, match=r"knn ids must be in \[-1, tokens\)"):
            layer().build(keys, keys, train, k2, projection=proj)
        key_lists = torch.zeros(1, 200, 4, dtype=torch.int64)
        key_lists[0, 150, 2] = bad
        with pytest.raises(ValueError, match=r"key_knn ids must be in \[-1, tokens\)"):
            layer().build(keys, keys, train, knn, key_knn=key_lists)
    # the op's own checks (CPU): segments and ids
    op = torch.ops.retrieval_attention.projection_prune
    one = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="out of range"):
        op(keys, 2, one, torch.tensor([1, 1]), one, torch.tensor([500]), torch.zeros(1), one, 8, 64)
    with pytest.raises(TypeError, match="float32"):
        op(keys, 2, one, torch.tensor([1, 1]), one, one, torch.zeros(1, dtype=torch.float64), one, 8, 64)


def test_projection_fits_bounds_memory_and_sort_keys():
    from retrieval_attention.index import PROJECTION_MAX_GROUP_PAIRS, projection_fits, projection_lists

    # 8B layer at 128K, per_kv_head, 2,048 training queries per head: 8 graphs of 8,192 pooled queries
    assert projection_fits((8, 130_432, 128), (8, 8_192, 100), 4)
    # every prompt query of a 128K prompt as a training query: the CPU builds project instead
    assert not projection_fits((8, 130_432, 128), (32, 130_432, 100), 4)
    assert (32 // 8) * 130_432 * 4 * 100 > PROJECTION_MAX_GROUP_PAIRS
    assert not projection_fits((64, 40_000_000, 8), (64, 1, 1), 1)  # 64 x 40M keys overflow the sort keys
    with pytest.raises(ValueError, match="overflow"):
        projection_lists(torch.zeros(1, 1, 1).expand(2, 1 << 31, 1), torch.zeros(2, 1, 1, dtype=torch.int64), 1, 4)


def test_key_index_build_takes_projection_lists():
    # the path ra.QueryGuidedIndex takes with CUDA tensors, here with lists made on the CPU: same saved index
    import hashlib
    import tempfile

    from retrieval_attention import _ext
    from retrieval_attention.index import exact_knn, projection_lists

    g = torch.Generator().manual_seed(5)
    keys = torch.randint(-4, 5, (900, 16), generator=g).to(torch.float16)
    train = torch.randint(-4, 5, (80, 16), generator=g).float()
    params = {"degree": 10, "k_train": 25}
    knn = exact_knn(keys[None], train[None], 25)
    proj = projection_lists(keys[None], knn, 4, 10)[0]

    def saved(**kw):
        idx = _ext._C.KeyIndex.build(keys, train, "query_guided", params, knn[0], None, **kw)
        with tempfile.TemporaryDirectory() as tmp:
            idx.save(os.path.join(tmp, "i.ra"))
            with open(os.path.join(tmp, "i.ra"), "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()

    assert saved(projection=proj) == saved()
    with pytest.raises(ValueError, match="one row per key"):
        _ext._C.KeyIndex.build(keys, train, "query_guided", params, knn[0], None, projection=proj[:5])
    with pytest.raises(ValueError, match="knn"):
        _ext._C.KeyIndex.build(keys, train, "query_guided", params, None, None, projection=proj)
    with pytest.raises(ValueError, match="self-loop"):
        bad = proj.clone()
        row = int((bad[:, 0] >= 0).nonzero()[0])
        bad[row, 0] = row
        _ext._C.KeyIndex.build(keys, train, "query_guided", params, knn[0], None, projection=bad)
