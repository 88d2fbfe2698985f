"""End to end through transformers: with top_k >= CPU tokens, RetrievalCache decoding equals full attention."""
import sys

import time

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import retrieval_attention as ra

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
}


def tiny_model(arch, seed=0, device="cpu"):
    cfg_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = cfg_cls(**TINY, **extra)
    cfg._attn_implementation = "retrieval_attention"
    model = model_cls(cfg).eval().to(device)
    ra.enable(model, ra.RetrievalConfig(index="flat"))
    return model


def greedy(model, ids, cache, n):
    ids = ids.to(model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


def assert_exact(model, ids, cfg, n_new):
    full_seq, full_logits = greedy(model, ids, DynamicCache(), n_new)
    cache = ra.RetrievalCache(model.config, cfg)
    seq, logits = greedy(model, ids, cache, n_new)
    assert torch.equal(seq, full_seq)
    rel = (logits - full_logits).abs().max() / full_logits.abs().max()
    assert rel < 1e-4, f"logits differ by {rel:.2e} (relative)"
    if model.device.type == "cuda":  # the static set stayed on the GPU, the rest went to the CPU
        assert cache.layers[0].keys.is_cuda and cache.summary()["cpu_kv_bytes"] > 0
    stats = cache.stats()
    total = ids.shape[1] + n_new - 1  # the last generated token never enters the cache
    assert all(s["cpu_tokens"] + s["static_tokens"] == total for s in stats)
    return cache


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tiny_models_exact_with_eviction(arch, device):
    model = tiny_model(arch, device=device)
    ids = torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(1))
    cfg = ra.RetrievalConfig(n_sink=4, n_window=16, top_k=10_000, index="flat", evict_chunk=8)
    cache = assert_exact(model, ids, cfg, 90)
    s = cache.stats()[0]
    # tokens were evicted from the window during decoding (in chunks of 8) and inserted into the CPU index
    assert s["static_tokens"] < 4 + 16 + 8 + 1 and s["cpu_tokens"] == 150 + 89 - s["static_tokens"] > 150 - 20


@pytest.mark.parametrize("arch", ["llama"])
def test_short_prompt_grows_sinks_then_offloads(arch):
    """A prompt shorter than the static set: sinks fill first, then tokens start moving to the CPU mid-generation."""
    model = tiny_model(arch, seed=1)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    assert_exact(model, ids, ra.RetrievalConfig(n_sink=8, n_window=8, top_k=10_000, index="flat", evict_chunk=1), 85)


def test_batch_of_equal_length_prompts_is_exact():
    model = tiny_model("qwen2", seed=2)
    ids = torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(3))
    assert_exact(model, ids, ra.RetrievalConfig(n_sink=2, n_window=8, top_k=10_000, index="flat"), 20)


def test_multi_token_continuation_after_prefill_is_exact():
    """A second chunk of several tokens (e.g. the next chat turn) attends causally over static + CPU tokens."""
    model = tiny_model("llama", seed=3)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 97, (1, 80), generator=g), torch.randint(0, 97, (1, 12), generator=g)
    cfg = ra.RetrievalConfig(n_sink=4, n_window=8, top_k=10_000, index="flat")
    cache, ref = ra.RetrievalCache(model.config, cfg), DynamicCache()
    with torch.no_grad():
        model(a, past_key_values=cache)
        model(a, past_key_values=ref)
        ours = model(b, past_key_values=cache).logits
        full = model(b, past_key_values=ref).logits
    torch.testing.assert_close(ours, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("async_build", [False, True])
def test_background_index_build_is_exact(async_build):
    """Index builds may run in a background thread while later layers compute; results must not change."""
    model = tiny_model("qwen2", seed=7)
    ids = torch.randint(0, 97, (1, 100), generator=torch.Generator().manual_seed(8))
    cfg = ra.RetrievalConfig(n_sink=4, n_window=8, top_k=10_000, index="query_guided", ef=10_000, async_build=async_build)
    t0 = time.perf_counter()
    cache = assert_exact(model, ids, cfg, 20)
    assert all(s["index_build_s"] > 0 for s in cache.stats())
    # each layer records when its indexes were made (decode_latency.py's indexes_ready_after_prefill_s)
    assert all(t0 < lay.indexed_at <= time.perf_counter() for lay in cache.layers)


@pytest.mark.parametrize("max_unindexed", [0, 6, 4096])
def test_unindexed_tail_is_searched_exactly(max_unindexed):
    """Evicted tokens wait in an exactly-scanned tail before joining the graphs in a batch; either way nothing is lost."""
    model = tiny_model("llama", seed=13)
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(14))
    cfg = ra.RetrievalConfig(n_sink=4, n_window=8, top_k=10_000, index="query_guided", ef=10_000, evict_chunk=4,
                             max_unindexed_tokens=max_unindexed)
    cache = assert_exact(model, ids, cfg, 40)
    assert cache.layers[0].cpu_tokens > 48 + 20


def test_query_guided_default_index_matches_full_attention_in_exactness_mode():
    """With top_k >= CPU tokens the graph index must return every CPU key, so the result is exact too."""
    model = tiny_model("llama", seed=5)
    ids = torch.randint(0, 97, (1, 120), generator=torch.Generator().manual_seed(6))
    cfg = ra.RetrievalConfig(n_sink=4, n_window=16, top_k=10_000, index="query_guided", ef=10_000)
    assert_exact(model, ids, cfg, 40)


def test_bundled_model_exact_with_eviction(model_dir, device):
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="retrieval_attention").eval().to(device)
    text = b"The quick brown fox jumps over the lazy dog while the pass key is 40712. " * 8
    ids = torch.tensor([[256] + list(text)])
    assert_exact(model, ids, ra.RetrievalConfig(n_sink=16, n_window=32, top_k=100_000, index="flat"), 80)


def test_sparse_mode_is_measured_not_exact(model_dir):
    """top_k far below the CPU tokens: decoding still runs and reports what it scanned."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="retrieval_attention").eval()
    ids = torch.tensor([[256] + list(b"Some text that repeats. " * 20)])
    cache = ra.RetrievalCache(model.config, ra.RetrievalConfig(n_sink=4, n_window=8, top_k=5, index="flat"))
    model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    s = cache.summary()
    assert s["cpu_kv_bytes"] > 0 and s["device_kv_bytes"] > 0 and s["scanned_frac"] == 1.0  # flat scans everything


def test_cache_without_retrieval_attention_raises_clearly():
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    cache = ra.RetrievalCache(model.config, ra.RetrievalConfig(index="flat"))
    with pytest.raises(RuntimeError, match="attn_implementation='retrieval_attention'"):
        model.generate(torch.randint(0, 97, (1, 10)), past_key_values=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_enable_creates_its_own_cache_and_falls_back_to_exact_without_one():
    model = tiny_model("mistral")
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(5))
    a = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)  # enable() injects a RetrievalCache
    b = model.generate(ids, past_key_values=DynamicCache(), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"n_sink": -1}, ValueError, "n_sink"),
        ({"n_window": 1.5}, ValueError, "n_window"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"ef": True}, ValueError, "ef"),
        ({"index": "hnsw"}, ValueError, "index"),
        ({"n_sink": 0, "n_window": 0}, ValueError, "n_sink \\+ n_window"),
        ({"index_params": [1]}, TypeError, "index_params"),
        ({"max_train_queries": 0}, ValueError, "max_train_queries"),
        ({"cpu_dtype": torch.int8}, ValueError, "cpu_dtype"),
        ({"async_build": "yes"}, TypeError, "async_build"),
        ({"evict_chunk": 0}, ValueError, "evict_chunk"),
        ({"max_unindexed_tokens": -1}, ValueError, "max_unindexed_tokens"),
        ({"progress": 1}, TypeError, "progress"),
    ],
)
def test_config_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ra.RetrievalConfig(**kwargs)


def test_cache_and_enable_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="RetrievalConfig"):
        ra.RetrievalCache(model.config, {"top_k": 5})
    with pytest.raises(TypeError, match="decoder model config"):
        ra.RetrievalCache(object())
    with pytest.raises(TypeError, match="generative model"):
        ra.enable(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown parameter"):
        cache = ra.RetrievalCache(model.config, ra.RetrievalConfig(index="flat", index_params={"bogus": 1}))
        model(torch.randint(0, 97, (1, 30)), past_key_values=cache)


@pytest.mark.parametrize("pads,n_sink,n_window", [((30, 0, 7), 4, 16), ((3, 50, 0), 8, 8), ((2, 0, 1), 64, 4)])
def test_left_padded_batch_is_exact_and_never_retrieves_pads(pads, n_sink, n_window):
    """Left padding (what generate() does for unequal prompts): pads are masked in the static set and never retrieved
    from the CPU, so the padded batch decodes exactly like full attention on the same padded batch."""
    model = tiny_model("llama", seed=9)
    g = torch.Generator().manual_seed(10)
    T = 90
    ids = torch.randint(1, 97, (len(pads), T), generator=g)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads):
        ids[b, :p], mask[b, :p] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=40, min_new_tokens=40, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    full = model.generate(ids, past_key_values=DynamicCache(), **kw)
    cfg = ra.RetrievalConfig(n_sink=n_sink, n_window=n_window, top_k=10_000, index="flat", evict_chunk=4)
    cache = ra.RetrievalCache(model.config, cfg)
    ours = model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(ours.sequences, full.sequences)
    lf, lo = torch.stack(full.logits), torch.stack(ours.logits)
    assert ((lf - lo).abs().max() / lf.abs().max()) < 1e-4


def test_left_padded_batch_sparse_mode_never_attends_pads():
    """With a small top_k the pads (whose keys are identical) must still never be among the retrieved ids."""
    model = tiny_model("llama", seed=11)
    ids = torch.randint(1, 97, (2, 120), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(ids)
    ids[0, :60], mask[0, :60] = 0, 0
    cache = ra.RetrievalCache(model.config, ra.RetrievalConfig(n_sink=4, n_window=8, top_k=5, index="query_guided"))
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    layer = cache.layers[0]
    assert layer.cpu_pad.tolist() == [56, 0] and layer.static_pad.tolist() == [4, 0]
    q = torch.randn(2 * 4, 1, 16)
    _, _, _, got = layer.offloaded.retrieve_attend(q, 5, 64, 0.25, return_ids=True)
    row0 = got[:4]  # query heads of batch row 0
    assert ((row0 == -1) | (row0 >= 56)).all()


def test_right_padding_is_rejected():
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    cache = ra.RetrievalCache(model.config, ra.RetrievalConfig(index="flat"))
    with pytest.raises(NotImplementedError, match="left padding"):
        model(ids, attention_mask=mask, past_key_values=cache)


def test_progress_bar_and_logging(capsys, caplog):
    """progress=True shows a tqdm bar over the layers' builds; each build is logged at INFO on 'retrieval_attention'."""
    import logging

    model = tiny_model("llama", seed=15)
    cache = ra.RetrievalCache(model.config, ra.RetrievalConfig(n_sink=4, n_window=8, index="flat", progress=True))
    with caplog.at_level(logging.INFO, logger="retrieval_attention"), torch.no_grad():
        model(torch.randint(0, 97, (1, 50)), past_key_values=cache)
    assert "building CPU indexes" in capsys.readouterr().err
    assert sum("CPU tokens indexed" in r.getMessage() for r in caplog.records) == model.config.num_hidden_layers
    quiet = ra.RetrievalCache(model.config, ra.RetrievalConfig(n_sink=4, n_window=8, index="flat", progress=False))
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 50)), past_key_values=quiet)
    assert "building CPU indexes" not in capsys.readouterr().err


def test_progress_shown_by_default_on_a_terminal_or_in_a_notebook(monkeypatch):
    """progress=None: long prompts get the bar where someone watches; a Jupyter kernel's stderr is no tty."""
    from retrieval_attention import cache as cache_mod

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stderr", Stream(False))
    assert not cache_mod._progress_by_default(100_000)  # a log file or CI
    monkeypatch.setattr(sys, "stderr", Stream(True))
    assert cache_mod._progress_by_default(100_000) and not cache_mod._progress_by_default(8191)
    monkeypatch.setattr(sys, "stderr", Stream(False))
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    assert cache_mod._progress_by_default(100_000)


def test_sampling_matches_full_attention_in_exactness_mode():
    """do_sample=True: with the same seed and exact attention, the sampled tokens are the same as full attention's."""
    model = tiny_model("qwen2", seed=16)
    ids = torch.randint(0, 97, (1, 70), generator=torch.Generator().manual_seed(17))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=30, min_new_tokens=30, do_sample=True, top_k=20, temperature=1.3,
              pad_token_id=0)
    torch.manual_seed(123)
    full = model.generate(ids, past_key_values=DynamicCache(), **kw)
    torch.manual_seed(123)
    cache = ra.RetrievalCache(model.config, ra.RetrievalConfig(n_sink=4, n_window=8, top_k=10_000, index="flat", evict_chunk=4))
    ours = model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(ours, full)
    assert len(set(full[0, 70:].tolist())) > 3  # it really sampled
