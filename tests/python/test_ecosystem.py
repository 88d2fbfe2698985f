"""Ecosystem: transformers.pipeline, from_pretrained(attn_implementation="retrieval_attention") for Llama / Mistral /
Qwen2, the attention-mass figures of cache.stats() (always-on CPU share, opt-in exact probe) and accuracy.py's
--index-sharing. Runs under the newest and the oldest supported transformers (scripts/test_transformers_oldest.sh)."""
import json
import os
import sys

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, pipeline

import retrieval_attention as ra
from retrieval_attention.cache import RetrievalLayer
from retrieval_attention.compat import cache_kwarg

from test_hf_exactness import ARCHS, TINY, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PASSKEY_TEXT = ("The pass key is 40712. Remember it. " + "The grass is green. The sky is blue. " * 12
                + "What is the pass key? The pass key is")


def byte_tokenizer():
    """A transformers tokenizer for the bundled model's byte vocabulary (ids 0-255 = UTF-8 bytes, 256 BOS, 257 EOS,
    258 PAD; the model ships no tokenizer files): a BPE without merges over the ByteLevel byte alphabet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # ByteLevel's byte -> printable character map (GPT-2's): printable bytes map to themselves, the rest to 256+
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    extra = iter(range(256, 512))
    vocab = {chr(b if b in printable else next(extra)): b for b in range(256)}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_byte_tokenizer_round_trip():
    tok = byte_tokenizer()
    text = "héllo  wörld\n\t~"
    ids = tok(text).input_ids
    assert ids == [256] + list(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text


# -- pipeline("text-generation") -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled(model_dir):
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="retrieval_attention").eval()


@pytest.mark.parametrize("index", ["flat", "query_guided"])
def test_pipeline_bundled_model_matches_full_attention(model_dir, index):
    """pipeline("text-generation") on a model switched by ra.enable: every generate() it makes gets a RetrievalCache,
    and in exactness mode (top_k >= CPU tokens, small static set so most tokens are on the CPU) the text equals full
    attention's."""
    tok = byte_tokenizer()
    ref_model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    full = pipeline("text-generation", model=ref_model, tokenizer=tok)(PASSKEY_TEXT, max_new_tokens=12, do_sample=False)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="retrieval_attention").eval()
    cfg = ra.RetrievalConfig(n_sink=8, n_window=32, top_k=100_000, ef=100_000, index=index, evict_chunk=4, mass_probe_every=1)
    ra.enable(model, cfg)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    ours = pipe(PASSKEY_TEXT, max_new_tokens=12, do_sample=False)
    assert ours[0]["generated_text"] == full[0]["generated_text"]
    assert "40712" in ours[0]["generated_text"][len(PASSKEY_TEXT):]
    stats = model.retrieval_stats  # the pipeline's cache, recorded by enable()'s generate
    n_prompt = len(PASSKEY_TEXT.encode()) + 1
    assert len(stats) == model.config.num_hidden_layers
    for s in stats:
        assert s["cpu_tokens"] > n_prompt - 48 and s["static_tokens"] <= 8 + 32 + 4 + 1
        assert s["decode_steps"] == 11 and s["mass_probes"] == 11
        assert s["recovered_mass_mean"] == pytest.approx(1.0, abs=1e-5)
        assert s["recovered_mass_min"] == pytest.approx(1.0, abs=1e-5)
        assert 0.0 < s["cpu_mass_share"] < 1.0


def test_pipeline_with_an_explicit_cache(model_dir):
    """A RetrievalCache handed to the pipeline call is passed on to generate and used (sparse mode here). The model is
    this test's own: where a GPU exists, pipeline() moves the model it is given onto it, in place, which would change
    the module-wide `bundled` model under the tests after this one."""
    tok = byte_tokenizer()
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="retrieval_attention").eval()
    cache = ra.RetrievalCache(model.config, ra.RetrievalConfig(n_sink=8, n_window=32, top_k=16, index="flat"))
    out = pipeline("text-generation", model=model, tokenizer=tok)(PASSKEY_TEXT, max_new_tokens=6, do_sample=False,
                                                                   past_key_values=cache)
    assert out[0]["generated_text"].startswith(PASSKEY_TEXT)
    s = cache.stats()[0]
    assert s["cpu_tokens"] > 400 and s["decode_steps"] == 5


def _save_tiny(arch, tmp_path, seed):
    model = tiny_model(arch, seed=seed)
    path = tmp_path / arch
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", list(ARCHS))
def test_from_pretrained_generate_and_pipeline(arch, tmp_path):
    """from_pretrained(..., attn_implementation="retrieval_attention") of a saved Llama / Mistral / Qwen2: generate with a
    RetrievalCache and pipeline("text-generation") after ra.enable both reproduce full attention in exactness mode."""
    cfg_cls, model_cls, _ = ARCHS[arch]
    path = _save_tiny(arch, tmp_path, seed=21)
    model = model_cls.from_pretrained(path, attn_implementation="retrieval_attention").eval()
    assert model.config._attn_implementation == "retrieval_attention"
    ids = torch.randint(1, TINY["vocab_size"], (1, 90), generator=torch.Generator().manual_seed(22))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    full = model.generate(ids, past_key_values=DynamicCache(), **kw)
    rcfg = ra.RetrievalConfig(n_sink=4, n_window=8, top_k=10_000, ef=10_000, evict_chunk=4)
    cache = ra.RetrievalCache(model.config, rcfg)
    assert torch.equal(model.generate(ids, past_key_values=cache, **kw), full)
    assert all(s["cpu_tokens"] > 80 for s in cache.stats())

    # the pipeline: tokens 0-255 are bytes, so a model with a 264-id vocabulary can use the byte tokenizer
    big = dict(TINY, vocab_size=264)
    torch.manual_seed(23)
    base = model_cls(cfg_cls(**big, **ARCHS[arch][2])).eval()
    base.save_pretrained(tmp_path / "big")
    tok = byte_tokenizer()
    ref = model_cls.from_pretrained(tmp_path / "big", attn_implementation="sdpa").eval()
    ours = model_cls.from_pretrained(tmp_path / "big", attn_implementation="retrieval_attention").eval()
    ra.enable(ours, ra.RetrievalConfig(n_sink=4, n_window=8, top_k=10_000, index="flat", evict_chunk=4))
    text = "Some words, then more words; " * 4
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    want = pipeline("text-generation", model=ref, tokenizer=tok)(text, **kw)[0]["generated_text"]
    got = pipeline("text-generation", model=ours, tokenizer=tok)(text, **kw)[0]["generated_text"]
    assert got == want
    assert ours.retrieval_stats[0]["cpu_tokens"] > 100


# -- attention-mass figures in cache.stats() --------------------------------------------------------------------------
def _decode(model, ids, cfg, steps=8):
    """Prefill `ids`, then feed `steps` fixed tokens one by one (teacher forcing) through a RetrievalCache, on the
    model's device."""
    cache = ra.RetrievalCache(model.config, cfg)
    ids = ids.to(model.device)
    cont = torch.tensor([list(b" 40712 is the key")[:steps]], device=model.device)
    kw = cache_kwarg(model)
    with torch.no_grad():
        model(ids, **{kw: cache})
        for t in range(cont.shape[1]):
            model(cont[:, t : t + 1], **{kw: cache})
    return cache


def _passkey_ids(n_filler=30):
    text = ("The grass is green. " * n_filler + "The pass key is 40712. Remember it. " + "The sky is blue. " * n_filler
            + "What is the pass key? The pass key is")
    return torch.tensor([[256] + list(text.encode())])


def test_recovered_mass_is_one_in_exactness_mode(bundled):
    cache = _decode(bundled, _passkey_ids(), ra.RetrievalConfig(n_sink=8, n_window=32, top_k=100_000, ef=100_000,
                                                                 mass_probe_every=1))
    for s in cache.stats():
        assert s["mass_probes"] == 8 and s["decode_steps"] == 8
        assert abs(s["recovered_mass_mean"] - 1.0) < 1e-5 and abs(s["recovered_mass_min"] - 1.0) < 1e-5
        assert 0.0 < s["cpu_mass_share"] < 1.0
    summ = cache.summary()
    assert abs(summ["recovered_mass_mean"] - 1.0) < 1e-5 and 0.0 < summ["cpu_mass_share"] < 1.0


def test_recovered_mass_sparse_is_below_one_and_grows_with_top_k(bundled):
    ids = _passkey_ids()
    got = {}
    for top_k in (2, 8, 64):
        cfg = ra.RetrievalConfig(n_sink=4, n_window=16, top_k=top_k, index="flat", mass_probe_every=2)
        s = _decode(bundled, ids, cfg).stats()
        assert all(x["mass_probes"] == 4 for x in s)  # steps 0, 2, 4, 6
        assert all(0.0 < x["recovered_mass_min"] <= x["recovered_mass_mean"] <= 1.0 + 1e-6 for x in s)
        got[top_k] = sum(x["recovered_mass_mean"] for x in s) / len(s)
    assert got[2] < got[8] < got[64] <= 1.0 + 1e-6
    assert got[2] < 0.999  # something was really missed with 2 keys of ~1,000


def test_query_guided_mass_is_bounded_by_exact_top_k(bundled):
    """The graph's top_k can capture at most what the exact top_k (flat) does; on the bundled model it gets close
    (mean), while the minimum exposes single (head, step) searches that missed the mass."""
    ids = _passkey_ids(30)
    means = {}
    for index in ("flat", "query_guided"):
        cfg = ra.RetrievalConfig(n_sink=8, n_window=32, top_k=32, ef=64, index=index, mass_probe_every=4)
        summ = _decode(bundled, ids, cfg).summary()
        assert 0.0 < summ["recovered_mass_min"] <= summ["recovered_mass_mean"] <= 1.0 + 1e-6
        means[index] = summ["recovered_mass_mean"]
    assert 0.5 < means["query_guided"] <= means["flat"] + 0.01


def test_probe_off_costs_nothing(bundled, monkeypatch):
    """mass_probe_every=0 (the default): no exact pass, no key copy; with every=3 exactly one probe per 3 steps."""
    calls = []
    real = RetrievalLayer.exact_cpu_lse

    def spy(self, q, scaling):
        calls.append(self.layer_idx)
        return real(self, q, scaling)

    monkeypatch.setattr(RetrievalLayer, "exact_cpu_lse", spy)
    ids = _passkey_ids(10)
    s = _decode(bundled, ids, ra.RetrievalConfig(n_sink=4, n_window=16, top_k=8, index="flat")).stats()
    assert calls == [] and all(x["mass_probes"] == 0 and x["recovered_mass_mean"] is None for x in s)
    assert all(x["cpu_mass_share"] > 0 for x in s)  # the free estimate is always on
    s = _decode(bundled, ids, ra.RetrievalConfig(n_sink=4, n_window=16, top_k=8, index="flat", mass_probe_every=3), steps=8).stats()
    n_layers = bundled.config.num_hidden_layers
    assert len(calls) == 3 * n_layers and all(x["mass_probes"] == 3 for x in s)  # steps 0, 3, 6


@pytest.mark.parametrize("sharing", ["per_query_head", "per_kv_head"])
def test_probe_with_left_padding_and_sharing(sharing):
    """Pad tokens on the CPU are excluded from the exact pass as from retrieval: exactness mode stays at 1.0."""
    model = tiny_model("llama", seed=31)
    ids = torch.randint(1, 97, (2, 80), generator=torch.Generator().manual_seed(32))
    mask = torch.ones_like(ids)
    ids[0, :40], mask[0, :40] = 0, 0
    cfg = ra.RetrievalConfig(n_sink=4, n_window=8, top_k=10_000, ef=10_000, index_sharing=sharing, mass_probe_every=1)
    cache = ra.RetrievalCache(model.config, cfg)
    model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for s in cache.stats():
        assert s["mass_probes"] == 5 and abs(s["recovered_mass_min"] - 1.0) < 1e-5


def test_probe_on_a_loaded_cache(tmp_path):
    """mass_probe_every is a search-time setting: a saved cache may be loaded with the probe switched on."""
    model = tiny_model("qwen2", seed=33)
    ids = torch.randint(1, 97, (1, 70), generator=torch.Generator().manual_seed(34))
    cfg = ra.RetrievalConfig(n_sink=4, n_window=8, top_k=10_000, ef=10_000)
    cache = ra.RetrievalCache(model.config, cfg)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    cache.save(tmp_path / "c")
    loaded = ra.RetrievalCache.load(tmp_path / "c", model.config, ra.RetrievalConfig(n_sink=4, n_window=8, top_k=10_000,
                                                                                      ef=10_000, mass_probe_every=2))
    with torch.no_grad():
        for t in range(4):
            model(torch.tensor([[5 + t]]), past_key_values=loaded)
    assert all(s["mass_probes"] == 2 and abs(s["recovered_mass_mean"] - 1.0) < 1e-5 for s in loaded.stats())


def test_fresh_cache_mass_fields():
    model = tiny_model("llama")
    s = ra.RetrievalCache(model.config, ra.RetrievalConfig()).stats()[0]
    assert s["cpu_mass_share"] == 0.0 and s["mass_probes"] == 0 and s["recovered_mass_mean"] is None
    assert s["recovered_mass_min"] is None and s["decode_steps"] == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4", None])
def test_mass_probe_every_validation(bad):
    with pytest.raises(ValueError, match="mass_probe_every"):
        ra.RetrievalConfig(mass_probe_every=bad)


def test_offloaded_keys_accessor():
    """The C++ layer's keys() returns a copy of its CPU keys, (kv_heads, tokens, head_dim) in the storage dtype."""
    from retrieval_attention import _ext

    for dtype in (torch.float32, torch.bfloat16):
        layer = _ext._C.OffloadedLayer(dtype, 4, 2, 8, 8, "flat", {}, 0, "per_query_head")
        k = torch.randn(2, 5, 8).to(dtype)
        layer.build(k, torch.randn(2, 5, 8).to(dtype), torch.zeros(4, 0, 8))
        k2 = torch.randn(2, 3, 8).to(dtype)
        layer.append(k2, torch.randn(2, 3, 8).to(dtype))
        got = layer.keys()
        assert got.dtype == dtype and torch.equal(got, torch.cat([k, k2], 1))
        got.zero_()  # a copy: the layer is unchanged
        assert torch.equal(layer.keys(), torch.cat([k, k2], 1))
    assert _ext._C.OffloadedLayer(torch.float32, 2, 1, 4, 4, "flat", {}, 0, "per_query_head").keys().shape == (1, 0, 4)


# -- benchmarks/accuracy.py --index-sharing ---------------------------------------------------------------------------
def test_accuracy_bench_index_sharing(tmp_path, capsys, model_dir):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import accuracy as A
    finally:
        sys.path.pop(0)
    A.main(["--json", "--contexts", "640", "--samples", "1", "--tasks", "passkey", "--methods", "full,retrieval_attention",
            "--n-sink", "16", "--n-window", "64", "--kl-contexts", "none", "--device", "cpu", "--index-sharing", "per_kv_head"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    by = {r["method"]: r for r in lines}
    assert by["retrieval_attention"]["index_sharing"] == "per_kv_head" and "index_sharing" not in by["full"]
    with pytest.raises(SystemExit):
        A.parse_args(["--index-sharing", "per_layer"])


# -- configs written by transformers 5 under transformers 4.x --------------------------------------------------------
def test_rope_parameters_ignored_is_detected(monkeypatch):
    from types import SimpleNamespace

    from packaging.version import Version

    from retrieval_attention import compat

    cfg = SimpleNamespace(rope_parameters={"rope_theta": 2e6, "rope_type": "default"}, rope_theta=10000.0)
    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", Version("4.56.2"))
    assert "rope_theta=2000000.0" in compat.ignored_rope_parameters(cfg)
    with pytest.warns(RuntimeWarning, match="RoPE is wrong"):
        compat.warn_if_rope_parameters_ignored(cfg)
    assert compat.ignored_rope_parameters(SimpleNamespace(rope_parameters={"rope_theta": 2e6}, rope_theta=2e6)) is None
    assert compat.ignored_rope_parameters(SimpleNamespace(rope_theta=1e4)) is None
    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", Version("5.24.0"))
    assert compat.ignored_rope_parameters(cfg) is None


def test_bundled_model_config_under_this_transformers(model_dir):
    """The bundled config carries its RoPE base both as transformers 5 writes it (rope_parameters) and as 4.x reads it
    (top-level rope_theta), so neither version warns. Under 4.x a transformers-5 config without the top-level key is
    read with the wrong base, and RetrievalCache warns about it."""
    import json
    import os
    import warnings

    from retrieval_attention import compat

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="retrieval_attention")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ra.RetrievalCache(model.config, ra.RetrievalConfig())
        ra.enable(model, ra.RetrievalConfig())
    if compat.TRANSFORMERS_VERSION.major < 5:
        assert float(model.config.rope_theta) == 2e6
        with open(os.path.join(model_dir, "config.json")) as f:
            raw = json.load(f)
        raw.pop("rope_theta")
        with pytest.warns(RuntimeWarning, match="rope_theta"):
            ra.RetrievalCache(LlamaConfig(**raw), ra.RetrievalConfig())
