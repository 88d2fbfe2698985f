"""Training queries moved to the decode position by RoPE (RetrievalConfig.shift_train_queries, index.rope_shift)."""
import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import retrieval_attention as ra
from retrieval_attention.compat import TRANSFORMERS_VERSION, Version, rope_inv_freq
from retrieval_attention.index import rope_shift, shifted_rows

SMALL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
             vocab_size=97, max_position_embeddings=1 << 20)


def with_rope(cls, **rope):
    """A config of `cls` with the RoPE settings `rope` (rope_theta and, for a scaled type, its parameters), written the way
    this transformers reads them."""
    if TRANSFORMERS_VERSION >= Version("5.0.0.dev0"):
        return cls(**SMALL, rope_parameters={"rope_type": "default", **rope})
    theta = rope.pop("rope_theta")
    return cls(**SMALL, rope_theta=theta, rope_scaling=rope or None)


@pytest.mark.parametrize("cls,rope", [
    (LlamaConfig, {"rope_theta": 10000.0}),
    (LlamaConfig, {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    (LlamaConfig, {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}),
    (MistralConfig, {"rope_theta": 1000000.0}),
    (Qwen2Config, {"rope_theta": 1000000.0}),
])
def test_rope_inv_freq_is_the_models_own(cls, rope):
    config = with_rope(cls, **rope)
    ours = rope_inv_freq(config)
    theirs = LlamaRotaryEmbedding(config=config).inv_freq  # the Llama, Mistral and Qwen2 rotary embeddings agree
    assert ours is not None and ours.dtype == torch.float64
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-6, atol=0)


def test_rope_inv_freq_is_none_without_a_fixed_rotation():
    config = with_rope(LlamaConfig, rope_theta=10000.0, rope_type="dynamic", factor=2.0)
    assert rope_inv_freq(config) is None
    # GPT-J rotates interleaved pairs, not rotate_half's halves: no shift rather than one in the wrong planes
    from transformers import GPTJConfig

    assert rope_inv_freq(GPTJConfig(n_embd=128, n_head=4, rotary_dim=32)) is None


def test_rope_shift_gives_the_query_at_the_later_position():
    """A pre-RoPE vector embedded at position p, moved by T - p, equals the same vector embedded at T by transformers'
    apply_rotary_pos_emb: with the rotary embedding's own cos/sin at T = 4096, and at T = 1M with cos/sin of float64
    angles (its own float32 frequencies and angles are off by up to 0.06 rad there; the frequencies were checked
    against it above)."""
    config = with_rope(LlamaConfig, rope_theta=2000000.0)
    rotary = LlamaRotaryEmbedding(config=config)
    g = torch.Generator().manual_seed(0)
    m, d = 64, config.hidden_size // config.num_attention_heads
    x = torch.randn(1, 1, m, d, generator=g, dtype=torch.float64)
    for target, own_cos_sin in ((4096, True), (1 << 20, False)):
        pos = torch.randint(0, target, (m,), generator=g)

        def embed(positions):
            if own_cos_sin:
                cos, sin = (t.double() for t in rotary(x.float(), positions.view(1, -1)))
            else:
                ang = positions.double()[:, None] * rope_inv_freq(config)[None, :]
                cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[None], torch.cat([ang.sin(), ang.sin()], -1)[None]
            q, _ = apply_rotary_pos_emb(x, x, cos, sin)
            return q.float()

        moved = rope_shift(embed(pos), target - pos, rope_inv_freq(config))
        torch.testing.assert_close(moved, embed(torch.full((m,), target)), atol=2e-3 if own_cos_sin else 1e-5, rtol=0)
        assert not torch.allclose(moved, embed(pos), atol=1e-1)  # it did move


def test_rope_shift_keeps_shape_dtype_and_unrotated_dims():
    inv = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # 4 planes: dims 0-7 rotate, 8-11 do not
    q = torch.randn(2, 3, 5, 12).bfloat16()
    out = rope_shift(q, torch.arange(5), inv)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.equal(out[..., 8:], q[..., 8:])
    assert torch.equal(out[:, :, 0], q[:, :, 0])  # delta 0: unchanged
    torch.testing.assert_close(out.float().norm(dim=-1), q.float().norm(dim=-1), rtol=2e-2, atol=0)  # a rotation
    with pytest.raises(ValueError, match="5 integers"):
        rope_shift(q, torch.arange(4), inv)
    with pytest.raises(ValueError, match="integers"):
        rope_shift(q, torch.zeros(5), inv)
    with pytest.raises(ValueError, match="at most"):
        rope_shift(q[..., :6], torch.arange(5), inv)
    with pytest.raises(TypeError, match="dtype"):
        rope_shift(q.to(torch.int32), torch.arange(5), inv)
    with pytest.raises(ValueError, match="shape"):
        rope_shift(q[0, 0, 0], torch.arange(1), inv)
    as_numpy = rope_shift(q.float().numpy(), torch.arange(5), inv)  # numpy in, tensor out, as the indexes take it
    torch.testing.assert_close(as_numpy, rope_shift(q.float(), torch.arange(5), inv))


class Recording(ra.RetrievalLayer):
    def on_cpu_tokens(self, keys, values, train_queries):
        if train_queries is not None:
            self.train = train_queries.clone()


@pytest.mark.parametrize("shift,max_train", [(1.0, None), (1.0, 7), (0.5, None), (0.5, 7), (0.0, None)])
def test_the_cache_trains_on_the_shifted_prompt_queries(shift, max_train, device):
    """The graphs' training queries (as a subclass's on_cpu_tokens hook gets them) are the prompt's queries, the share
    `shift` of them (evenly spread) moved to the first decode position and the others exactly as they were; on a GPU
    the prefill shifts them on the device, beside its kNN."""
    config = with_rope(LlamaConfig, rope_theta=2000000.0)
    hq, hkv, d, T = 4, 2, 32, 40
    cfg = ra.RetrievalConfig(n_sink=4, n_window=8, async_build=False, shift_train_queries=shift, max_train_queries=max_train)
    cache = ra.RetrievalCache(config, cfg, layer_class=Recording)
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, hkv, T, d, generator=g), torch.randn(1, hkv, T, d, generator=g)
    query = torch.randn(1, hq, T, d, generator=g)
    layer.update(keys.to(device), values.to(device))
    layer.finish_prefill(query.to(device))
    cache.wait_for_indexes()
    pos = torch.arange(T) if max_train is None else torch.linspace(0, T - 1, max_train).round().long()
    moved = shifted_rows(len(pos), shift)
    assert int(moved.sum()) == int(len(pos) * shift)  # 0.5: every other row, 1: all, 0: none
    if shift == 0.5:
        assert moved.tolist() == [i % 2 == 1 for i in range(len(pos))]
    expect = query[:, :, pos]
    if shift:
        expect = rope_shift(expect, torch.where(moved, T - pos, 0), rope_inv_freq(config))
    assert layer.train.shape == (hq, len(pos), d)
    train = layer.train.reshape(1, hq, len(pos), d)
    torch.testing.assert_close(train, expect, atol=1e-5, rtol=0)
    assert torch.equal(train[:, :, ~moved], query[:, :, pos][:, :, ~moved])  # the others bit for bit
    assert layer.stats()["train_queries_shifted"] == shift
    # the last prompt query moves by one position only, the first (row 0: moved only when all are) by T
    if shift == 1.0:
        assert not torch.allclose(layer.train[:, 0], query[0, :, 0], atol=1e-2)


@pytest.mark.parametrize("bad", ["yes", None, -0.1, 1.5, float("nan")])
def test_shift_train_queries_must_be_a_share(bad):
    with pytest.raises(TypeError, match="shift_train_queries"):
        ra.RetrievalConfig(shift_train_queries=bad)


@pytest.mark.parametrize("good", [True, False, 0, 1, 0.25])
def test_shift_train_queries_takes_bools_as_all_or_none(good):
    assert ra.RetrievalConfig(shift_train_queries=good).shift_train_queries == good


@pytest.mark.parametrize("shift", [0.5, 0.0])
def test_the_bundled_model_trains_on_shifted_queries(model_dir, shift):
    """Through the HF path (the bundled Llama's own config): summary() reports the shift as configured, and the
    exact-top_k answer of the first decode step does not depend on it (top_k >= CPU tokens: exact attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="retrieval_attention")
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(3))
    cfg = ra.RetrievalConfig(n_sink=16, n_window=32, top_k=1000, shift_train_queries=shift)
    cache = ra.RetrievalCache(model.config, cfg)
    with torch.no_grad():
        logits = model(ids, past_key_values=cache).logits[0, -1]
        nxt = model(logits.argmax().view(1, 1), past_key_values=cache).logits[0, -1]
        ref_cache = ra.RetrievalCache(model.config, ra.RetrievalConfig(n_sink=16, n_window=32, top_k=1000, index="flat"))
        model(ids, past_key_values=ref_cache)
        ref = model(logits.argmax().view(1, 1), past_key_values=ref_cache).logits[0, -1]
    assert cache.summary()["train_queries_shifted"] == shift
    assert ref_cache.summary()["train_queries_shifted"] == 0.0  # a flat index has no training queries
    torch.testing.assert_close(nxt, ref, atol=1e-4, rtol=1e-4)
