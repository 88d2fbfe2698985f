"""RetrievalConfig: how the KV cache is split between the model's device and the CPU, and how it is searched."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

INDEX_TYPES = ("flat", "query_guided")
INDEX_SHARING = ("per_query_head", "per_kv_head")
# ef=None: the beam grows with the CPU keys (calibrated on the bundled model's own Q/K, docs/TUNING.md).
EF_AUTO_KEYS_PER_SLOT = 128
EF_AUTO_MIN = 128
EF_AUTO_MAX = 1024


@dataclass
class RetrievalConfig:
    """Settings of RetrievalAttention (defaults from Liu et al., 2024, section 4).

    n_sink:      first tokens kept on the model's device (attention sinks).
    n_window:    most recent tokens kept on the model's device; older ones move to the CPU index.
    top_k:       keys retrieved from the CPU per query head and step (top_k >= CPU tokens is exact attention).
    index:       "query_guided" (the paper's attention-aware graph) or "flat" (exact scan of all CPU keys).
    ef:          beam width of the graph search (larger: higher recall, more keys scanned). None (the default): one
                 beam slot per EF_AUTO_KEYS_PER_SLOT CPU keys, clamped to [EF_AUTO_MIN, EF_AUTO_MAX] (search_beam()):
                 128 up to 16K CPU tokens, 251 at 32K, 1024 from 128K. A fixed beam recalls old keys less as the
                 context grows; this keeps it about level (docs/TUNING.md, "ef: the search beam").
    index_params: build parameters passed to the index (e.g. {"degree": 32, "k_train": 100}).
    index_sharing: "per_query_head" (the paper's: one index per query head, trained on that head's queries) or
                 "per_kv_head" (one index per GQA group, trained on the group's pooled queries and searched by all its
                 query heads: Hq/Hkv times fewer builds, inserts and graph bytes).
    max_train_queries: prefill queries per query head used to build the graph, evenly spaced over the prompt (None:
                 all); with "per_kv_head" the group pools up to Hq/Hkv times this many. A cap shortens long prompts'
                 builds but costs task accuracy: 8192 at 32K tokens dropped passkey accuracy from 0.84 to 0.70
                 (docs/TUNING.md, "max_train_queries").
    shift_train_queries: the share of the graphs' training queries (prompt queries) moved by RoPE to the first decode
                 position, spread evenly over them (0.5, the default: every other one; 0: none; 1: all). A moved query
                 is rotated by (prompt length - its position) * the model's RoPE frequencies (index.rope_shift), so it
                 scores the keys from the relative positions decode queries have; an unmoved one ranks the keys near its
                 own place first, which gives the graph links among old keys. On all 36 heads of the bundled model's 32K
                 Q/K, keys scanned at recall@100 0.95: none moved 7.24%, all 9.38%, half 6.82% (docs/TUNING.md,
                 "shift_train_queries"). Needs a RoPE of fixed frequencies in the model config (default, linear,
                 llama3, yarn, ...) of a model that applies it as transformers' Llama does (Llama, Mistral, Mixtral,
                 Qwen2/3, Gemma); otherwise the queries are used as they are (stats() reports the share applied).
    cpu_dtype:   storage dtype of CPU keys/values (None: the model's KV dtype).
    evict_chunk: the device window may grow to n_window + evict_chunk tokens before the oldest evict_chunk of them
                 move to the CPU in one batch (amortises transfers and index inserts; exactness is unaffected).
    max_unindexed_tokens: tokens moved to the CPU during decoding are searched exactly (a flat scan) until this many
                 have accumulated, then inserted into the indexes in one batch (0: insert at every eviction).
    progress:    a tqdm progress bar over the layers' index builds (None: on a terminal or in a Jupyter kernel, for
                 prompts of 8K+ CPU tokens).
    async_build: build each layer's indexes in a background thread while later layers compute
                 (None: only when the KV lives on a GPU).
    decode_during_build: with background builds, decode without waiting for them: a layer whose indexes are still
                 being built scans all its CPU keys exactly (the exact top_k, as index="flat" retrieves; slower per
                 token), and tokens leaving the device window stay on the device until its build is done. The first
                 tokens come right after the prefill instead of after the builds, but what is retrieved then depends
                 on build timing: leave it off (the default) to measure the graph's accuracy. It also skips the
                 prefill's key-to-key lists on the GPU (a shorter prefill, longer CPU builds; docs/TUNING.md).
    warm_start:  each query head's graph search also starts from the keys it retrieved at the previous decode step
                 (consecutive queries share most of their top keys), besides the graph's entry point. On the bundled
                 model's own 128K Q/K it reaches a given recall with fewer keys scored (docs/TUNING.md, "warm_start").
                 What a step retrieves then depends on the step before it; False searches every step from the entry
                 point alone. No effect on index="flat" or exactness mode.
    mass_probe_every: every this many decode steps (0: never, the default) each layer also computes, on the CPU, the
                 exact log-sum-exp over *all* its CPU keys and records the share of the true attention mass (over the
                 static set plus every CPU key) that the static set plus the retrieved top_k keys captured:
                 exp(logaddexp(lse_static, lse_retrieved) - logaddexp(lse_static, lse_all_cpu)), 1.0 when nothing was
                 missed. cache.stats() reports its per-layer mean and minimum ("recovered_mass_mean"/"_min"). A probe
                 scans every CPU key of the layer (like index="flat") and copies them once, so keep it sparse (e.g.
                 16) for long contexts. Without it, stats() still reports the always-on, free estimate "cpu_mass_share"
                 (the share of the merged attention mass that came from the retrieved CPU keys, averaged over every
                 8th decode step of each layer, starting with the first).
    """

    n_sink: int = 128
    n_window: int = 512
    top_k: int = 100
    index: str = "query_guided"
    ef: int | None = None
    index_params: dict = field(default_factory=dict)
    max_train_queries: int | None = None
    shift_train_queries: float = 0.5
    cpu_dtype: object = None
    async_build: bool | None = None
    decode_during_build: bool = False
    evict_chunk: int = 64
    max_unindexed_tokens: int = 4096
    progress: bool | None = None
    index_sharing: str = "per_query_head"
    mass_probe_every: int = 0
    warm_start: bool = True

    def __post_init__(self):
        import torch

        for name in ("n_sink", "n_window", "max_unindexed_tokens", "mass_probe_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"RetrievalConfig.{name} must be an int >= 0, got {v!r}")
        for name in ("top_k", "evict_chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RetrievalConfig.{name} must be an int >= 1, got {v!r}")
        if self.ef is not None and (isinstance(self.ef, bool) or not isinstance(self.ef, int) or self.ef < 1):
            raise ValueError(f"RetrievalConfig.ef must be None (automatic beam) or an int >= 1, got {self.ef!r}")
        if self.n_sink + self.n_window < 1:
            raise ValueError("RetrievalConfig: n_sink + n_window must be >= 1 (the newest token stays on the device)")
        if self.index not in INDEX_TYPES:
            raise ValueError(f"RetrievalConfig.index must be one of {INDEX_TYPES}, got {self.index!r}")
        if self.index_sharing not in INDEX_SHARING:
            raise ValueError(f"RetrievalConfig.index_sharing must be one of {INDEX_SHARING}, got {self.index_sharing!r}")
        if not isinstance(self.index_params, dict):
            raise TypeError(f"RetrievalConfig.index_params must be a dict, got {type(self.index_params).__name__}")
        from ._ext import _C  # the C++ build's own parameter check: unknown names, types and ranges fail here, not at prefill

        try:
            _C.check_index_params(self.index, self.index_params)
        except (TypeError, ValueError) as e:
            raise type(e)(f"RetrievalConfig.index_params: {e}") from None
        if self.max_train_queries is not None and (
            isinstance(self.max_train_queries, bool) or not isinstance(self.max_train_queries, int) or self.max_train_queries < 1
        ):
            raise ValueError(f"RetrievalConfig.max_train_queries must be None or an int >= 1, got {self.max_train_queries!r}")
        if self.cpu_dtype is not None and self.cpu_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"RetrievalConfig.cpu_dtype must be None, torch.float32, float16 or bfloat16, got {self.cpu_dtype!r}")

        if self.progress is not None and not isinstance(self.progress, bool):
            raise TypeError(f"RetrievalConfig.progress must be None or a bool, got {self.progress!r}")
        if self.async_build is not None and not isinstance(self.async_build, bool):
            raise TypeError(f"RetrievalConfig.async_build must be None or a bool, got {self.async_build!r}")
        share = self.shift_train_queries
        if not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:  # bools count as 1 and 0
            raise TypeError(f"RetrievalConfig.shift_train_queries must be a number in [0, 1] (a share), got {share!r}")
        if not isinstance(self.warm_start, bool):
            raise TypeError(f"RetrievalConfig.warm_start must be a bool, got {self.warm_start!r}")
        if not isinstance(self.decode_during_build, bool):
            raise TypeError(f"RetrievalConfig.decode_during_build must be a bool, got {self.decode_during_build!r}")
        if self.decode_during_build and self.async_build is False:
            raise ValueError("RetrievalConfig.decode_during_build needs background builds (async_build None or True)")

    def search_beam(self, cpu_tokens: int) -> int:
        """The graph search's beam for a layer holding `cpu_tokens` CPU keys: `ef` when set, else
        cpu_tokens / EF_AUTO_KEYS_PER_SLOT clamped to [EF_AUTO_MIN, EF_AUTO_MAX]."""
        if self.ef is not None:
            return self.ef
        return max(EF_AUTO_MIN, min(EF_AUTO_MAX, cpu_tokens // EF_AUTO_KEYS_PER_SLOT))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cpu_dtype"] = None if self.cpu_dtype is None else str(self.cpu_dtype)
        return d
