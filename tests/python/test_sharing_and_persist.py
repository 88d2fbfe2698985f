"""index_sharing="per_kv_head" (one graph per GQA group) and saving / loading a prefilled RetrievalCache."""
import json
import os
import shutil

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import retrieval_attention as ra

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024)


def tiny_model(seed=0, cls=(LlamaConfig, LlamaForCausalLM)):
    torch.manual_seed(seed)
    cfg = cls[0](**TINY)
    cfg._attn_implementation = "retrieval_attention"
    model = cls[1](cfg).eval()
    ra.enable(model, ra.RetrievalConfig(index="flat"))
    return model


def greedy(model, ids, cache, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


def prefill(model, ids, cfg):
    cache = ra.RetrievalCache(model.config, cfg)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return cache


# -- index sharing ---------------------------------------------------------------------------------------------------
def test_index_sharing_validation():
    with pytest.raises(ValueError, match="index_sharing"):
        ra.RetrievalConfig(index_sharing="per_layer")
    with pytest.raises(ValueError, match="index_sharing"):
        ra._ext._C.OffloadedLayer(torch.float32, 4, 2, 8, 8, "flat", {}, 0, "shared")
    assert ra.RetrievalConfig().index_sharing == "per_query_head"


def test_automatic_search_beam(tmp_path):
    """ef=None (the default): the beam grows with the layer's CPU keys; the cache searches with it; saved and loaded."""
    cfg = ra.RetrievalConfig()
    assert cfg.ef is None
    assert [cfg.search_beam(n) for n in (0, 16_384, 32_128, 65_000, 131_072, 10**7)] == [128, 128, 251, 507, 1024, 1024]
    assert ra.RetrievalConfig(ef=40).search_beam(10**6) == 40

    class NarrowBeam(ra.RetrievalConfig):  # the automatic rule, with a beam narrow enough to show in scanned_frac
        def search_beam(self, cpu_tokens):
            return 8 if self.ef is None else self.ef

    model = tiny_model(seed=3)
    doc = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(4))
    sparse = dict(n_sink=4, n_window=16, top_k=8, index="query_guided")
    scanned = {}
    for name, c in (("auto", NarrowBeam(**sparse)), ("ef8", ra.RetrievalConfig(**sparse, ef=8)),
                    ("ef64", ra.RetrievalConfig(**sparse, ef=64))):
        cache = prefill(model, doc, c)
        greedy(model, torch.cat([doc, doc[:, :5]], dim=1), cache, 3)
        scanned[name] = cache.summary()["scanned_frac"]
    assert scanned["auto"] == scanned["ef8"] < scanned["ef64"]
    cache = prefill(model, doc, ra.RetrievalConfig(**sparse))
    assert cache.summary()["search_beam"] == 128 and {s["search_beam"] for s in cache.stats()} == {128}
    assert prefill(model, doc, ra.RetrievalConfig(**dict(sparse, index="flat"))).summary()["search_beam"] is None
    cache.save(tmp_path / "auto")
    assert ra.RetrievalCache.load(tmp_path / "auto", model.config).retrieval_config.ef is None


@pytest.mark.parametrize("cls", [(LlamaConfig, LlamaForCausalLM), (Qwen2Config, Qwen2ForCausalLM)])
def test_per_kv_head_exactness_mode_equals_full_attention(cls):
    model = tiny_model(seed=3, cls=cls)
    ids = torch.randint(0, 97, (1, 120), generator=torch.Generator().manual_seed(4))
    full_seq, full_logits = greedy(model, ids, DynamicCache(), 40)
    cfg = ra.RetrievalConfig(n_sink=4, n_window=16, top_k=10_000, index="query_guided", ef=10_000, evict_chunk=4,
                             max_unindexed_tokens=8, index_sharing="per_kv_head")
    cache = ra.RetrievalCache(model.config, cfg)
    seq, logits = greedy(model, ids, cache, 40)
    assert torch.equal(seq, full_seq)
    assert (logits - full_logits).abs().max() / full_logits.abs().max() < 1e-4
    layer = cache.layers[0]
    assert layer.offloaded.index_count == 2 and layer.offloaded.sharing == "per_kv_head"  # one graph per kv head, not 4
    assert layer.cpu_tokens > 100  # decode-time evictions were inserted into the shared graphs too


def test_per_kv_head_batch_exactness():
    """A batch folds into the heads: each (batch row, kv head) gets its own shared graph."""
    model = tiny_model(seed=5)
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(6))
    full_seq, _ = greedy(model, ids, DynamicCache(), 15)
    cfg = ra.RetrievalConfig(n_sink=2, n_window=8, top_k=10_000, index="query_guided", ef=10_000, index_sharing="per_kv_head")
    cache = ra.RetrievalCache(model.config, cfg)
    seq, _ = greedy(model, ids, cache, 15)
    assert torch.equal(seq, full_seq)
    assert cache.layers[0].offloaded.index_count == 2 * 2


def _layer_problem(seed=0, n=3000, m=600, hq=6, hkv=2, d=32):
    """Out-of-distribution queries/keys with a shared group direction, as real GQA heads have."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(hkv, n, d, generator=g) + 2.0 * torch.randn(hkv, 1, d, generator=g)
    train = torch.randn(hq, m, d, generator=g) + 3.0 * torch.randn(hq, 1, d, generator=g)
    test = torch.randn(hq, 50, d, generator=g) + 3.0 * torch.randn(hq, 1, d, generator=g)
    test[:] = train[:, :50] + 0.3 * torch.randn(hq, 50, d, generator=g)
    return keys, train, test


def test_warm_start_seeds_every_query_of_a_call_from_the_previous_call():
    """Warm start: each head's search also starts from what it retrieved for its newest query at the previous call. All
    m queries of one call start from the same ids (none from another query of that call, whatever the threads do), so
    query j of a batch gets what a call with query j alone gets after the same previous call. It is off by default,
    and off means no dependence on earlier calls."""
    hq, hkv, d, k, ef = 6, 2, 32, 20, 24
    keys, train, test = _layer_problem(seed=5)
    layer = ra._ext._C.OffloadedLayer(torch.float32, hq, hkv, d, d, "query_guided", {}, 0, "per_query_head")
    layer.build(keys, keys.clone(), train)
    assert layer.warm_start is False
    first, batch = test[:, :1].contiguous(), test[:, 1:9].contiguous()
    cold = layer.retrieve_attend(batch, k, ef, 1.0, return_ids=True)[3]
    layer.retrieve_attend(first, k, ef, 1.0)
    assert torch.equal(layer.retrieve_attend(batch, k, ef, 1.0, return_ids=True)[3], cold)  # off: no history
    layer.warm_start = True
    layer.retrieve_attend(first, k, ef, 1.0)
    out, lse, vis, ids = layer.retrieve_attend(batch, k, ef, 1.0, return_ids=True)
    assert (vis > 0).all()
    for j in range(batch.shape[1]):
        layer.clear_warm_start()
        layer.retrieve_attend(first, k, ef, 1.0)
        _, _, vis_j, ids_j = layer.retrieve_attend(batch[:, j : j + 1].contiguous(), k, ef, 1.0, return_ids=True)
        assert torch.equal(ids_j[:, 0], ids[:, j]) and torch.equal(vis_j[:, 0], vis[:, j])
    # the seeds change where a search starts, not what counts: with the beam covering every key it stays exact
    layer.clear_warm_start()
    exact = torch.topk(torch.einsum("hmd,hnd->hmn", batch, keys.repeat_interleave(hq // hkv, 0)), k, dim=-1).indices
    layer.retrieve_attend(first, k, 10_000, 1.0)
    found = layer.retrieve_attend(batch, k, 10_000, 1.0, return_ids=True)[3]
    assert torch.equal(found.sort(-1).values, exact.sort(-1).values)


@pytest.mark.parametrize("sharing", ["per_query_head", "per_kv_head"])
def test_sparse_recall_against_exact_topk(sharing):
    hq, hkv, d, k = 6, 2, 32, 20
    keys, train, test = _layer_problem()
    layer = ra._ext._C.OffloadedLayer(torch.float32, hq, hkv, d, d, "query_guided", {}, 0, sharing)
    layer.build(keys, keys.clone(), train)
    assert layer.index_count == (hq if sharing == "per_query_head" else hkv)
    _, _, visited, ids = layer.retrieve_attend(test, k, 64, 1.0, return_ids=True)
    exact = torch.einsum("hmd,hnd->hmn", test, keys.repeat_interleave(hq // hkv, 0)).topk(k, dim=-1).indices
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids.reshape(-1, k), exact.reshape(-1, k)))
    recall = hits / exact.numel()
    assert recall > 0.85, f"{sharing}: recall@{k} {recall:.3f}"
    assert visited.double().mean() < 0.5 * keys.shape[1]


@pytest.mark.parametrize("sharing", ["per_query_head", "per_kv_head"])
def test_weak_keys_linked_from_given_key_lists(sharing):
    """build(..., key_knn=each key's nearest keys): the graphs link their weak keys from the lists instead of searching,
    with the recall of the searched build (both measured against the exact top-k), every key reachable; bad lists are
    clear errors and leave the layer empty."""
    from retrieval_attention.index import exact_key_knn, exact_knn

    hq, hkv, d, k = 6, 2, 32, 20
    keys, train, test = _layer_problem(seed=3, n=4000, m=200)
    knn = exact_knn(keys, train, 100)
    lists = exact_key_knn(keys, 16)
    exact = torch.einsum("hmd,hnd->hmn", test, keys.repeat_interleave(hq // hkv, 0)).topk(k, dim=-1).indices
    recalls = {}
    for name, key_knn in (("search", None), ("lists", lists)):
        layer = ra._ext._C.OffloadedLayer(torch.float32, hq, hkv, d, d, "query_guided", {}, 0, sharing)
        layer.build(keys, keys.clone(), train, knn, key_knn=key_knn)
        _, _, visited, ids = layer.retrieve_attend(test, k, 64, 1.0, return_ids=True)
        hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids.reshape(-1, k), exact.reshape(-1, k)))
        recalls[name] = hits / exact.numel()
        assert visited.double().mean() < 0.5 * keys.shape[1]
    assert recalls["lists"] > 0.85 and recalls["lists"] > recalls["search"] - 0.03, recalls
    bad_cases = (
        (lists.int(), TypeError, "int64"),
        (lists[:1], ValueError, "key_knn shape"),
        (lists[:, :, :0], ValueError, "key_knn shape"),
        (torch.full_like(lists, 4000), ValueError, "key_knn ids"),
    )
    for bad, err, msg in bad_cases:
        layer = ra._ext._C.OffloadedLayer(torch.float32, hq, hkv, d, d, "query_guided", {}, 0, sharing)
        with pytest.raises(err, match=msg):
            layer.build(keys, keys.clone(), train, knn, key_knn=bad)
        assert layer.size == 0


def test_key_lists_of_a_pending_build_with_rows_appended_since():
    """Rows appended between build(..., index_now=False, key_knn=...) and build_indexes() have no key lists: the graphs
    then search for their weak keys as without lists, and every row, old or appended, is retrievable."""
    from retrieval_attention.index import exact_key_knn, exact_knn

    hq, hkv, d = 4, 2, 16
    keys, train, _ = _layer_problem(seed=9, n=3000, m=200, hq=hq, hkv=hkv, d=d)
    extra = torch.randn(hkv, 100, d, generator=torch.Generator().manual_seed(10)) * 4
    layer = ra._ext._C.OffloadedLayer(torch.float32, hq, hkv, d, d, "query_guided", {}, 0, "per_kv_head")
    layer.build(keys, keys.clone(), train, exact_knn(keys, train, 100), index_now=False, key_knn=exact_key_knn(keys, 16))
    layer.append(extra, extra.clone())
    layer.build_indexes()
    assert layer.size == 3100 and not layer.build_pending
    # each appended key, as a query scaled up, is its own best match (norms of 4x the others)
    q = extra.repeat_interleave(hq // hkv, 0)[:, :20] * 3
    _, _, _, ids = layer.retrieve_attend(q, 1, 64, 1.0, return_ids=True)
    assert (ids[..., 0] == torch.arange(3000, 3020)).float().mean() > 0.9


def test_key_index_build_takes_key_lists():
    """KeyIndex.build(..., key_knn) (the bipartite kNN computed by the index): the graph answers queries like the
    searched build does (recall@10 against the exact top-10); lists for another type or of the wrong shape are clear
    errors."""
    from retrieval_attention.index import exact_key_knn

    g = torch.Generator().manual_seed(4)
    keys = torch.randn(3000, 16, generator=g)
    train = torch.randn(300, 16, generator=g) + 2.0
    test = train[:100] + 0.3 * torch.randn(100, 16, generator=g)
    exact = (test @ keys.T).topk(10, dim=1).indices
    lists = exact_key_knn(keys.unsqueeze(0), 16)[0]
    recalls = []
    for key_knn in (None, lists):
        handle = ra._ext._C.KeyIndex.build(keys, train, "query_guided", {}, None, key_knn)
        ids, _, _ = handle.search(test, 10, 32)
        recalls.append(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, exact)) / exact.numel())
    assert recalls[1] > 0.9 and recalls[1] > recalls[0] - 0.03, recalls
    with pytest.raises(ValueError, match="query_guided"):
        ra._ext._C.KeyIndex.build(keys, None, "flat", {}, None, lists)
    with pytest.raises(ValueError, match="one row per key"):
        ra._ext._C.KeyIndex.build(keys, train, "query_guided", {}, None, lists[:10])
    with pytest.raises(ValueError, match="out of range"):
        ra._ext._C.KeyIndex.build(keys, train, "query_guided", {}, None, torch.full_like(lists, -5))


def _decode_step_problem(device, q_dtype, batch=1):
    hq, hkv, d, n_static = 6, 2, 32, 40
    keys, train, test = _layer_problem()
    layer = ra._ext._C.OffloadedLayer(torch.bfloat16, hq * batch, hkv * batch, d, d, "query_guided", {}, 0, "per_kv_head")
    layer.build(keys.bfloat16().repeat(batch, 1, 1), keys.bfloat16().repeat(batch, 1, 1), train.repeat(batch, 1, 1))
    g = torch.Generator().manual_seed(5)
    skeys = torch.randn(hkv * batch, n_static, d, generator=g).to(device, torch.bfloat16)
    svalues = torch.randn(hkv * batch, n_static, d, generator=g).to(device, torch.bfloat16)
    query = test[:, :3].repeat(batch, 1, 1).reshape(batch, hq, 3, d).to(device, q_dtype)
    return layer, skeys, svalues, query


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_decode_step_equals_its_parts(device, q_dtype):
    """OffloadedLayer.decode_step (decode_attention's one call: query copy, static attention, CPU search and attention,
    results copy, merge) gives what its parts give one op at a time, bit for bit, on the CPU and on a GPU; bad
    arguments are clear errors."""
    layer, skeys, svalues, query = _decode_step_problem(device, q_dtype, batch=2)
    B, H, m, d = query.shape
    k, ef, scale = 20, 64, 0.25
    q = query.reshape(B * H, m, d)
    out_s, lse_s = ra.ops.dense_attention(q, skeys, svalues, scale, causal=True)
    out_c, lse_c, visited = layer.retrieve_attend(q.cpu().float(), k, ef, scale)
    merged, _ = ra.ops.merge_attention(out_s, lse_s, out_c.to(device), lse_c.to(device))
    want = merged.reshape(B, H, m, d).transpose(1, 2).to(q_dtype)
    for _ in range(2):  # the second call reuses the kept page-locked buffers on a GPU
        out, lse_static, lse_c_host, q_host, total = layer.decode_step(query, skeys, svalues, scale, k, ef)
        assert out.dtype == q_dtype and out.device == query.device and out.shape == (B, m, H, d)
        assert torch.equal(out, want)
        assert torch.equal(lse_static, lse_s) and lse_c_host.device.type == "cpu" and torch.equal(lse_c_host, lse_c)
        assert torch.equal(q_host, q.cpu()) and total == int(visited.sum())
    # the caller's own static part (left-padded batches) is merged as given
    out2 = layer.decode_step(query, skeys, svalues, scale, k, ef, out_s, lse_s)[0]
    assert torch.equal(out2, want)
    with pytest.raises(ValueError, match="query shape"):
        layer.decode_step(query[..., :-1], skeys, svalues, scale, k, ef)
    with pytest.raises(ValueError, match="static keys/values shapes"):
        layer.decode_step(query, skeys[:1], svalues[:1], scale, k, ef)
    with pytest.raises(ValueError, match="go together"):
        layer.decode_step(query, skeys, svalues, scale, k, ef, static_out=out_s)
    with pytest.raises(ValueError, match="top_k"):
        layer.decode_step(query, skeys, svalues, scale, 0, ef)
    with pytest.raises(ValueError, match="query"):
        layer.decode_step(q, skeys, svalues, scale, k, ef)  # 3 dims


@pytest.mark.parametrize("tail", [100, 400])
def test_unindexed_rows_are_scanned_exactly_short_or_long(tail):
    """Rows appended since the last index insert are scored exactly: a short tail (<= 256 rows) inside each search
    item, a long one by the scan over the threads. Either way, with a beam as wide as the store, the ids are the exact
    top-k over all rows."""
    hq, hkv, d, k = 6, 2, 32, 20
    keys, train, test = _layer_problem(n=1500)
    layer = ra._ext._C.OffloadedLayer(torch.float32, hq, hkv, d, d, "query_guided", {}, 4096, "per_query_head")
    layer.build(keys[:, :1000].contiguous(), keys[:, :1000].contiguous(), train)
    extra = keys[:, 1000 : 1000 + tail].contiguous()
    layer.append(extra, extra.clone())
    all_keys = keys[:, : 1000 + tail]
    q = test[:, :4].contiguous()
    _, _, visited, ids = layer.retrieve_attend(q, k, 4096, 0.25, return_ids=True)
    scores = torch.einsum("hmd,hnd->hmn", q, all_keys.repeat_interleave(hq // hkv, dim=0))
    want = scores.topk(k, dim=-1).indices
    assert (want >= 1000).any()  # the tail holds some of the exact top-k: the test sees a tail that went unscanned
    assert torch.equal(ids.sort(dim=-1).values, want.sort(dim=-1).values)
    assert (visited >= tail).all()  # the tail's rows are all scored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_step_on_changing_streams():
    """decode_step on a GPU keeps two page-locked buffers across steps; steps on alternating CUDA streams (a caller that
    switches streams) still give what one stream gives."""
    layer, skeys, svalues, query = _decode_step_problem("cuda", torch.bfloat16, batch=2)
    queries = [query.roll(i, dims=1) for i in range(12)]  # a different query each step: a stale buffer would show
    want = [layer.decode_step(q, skeys, svalues, 0.25, 20, 64)[0].clone() for q in queries]
    streams = [torch.cuda.Stream(), torch.cuda.current_stream(), torch.cuda.Stream()]
    outs = []
    for i, q in enumerate(queries):
        with torch.cuda.stream(streams[i % 3]):
            outs.append(layer.decode_step(q, skeys, svalues, 0.25, 20, 64)[0])
    torch.cuda.synchronize()
    assert all(torch.equal(o, w) for o, w in zip(outs, want))
    assert not torch.equal(want[0], want[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_hook_path_on_changing_streams():
    """The cpu_retrieve_attend hook path reuses one page-locked results buffer per layer. Steps on alternating CUDA
    streams give what one stream gives, also when a step's results copy is held back on its stream (a GPU sleep queued
    by the hook before the copy) while the next step, on another stream, writes the buffer again."""

    class SlowCopyHook(ra.RetrievalLayer):
        def cpu_retrieve_attend(self, q_cpu, scaling):
            torch.cuda._sleep(20_000_000)  # about 10 ms of GPU time ahead of this step's results copy
            return super().cpu_retrieve_attend(q_cpu, scaling)

    model = tiny_model(seed=11).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 97, (1, 140), generator=torch.Generator().manual_seed(12)).to("cuda")
    queries = torch.randn(12, 1, TINY["num_attention_heads"], 1, TINY["hidden_size"] // TINY["num_attention_heads"],
                          generator=torch.Generator().manual_seed(13)).to("cuda", torch.bfloat16)

    def steps(streams):
        cache = prefill(model, ids, ra.RetrievalConfig(**SPARSE))
        layer = SlowCopyHook.__new__(SlowCopyHook)
        layer.__dict__.update(cache.layers[0].__dict__)  # the prefilled layer, decoding through the hook
        assert layer.cpu_tokens > 0
        torch.cuda.synchronize()
        outs = []
        for i, q in enumerate(queries):
            with torch.cuda.stream(streams[i % len(streams)]):
                outs.append(layer.decode_attention(q, 0.25))
        torch.cuda.synchronize()
        return torch.stack(outs)

    want = steps([torch.cuda.current_stream()])
    got = steps([torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()])
    assert torch.equal(got, want)


def test_decode_step_timing():
    """timing is set to the CPU part's search and attention thread time and its start and end on the clock of
    time.perf_counter_ns (benchmarks time the fused call inside the step with it); the results are the same with and
    without it, and a bad accumulator is a clear error."""
    import time

    layer, skeys, svalues, query = _decode_step_problem("cpu", torch.float32)
    plain = layer.decode_step(query, skeys, svalues, 0.25, 20, 64)[0]
    ns = torch.zeros(4, dtype=torch.int64)
    before = time.perf_counter_ns()
    timed = layer.decode_step(query, skeys, svalues, 0.25, 20, 64, timing=ns)[0]
    after = time.perf_counter_ns()
    assert torch.equal(plain, timed)
    first = ns.clone()
    assert first[0] > 0 and first[1] > 0
    assert before <= first[2] <= first[3] <= after
    ns[:2] = 10**15
    layer.decode_step(query, skeys, svalues, 0.25, 20, 64, timing=ns)  # set, not added to: no reset between calls
    assert (ns[:2] > 0).all() and (ns[:2] < 10**15).all() and ns[2] >= first[3]
    for bad, err in ((torch.zeros(4, dtype=torch.int32), TypeError), (torch.zeros(3, dtype=torch.int64), ValueError),
                     (torch.zeros(8, dtype=torch.int64)[::2], ValueError)):
        with pytest.raises(err):
            layer.decode_step(query, skeys, svalues, 0.25, 20, 64, timing=bad)


def test_builtin_retrieval_equals_the_hook_path(device):
    """decode_attention's built-in retrieval (OffloadedLayer.decode_step) and the cpu_retrieve_attend hook that research
    subclasses override give the same tokens and logits, mass probes included."""

    class ThroughHook(ra.RetrievalLayer):
        def cpu_retrieve_attend(self, q_cpu, scaling):
            return super().cpu_retrieve_attend(q_cpu, scaling)

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_model(seed=11).to(device, dtype)
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(0, 97, (1, 140), generator=g).to(device)
    cfg = ra.RetrievalConfig(**SPARSE, mass_probe_every=3)
    runs = []
    for layer_class in (ra.RetrievalLayer, ThroughHook):
        cache = ra.RetrievalCache(model.config, cfg, layer_class=layer_class)
        runs.append(greedy(model, ids, cache, 20) + (cache.summary(),))
    (a_seq, a_logits, a_sum), (b_seq, b_logits, b_sum) = runs
    assert torch.equal(a_seq, b_seq) and torch.equal(a_logits, b_logits)
    for key in ("scanned_frac", "recovered_mass_mean", "recovered_mass_min", "cpu_mass_share"):
        assert a_sum[key] == b_sum[key], key
    assert a_sum["recovered_mass_mean"] is not None


def test_per_kv_head_builds_one_index_per_group():
    """Hq/Hkv times fewer graphs and graph bytes. (Build time is measured, not asserted: README "Index sharing".)"""
    hq, hkv, d = 6, 2, 32
    keys, train, _ = _layer_problem(seed=1, n=2000, m=200)
    made = {}
    for sharing in ("per_query_head", "per_kv_head"):
        layer = ra._ext._C.OffloadedLayer(torch.float32, hq, hkv, d, d, "query_guided", {}, 0, sharing)
        assert layer.index_count == 0  # nothing built before the first tokens
        layer.build(keys, keys.clone(), train)
        made[sharing] = (layer.index_count, layer.index_bytes)
    assert made["per_query_head"][0] == 6 and made["per_kv_head"][0] == 2
    assert made["per_kv_head"][1] * 2 < made["per_query_head"][1]


def test_per_kv_head_pending_training_queries_build_on_first_append():
    """No CPU tokens at prefill (short prompt): the pooled training queries wait for the first evicted tokens."""
    hq, hkv, d = 4, 2, 8
    layer = ra._ext._C.OffloadedLayer(torch.float32, hq, hkv, d, d, "query_guided", {}, 0, "per_kv_head")
    layer.build(torch.zeros(hkv, 0, d), torch.zeros(hkv, 0, d), torch.randn(hq, 10, d))
    assert layer.index_count == 0
    keys = torch.randn(hkv, 30, d)
    layer.append(keys, keys.clone())
    assert layer.index_count == 2 and layer.size == 30
    _, _, _, ids = layer.retrieve_attend(torch.randn(hq, 2, d), 30, 64, 1.0, return_ids=True)
    assert all(sorted(r.tolist()) == list(range(30)) for r in ids.reshape(-1, 30))  # exactness mode: every key


# -- save / load -----------------------------------------------------------------------------------------------------
SPARSE = dict(n_sink=4, n_window=16, top_k=8, index="query_guided", ef=16, evict_chunk=4, max_unindexed_tokens=6)


@pytest.mark.parametrize("sharing", ["per_query_head", "per_kv_head"])
def test_round_trip_generates_the_same_tokens(tmp_path, sharing):
    """Sparse mode (top_k far below the CPU tokens): the loaded cache retrieves exactly what the original does."""
    model = tiny_model(seed=7)
    g = torch.Generator().manual_seed(8)
    doc, question = torch.randint(0, 97, (1, 150), generator=g), torch.randint(0, 97, (1, 9), generator=g)
    cfg = ra.RetrievalConfig(**SPARSE, index_sharing=sharing)
    cache = prefill(model, doc, cfg)
    cache.save(tmp_path / "doc")
    loaded = ra.RetrievalCache.load(tmp_path / "doc", model.config)
    assert loaded.retrieval_config == cfg and loaded.get_seq_length() == 150
    assert [s["cpu_tokens"] for s in loaded.stats()] == [s["cpu_tokens"] for s in cache.stats()]
    full_input = torch.cat([doc, question], dim=1)
    a_seq, a_logits = greedy(model, full_input, cache, 30)
    b_seq, b_logits = greedy(model, full_input, loaded, 30)
    assert torch.equal(a_seq, b_seq)
    assert torch.equal(a_logits, b_logits)
    # the original cache went on (evictions, inserts); the saved copy on disk did not change: load again, same answer
    c_seq, _ = greedy(model, full_input, ra.RetrievalCache.load(tmp_path / "doc", model.config), 30)
    assert torch.equal(c_seq, a_seq)


def test_loaded_cache_in_exactness_mode_equals_full_attention(tmp_path):
    model = tiny_model(seed=9)
    g = torch.Generator().manual_seed(10)
    doc, question = torch.randint(0, 97, (1, 130), generator=g), torch.randint(0, 97, (1, 7), generator=g)
    cfg = ra.RetrievalConfig(n_sink=4, n_window=16, top_k=10_000, index="query_guided", ef=10_000, evict_chunk=4, max_unindexed_tokens=5)
    prefill(model, doc, cfg).save(tmp_path / "c")
    full_input = torch.cat([doc, question], dim=1)
    full_seq, full_logits = greedy(model, full_input, DynamicCache(), 40)
    seq, logits = greedy(model, full_input, ra.RetrievalCache.load(tmp_path / "c", model.config), 40)
    assert torch.equal(seq, full_seq)
    assert (logits - full_logits).abs().max() / full_logits.abs().max() < 1e-4


def test_left_padded_batch_round_trip(tmp_path):
    model = tiny_model(seed=11)
    ids = torch.randint(1, 97, (2, 90), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(ids)
    ids[0, :40], mask[0, :40] = 0, 0
    cfg = ra.RetrievalConfig(n_sink=4, n_window=8, top_k=6, index="query_guided", ef=16)
    cache = ra.RetrievalCache(model.config, cfg)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    cache.save(tmp_path / "b")
    loaded = ra.RetrievalCache.load(tmp_path / "b", model.config)
    assert torch.equal(loaded.layers[0].cpu_pad, cache.layers[0].cpu_pad)
    nxt = torch.randint(1, 97, (2, 3), generator=torch.Generator().manual_seed(13))
    m2 = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    with torch.no_grad():
        a = model(nxt, attention_mask=m2, past_key_values=cache).logits
        b = model(nxt, attention_mask=m2, past_key_values=loaded).logits
    assert torch.equal(a, b)


@pytest.fixture
def saved(tmp_path):
    model = tiny_model(seed=14)
    cache = prefill(model, torch.randint(0, 97, (1, 80), generator=torch.Generator().manual_seed(15)), ra.RetrievalConfig(**SPARSE))
    cache.save(tmp_path / "s")
    return model, tmp_path / "s"


def test_missing_files_raise(saved, tmp_path):
    model, path = saved
    with pytest.raises(FileNotFoundError, match="no saved RetrievalCache"):
        ra.RetrievalCache.load(tmp_path / "nothing", model.config)
    os.remove(path / "layer001.cpu")
    with pytest.raises(FileNotFoundError, match="layer001.cpu is missing"):
        ra.RetrievalCache.load(path, model.config)


@pytest.mark.parametrize("name", ["layer000.cpu", "layer001.static.pt"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_or_truncated_file_raises(saved, name, damage):
    model, path = saved
    f = path / name
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) - 100]
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{name} is corrupt or truncated"):
        ra.RetrievalCache.load(path, model.config)


def test_corrupt_layer_file_is_caught_by_its_own_checksum_too(saved):
    """Even with the manifest's SHA-256 updated, the C++ file format's own checks reject a damaged CPU part."""
    import hashlib

    model, path = saved
    f = path / "layer000.cpu"
    data = bytearray(f.read_bytes())
    data[200] ^= 0x01
    f.write_bytes(bytes(data))
    outer = json.loads((path / "manifest.json").read_text())
    outer["manifest"]["layers"][0]["cpu_sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    outer["sha256"] = hashlib.sha256(json.dumps(outer["manifest"], indent=1, sort_keys=True).encode()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(outer))
    with pytest.raises(ValueError, match="checksum mismatch"):
        ra.RetrievalCache.load(path, model.config)


def test_corrupt_manifest_raises(saved):
    model, path = saved
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text.replace('"seen_tokens": 80', '"seen_tokens": 81'))
    with pytest.raises(ValueError, match="manifest.*checksum mismatch"):
        ra.RetrievalCache.load(path, model.config)
    (path / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="corrupt manifest"):
        ra.RetrievalCache.load(path, model.config)


def test_config_and_model_mismatch_raise(saved):
    model, path = saved
    other = dict(SPARSE, n_window=32)
    with pytest.raises(ValueError, match="different RetrievalConfig: n_window"):
        ra.RetrievalCache.load(path, model.config, ra.RetrievalConfig(**other))
    with pytest.raises(ValueError, match="index_sharing"):
        ra.RetrievalCache.load(path, model.config, ra.RetrievalConfig(**SPARSE, index_sharing="per_kv_head"))
    # search-time settings may change: a wider top_k over the same saved state
    wider = ra.RetrievalCache.load(path, model.config, ra.RetrievalConfig(**dict(SPARSE, top_k=10_000, ef=64)))
    assert wider.retrieval_config.top_k == 10_000
    with pytest.raises(TypeError, match="retrieval_config"):
        ra.RetrievalCache.load(path, model.config, {"top_k": 3})
    bigger = LlamaConfig(**dict(TINY, num_key_value_heads=4))
    with pytest.raises(ValueError, match="attention shape"):
        ra.RetrievalCache.load(path, bigger)
    deeper = LlamaConfig(**dict(TINY, num_hidden_layers=3))
    with pytest.raises(ValueError, match="attention shape"):
        ra.RetrievalCache.load(path, deeper)


def test_save_refuses_unprefilled_cache_and_foreign_paths(tmp_path, saved):
    model, path = saved
    with pytest.raises(RuntimeError, match="after prefill"):
        ra.RetrievalCache(model.config, ra.RetrievalConfig(**SPARSE)).save(tmp_path / "empty")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cache = ra.RetrievalCache.load(path, model.config)
    with pytest.raises(FileExistsError, match="not a saved RetrievalCache"):
        cache.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    cache.save(path)  # replacing a saved cache is fine, and leaves no temporary directories behind
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    ra.RetrievalCache.load(path, model.config)


def test_offloaded_layer_file_checks_shape_and_dtype(tmp_path):
    keys = torch.randn(2, 50, 8)
    layer = ra._ext._C.OffloadedLayer(torch.float32, 4, 2, 8, 8, "query_guided", {}, 100, "per_kv_head")
    layer.build(keys, keys.clone(), torch.randn(4, 20, 8))
    layer.append(torch.randn(2, 5, 8), torch.randn(2, 5, 8))  # an exactly-scanned, not yet indexed tail
    f = str(tmp_path / "l.cpu")
    layer.save(f)
    C = ra._ext._C.OffloadedLayer
    back = C.load(f, torch.float32, 4, 2, 8, 8, "query_guided", {}, 100, "per_kv_head")
    q = torch.randn(4, 3, 8)
    for x, y in zip(layer.retrieve_attend(q, 10, 32, 0.3, True), back.retrieve_attend(q, 10, 32, 0.3, True)):
        assert torch.equal(x, y)
    with pytest.raises(RuntimeError, match="differs from this layer"):
        C.load(f, torch.float32, 4, 1, 8, 8, "query_guided", {}, 100, "per_kv_head")
    with pytest.raises(RuntimeError, match="sharing"):
        C.load(f, torch.float32, 4, 2, 8, 8, "query_guided", {}, 100, "per_query_head")
    with pytest.raises(RuntimeError, match="stores"):
        C.load(f, torch.float16, 4, 2, 8, 8, "query_guided", {}, 100, "per_kv_head")
    with pytest.raises(RuntimeError, match="cannot open"):
        C.load(str(tmp_path / "none"), torch.float32, 4, 2, 8, 8, "query_guided", {}, 100, "per_kv_head")


@pytest.mark.parametrize("sharing", ["per_query_head", "per_kv_head"])
def test_precomputed_knn_builds_the_same_graphs(sharing):
    """The GPU path hands the C++ build the training queries' exact neighbour lists (ra.index.exact_knn, per query
    head); with per_kv_head the layer pools a group's lists. Given the same lists the build computes itself, the graphs
    (hence every search) are identical."""
    from retrieval_attention import _ext
    from retrieval_attention.index import exact_knn

    torch.manual_seed(0)
    hq, hkv, d, n, m = 4, 2, 16, 400, 60
    keys, values = torch.randn(hkv, n, d), torch.randn(hkv, n, d)
    train = torch.randn(hq, m, d) + 0.5
    layers = []
    for knn in (None, exact_knn(keys, train, 32)):
        layer = _ext._C.OffloadedLayer(torch.float32, hq, hkv, d, d, "query_guided", {"k_train": 32}, 0, sharing)
        layer.build(keys, values, train, knn)
        layers.append(layer)
    q = torch.randn(hq, 5, d)
    a = layers[0].retrieve_attend(q, 10, 32, d ** -0.5, return_ids=True)
    b = layers[1].retrieve_attend(q, 10, 32, d ** -0.5, return_ids=True)
    assert torch.equal(a[-1], b[-1])
    assert torch.equal(a[0], b[0])


# -- decoding while the indexes build ---------------------------------------------------------------------------------
def _exact_topk_ids(keys, q, hq, k):
    group = hq // keys.shape[0]
    scores = torch.einsum("hmd,hnd->hmn", q.double(), keys.repeat_interleave(group, 0).double())
    return scores.topk(k, dim=-1).indices


@pytest.mark.parametrize("sharing", ["per_query_head", "per_kv_head"])
def test_rows_stored_without_indexes_are_searched_exactly(tmp_path, sharing):
    """build(..., index_now=False): every row answers by exact scan (the exact top-k, all rows scored); save waits for
    the indexes (clear error); build_indexes() then installs them and searches use the graphs."""
    hq, hkv, d, k = 6, 2, 32, 20
    keys, train, test = _layer_problem(seed=5, n=3000, m=600, hq=hq, hkv=hkv, d=d)
    values = torch.randn(keys.shape, generator=torch.Generator().manual_seed(6))
    layer = ra._ext._C.OffloadedLayer(torch.float32, hq, hkv, d, d, "query_guided", {}, 0, sharing)
    layer.build(keys, values, train, index_now=False)
    assert layer.build_pending and layer.index_count == 0 and layer.size == 3000
    _, _, visited, ids = layer.retrieve_attend(test, k, 64, 1.0, return_ids=True)
    assert bool((visited == 3000).all())
    exact = _exact_topk_ids(keys, test, hq, k)
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(ids.reshape(-1, k), exact.reshape(-1, k)))
    with pytest.raises(ValueError, match="not built yet"):
        layer.save(str(tmp_path / "pending.bin"))
    assert not (tmp_path / "pending.bin").exists()
    layer.build_indexes()
    assert not layer.build_pending and layer.index_count == (hq if sharing == "per_query_head" else hkv)
    _, _, visited, _ = layer.retrieve_attend(test, k, 64, 1.0, return_ids=True)
    assert float(visited.double().mean()) < 3000  # the graphs answer now
    layer.build_indexes()  # nothing pending: no-op
    layer.save(str(tmp_path / "built.bin"))


def test_searches_run_while_the_indexes_build():
    """retrieve_attend from this thread while build_indexes runs in another (both release the GIL): every answer is a
    valid exact-or-graph result, and rows appended after the build are searchable."""
    import threading

    hq, hkv, d, k = 6, 2, 32, 10
    keys, train, test = _layer_problem(seed=7, n=6000, m=3000, hq=hq, hkv=hkv, d=d)
    layer = ra._ext._C.OffloadedLayer(torch.float32, hq, hkv, d, d, "query_guided", {}, 0)
    layer.build(keys, keys.clone(), train, index_now=False)
    worker = threading.Thread(target=layer.build_indexes)
    worker.start()
    answers = 0
    while worker.is_alive() or answers == 0:
        out, lse, visited, ids = layer.retrieve_attend(test[:, :4], k, 32, 1.0, return_ids=True)
        assert bool(torch.isfinite(lse).all()) and bool(((ids >= 0) & (ids < 6000)).all())
        answers += 1
    worker.join()
    assert not layer.build_pending and layer.index_count == hq
    new = torch.randn(hkv, 5, d) * 10
    layer.append(new, new.clone())
    assert layer.size == 6005


def test_decoding_does_not_wait_for_the_index_build(device):
    """decode_during_build=True and a background build held back after the rows are stored: generate still runs (exact scans of every CPU row,
    the window growing instead of evicting) and matches exact top-k (flat) retrieval; once the build is let go, the
    window shrinks back and the graphs answer."""
    import threading

    gate = threading.Event()

    class HeldBack(ra.RetrievalLayer):
        def _make_indexes(self):
            assert gate.wait(120)
            super()._make_indexes()

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_model(seed=13).to(device, dtype)
    g = torch.Generator().manual_seed(14)
    ids = torch.randint(0, 97, (1, 160), generator=g).to(device)
    sparse = dict(SPARSE, top_k=6)
    cache = ra.RetrievalCache(model.config, ra.RetrievalConfig(**sparse, async_build=True, decode_during_build=True), layer_class=HeldBack)
    try:
        seq, logits = greedy(model, ids, cache, 12)
        assert all(layer.building for layer in cache.layers)
        assert cache.summary()["index_building_layers"] == len(cache.layers)
        stats_cpu = [layer.offloaded.size for layer in cache.layers]
        assert all(layer.static_tokens > sparse["n_sink"] + sparse["n_window"] + sparse["evict_chunk"] for layer in cache.layers)
        assert all(layer.visited_sum == layer.cpu_candidates_sum for layer in cache.layers)  # every CPU row scored
    finally:
        gate.set()
    # until the first eviction would be due (evict_chunk steps) both hold the same static set: the exact scans of the
    # unindexed rows retrieve what a flat (exact top-k) index does; later the held-back window attends more tokens
    flat_seq, flat_logits = greedy(model, ids, ra.RetrievalCache(model.config, ra.RetrievalConfig(**dict(sparse, index="flat"))), 12)
    same = sparse["evict_chunk"]
    assert torch.equal(seq[:, : ids.shape[1] + same], flat_seq[:, : ids.shape[1] + same])
    tol = 2e-2 if device == "cuda" else 1e-4
    torch.testing.assert_close(logits[:same], flat_logits[:same], rtol=tol, atol=tol)
    assert bool(torch.isfinite(logits).all())
    cache.wait_for_indexes()
    assert cache.summary()["index_building_layers"] == 0
    assert all(not layer.building for layer in cache.layers) and all(s["cpu_tokens"] == n for s, n in zip(cache.stats(), stats_cpu))
    longer = torch.cat([seq, torch.randint(0, 97, (1, 3), generator=g).to(device)], dim=1)
    greedy(model, longer, cache, 2)  # the deferred tokens move to the CPU now
    assert all(layer.static_tokens <= sparse["n_sink"] + sparse["n_window"] + sparse["evict_chunk"] for layer in cache.layers)
    assert all(layer.offloaded.index_count > 0 for layer in cache.layers)


def test_decoding_waits_for_the_index_build_by_default():
    """Without decode_during_build the first decode step waits for the layer's build (timing-independent results);
    the option needs background builds."""
    import threading

    released = threading.Event()

    class Slow(ra.RetrievalLayer):
        def _make_indexes(self):
            released.wait(2.0)  # nobody sets it: each layer's build just takes 2 s longer
            super()._make_indexes()

    model = tiny_model(seed=15)
    ids = torch.randint(0, 97, (1, 120), generator=torch.Generator().manual_seed(16))
    cache = ra.RetrievalCache(model.config, ra.RetrievalConfig(**SPARSE, async_build=True), layer_class=Slow)
    greedy(model, ids, cache, 3)
    assert all(not layer.building for layer in cache.layers)
    assert sum(s["index_build_wait_s"] for s in cache.stats()) > 0.3  # the builds end >= 2 s apart
    assert all(s["scanned_frac"] < 1.0 for s in cache.stats())  # the graphs answered every step
    with pytest.raises(ValueError, match="decode_during_build"):
        ra.RetrievalConfig(decode_during_build=True, async_build=False)
    with pytest.raises(TypeError, match="decode_during_build"):
        ra.RetrievalConfig(decode_during_build=1)


def test_on_cpu_tokens_hook_gets_the_prompt_rows(device):
    """A subclass's on_cpu_tokens sees the prompt's CPU rows as the stores hold them, in ordinary (not page-locked)
    memory that stays valid after the prefill."""
    seen = []

    class Recording(ra.RetrievalLayer):
        def on_cpu_tokens(self, keys, values, train_queries):
            seen.append((self.layer_idx, keys, values, train_queries is not None))

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = tiny_model(seed=17).to(device, dtype)
    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(18)).to(device)
    cache = ra.RetrievalCache(model.config, ra.RetrievalConfig(**SPARSE), layer_class=Recording)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    cache.wait_for_indexes()
    prompt = sorted((s for s in seen if s[3]), key=lambda s: s[0])
    assert [s[0] for s in prompt] == list(range(len(cache.layers)))
    for (_, keys, values, _), layer in zip(prompt, cache.layers):
        assert keys.device.type == "cpu" and not keys.is_pinned() and not values.is_pinned()
        stored = layer.offloaded.keys()
        assert keys.shape == stored.shape and torch.equal(keys.to(stored.dtype), stored)


@pytest.mark.parametrize("sharing", ["per_query_head", "per_kv_head"])
def test_exact_scan_reads_each_group_once_and_is_exact(sharing):
    """The flat index and the not-yet-inserted tail are scanned once per kv head for the group's queries (several per
    head here, and left padding on one kv head): the exact top-k of every (head, query), best first, each row counted."""
    hq, hkv, d, k, m, n = 6, 2, 32, 15, 3, 5000
    g = torch.Generator().manual_seed(21)
    keys = torch.randn(hkv, n, d, generator=g)
    q = torch.randn(hq, m, d, generator=g)
    layer = ra._ext._C.OffloadedLayer(torch.float32, hq, hkv, d, d, "flat", {}, 0, sharing)
    layer.build(keys, keys.clone(), torch.zeros(hq, 0, d))
    layer.set_min_ids(torch.tensor([0, 37]))
    _, _, visited, ids = layer.retrieve_attend(q, k, 16, 1.0, return_ids=True)
    scores = torch.einsum("hmd,hnd->hmn", q.double(), keys.repeat_interleave(hq // hkv, 0).double())
    scores[hq // hkv :, :, :37] = float("-inf")  # kv head 1's padding
    assert torch.equal(ids, scores.topk(k, dim=-1).indices)
    assert visited[: hq // hkv].eq(n).all() and visited[hq // hkv :].eq(n - 37).all()
    # a graph layer with rows appended after its build: the tail is scanned the same way and merged
    graph = ra._ext._C.OffloadedLayer(torch.float32, hq, hkv, d, d, "query_guided", {}, 10_000, sharing)
    graph.build(keys[:, :4000].contiguous(), keys[:, :4000].contiguous(), torch.randn(hq, 300, d, generator=g))
    graph.append(keys[:, 4000:].contiguous(), keys[:, 4000:].contiguous())
    _, _, visited, ids = graph.retrieve_attend(q, k, 5000, 1.0, return_ids=True)  # a beam over every key: exact
    assert torch.equal(ids, torch.einsum("hmd,hnd->hmn", q.double(), keys.repeat_interleave(hq // hkv, 0).double()).topk(k, dim=-1).indices)
    assert bool((visited >= 1000).all())


def test_prompt_rows_stored_on_several_threads_keep_heads_and_values_apart():
    """A prompt of >= 4096 tokens is stored (and checked for NaN) one kv head's keys or values per thread: with top_k
    covering every row, the flat layer's output equals dense attention over each head's own keys and values, and a
    NaN in the last head's keys is refused without storing anything."""
    hq, hkv, d, t = 4, 2, 16, 5000
    g = torch.Generator().manual_seed(11)
    keys, values = torch.randn((hkv, t, d), generator=g), torch.randn((hkv, t, d), generator=g)
    q = torch.randn((hq, 2, d), generator=g)
    bad = keys.clone()
    bad[-1, -1, 3] = float("nan")
    layer = ra._ext._C.OffloadedLayer(torch.float32, hq, hkv, d, d, "flat", {}, 0, "per_query_head")
    with pytest.raises(ValueError, match="NaN"):
        layer.build(bad, values, torch.zeros((hq, 0, d)))
    assert layer.size == 0
    layer.build(keys, values, torch.zeros((hq, 0, d)))
    out, lse, _, _ = layer.retrieve_attend(q, t, 64, 0.25, return_ids=True)
    kh, vh = keys.repeat_interleave(hq // hkv, 0).double(), values.repeat_interleave(hq // hkv, 0).double()
    s = torch.einsum("hmd,hnd->hmn", q.double(), kh) * 0.25
    ref = torch.einsum("hmn,hnd->hmd", torch.softmax(s, -1), vh)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
