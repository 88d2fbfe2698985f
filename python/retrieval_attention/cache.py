"""RetrievalCache: a transformers Cache whose layers keep a static set on the model's device and the rest on the CPU.

Per decoder layer (RetrievalLayer):
  * prefill: the whole prompt's K/V are returned for exact attention; then `finish_prefill(query)` keeps the first
    `n_sink` and last `n_window` tokens on the device, moves the rest to a C++ OffloadedLayer on the CPU and builds
    one index per (batch, query head) from the prefill queries (or, with index_sharing="per_kv_head", one per
    (batch, kv head) from its GQA group's pooled prefill queries).
  * decode: new tokens join the device window; tokens pushed out of it are appended to the CPU store and inserted
    into the indexes. Attention = exact attention over the static set (device) merged by log-sum-exp with exact
    attention over the top_k keys each head's index retrieves on the CPU.
Positions are never lost: get_seq_length() counts every token seen.

Persistence: after prefill, `cache.save(dir)` writes every layer's static set, CPU stores and built indexes plus a
manifest (config, model shape, token count, format version, SHA-256 per file); `RetrievalCache.load(dir, model_config)`
validates all of it and returns a cache that continues exactly as the saved one would (e.g. one copy per question about
a long document, without re-reading it).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
import weakref

import torch

from . import _ext
from ._version import __version__
from .compat import Cache, CacheLayerMixin, model_attention_shape, rope_inv_freq, warn_if_rope_parameters_ignored
from .config import RetrievalConfig
from .index import build_key_lists, exact_knn, projection_fits, projection_lists, rope_shift, shifted_rows
from .ops import dense_attention_any_device, merge_attention_any_device

logger = logging.getLogger("retrieval_attention")

CPU_SHARE_EVERY = 8  # decode steps between two samples of the free "cpu_mass_share" estimate, per layer

_PROGRESS_LOCK = threading.Lock()


def _progress_by_default(cpu_tokens: int) -> bool:
    """RetrievalConfig.progress=None: a bar for prompts of 8K+ CPU tokens, where someone watches (a terminal, or a
    Jupyter kernel, whose stderr is no tty but whose tqdm.auto bar is a widget)."""
    return cpu_tokens >= 8192 and (sys.stderr.isatty() or "ipykernel" in sys.modules)


_EXECUTORS = {}


def _to_host(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t as a contiguous CPU tensor (of `dtype` if given). From a GPU: an asynchronous copy into page-locked memory
    (torch's cached host blocks, reused layer after layer), several times the bandwidth of a copy to pageable memory
    and without a device sync; the caller records an event that readers wait for."""
    dtype = dtype or t.dtype
    if not t.is_cuda:
        return t.to("cpu", dtype).contiguous()
    host = torch.empty(t.shape, dtype=dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _background(name: str):
    """One background thread per kind of work: "ra-store" moves each layer's CPU rows into the C++ stores, "ra-index-build"
    builds the indexes, layers one after another, each using all OpenMP threads. Separate threads, so that a layer's
    rows are stored (and searchable) while earlier layers' indexes are still being built."""
    if name not in _EXECUTORS:
        _EXECUTORS[name] = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    return _EXECUTORS[name]


# -- saved caches -----------------------------------------------------------------------------------------------------
_MANIFEST = "manifest.json"
_FORMAT = "retrieval_attention.RetrievalCache"
_FORMAT_VERSION = 1
# RetrievalConfig fields that shaped a saved cache's state; a loaded cache must keep them.
_STRUCTURAL_FIELDS = ("n_sink", "n_window", "index", "index_params", "index_sharing", "max_train_queries", "cpu_dtype")
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dtype(name, path: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"corrupt manifest in saved cache {path}: unknown dtype {name!r}")
    return _DTYPES[name]


def _read_manifest(path: str) -> dict:
    file = os.path.join(path, _MANIFEST)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no saved RetrievalCache at {path} (not a directory)")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no saved RetrievalCache at {path}: {_MANIFEST} is missing")
    try:
        with open(file) as f:
            outer = json.load(f)
        manifest = outer["manifest"]
        body = json.dumps(manifest, indent=1, sort_keys=True)
        ok = hashlib.sha256(body.encode()).hexdigest() == outer["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"corrupt manifest in saved cache {path}: {exc}") from None
    if not ok:
        raise ValueError(f"corrupt manifest in saved cache {path}: checksum mismatch")
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a saved RetrievalCache (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"saved cache {path} has format version {manifest.get('format_version')!r}; this version of "
                         f"retrieval_attention reads version {_FORMAT_VERSION}")
    for key in ("retrieval_config", "model", "batch", "kv_dtype", "cpu_dtype", "seen_tokens", "layers"):
        if key not in manifest:
            raise ValueError(f"corrupt manifest in saved cache {path}: {key!r} is missing")
    return manifest


def _config_from_dict(d, path: str) -> RetrievalConfig:
    if not isinstance(d, dict):
        raise ValueError(f"corrupt manifest in saved cache {path}: retrieval_config is not a mapping")
    d = dict(d)
    if d.get("cpu_dtype") is not None:
        d["cpu_dtype"] = _dtype(d["cpu_dtype"], path)
    try:
        return RetrievalConfig(**d)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"saved cache {path} has an invalid retrieval_config: {exc}") from None


class RetrievalLayer(CacheLayerMixin):
    """One decoder layer's cache. Tensors on the device: keys/values (batch, kv_heads, static_tokens, head_dim)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cfg: RetrievalConfig, q_heads: int, kv_heads: int, head_dim: int, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.q_heads, self.kv_heads, self.head_dim, self.layer_idx = q_heads, kv_heads, head_dim, layer_idx
        self._host_buffers = {}  # page-locked staging buffers of GPU decoding, reused across steps
        self._copy_event = None  # marks the end of the query's device-to-host copy (GPU decoding)
        self._copy_stream = None  # the stream of the previous step's copies (GPU decoding)
        # the model's RoPE inverse frequencies when training queries are moved to the decode position, and the share of
        # them moved (RetrievalConfig.shift_train_queries; both set by RetrievalCache from the model config); None / 0.0
        # when none are
        self.rope_inv_freq = None
        self.train_shift_share = 0.0
        self._reset_state()

    def _reset_state(self):
        self.keys = self.values = None
        self.is_initialized = False
        self.phase = "empty"  # -> "prefill_pending" (after the prompt's update) -> "decode" (after finish_prefill)
        self.seen = 0
        self.n_sink_kept = 0
        self.offloaded = None
        self.build_seconds = 0.0
        self.indexed_at = None  # time.perf_counter() when this layer's CPU indexes were last made (None: not yet)
        self._knn_events = []  # per prefill, (part, CUDA event at its end) of the device kNN: see knn_part_seconds
        self.offload_seconds = 0.0  # the prompt's CPU part leaving the device at prefill (on the critical path)
        self.build_wait_seconds = 0.0  # decode time spent waiting for an asynchronous build to finish
        self.last_visited_mean = 0.0
        self.steps = 0
        self.visited_sum = 0.0
        self.cpu_candidates_sum = 0.0
        # attention-mass bookkeeping (see stats()): the always-on CPU share is summed on the model's device (no sync)
        self._cpu_share_sum = None
        self.cpu_share_steps = 0
        self.mass_probes = 0
        self._recovered_sum = 0.0
        self._recovered_count = 0
        self._recovered_min = None
        self._build_future = None  # the background index build (it starts once the store thread has stored the rows)
        self._rows_future = None  # with decode_during_build: the store thread's job; done = decoding may start
        self.on_built = getattr(self, "on_built", None)  # set by RetrievalCache: progress reporting
        self.static_pad = self.cpu_pad = None  # (batch,) pad tokens at the front of the static set / CPU ids

    # -- transformers CacheLayerMixin interface -------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch = key_states.shape[0]
        if key_states.shape[1] != self.kv_heads or key_states.shape[-1] != self.head_dim:
            raise ValueError(
                f"layer {self.layer_idx}: key states of shape {tuple(key_states.shape)} do not match the cache's "
                f"(batch, {self.kv_heads}, tokens, {self.head_dim}); was the cache built from this model's config?"
            )
        self.cpu_dtype = self.cfg.cpu_dtype or (self.dtype if self.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.batch:
            raise ValueError(f"batch size changed from {self.batch} to {key_states.shape[0]} within one RetrievalCache")
        if self.phase == "empty":
            self.keys, self.values = key_states, value_states
            self.phase = "prefill_pending"
        elif self.phase == "prefill_pending":
            raise RuntimeError(
                "RetrievalCache was updated twice without the retrieval attention function running in between: load the model "
                "with attn_implementation='retrieval_attention' or call retrieval_attention.enable(model, cfg)."
            )
        else:
            self._evict_overflow()
            self._append_static(key_states.to(self.dtype), value_states.to(self.dtype))
        self.seen += key_states.shape[-2]
        # The attention function finds this layer through the key tensor it is handed.
        self.keys._ra_layer = weakref.ref(self)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, *args, **kwargs):
        query_length = args[0] if args else kwargs.get("query_length", kwargs.get("cache_position"))
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.seen + int(query_length), 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5 name of get_max_length
        return -1

    def reset(self) -> None:
        if getattr(self, "_build_future", None) is not None:
            self._build_future.result()
        self._reset_state()

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("RetrievalCache does not support beam search (reorder_cache)")

    def crop(self, max_length):
        raise NotImplementedError("RetrievalCache cannot be cropped (assisted decoding is not supported)")

    def batch_repeat_interleave(self, repeats):
        raise NotImplementedError("RetrievalCache does not support expanding the batch after prefill")

    def batch_select_indices(self, indices):
        raise NotImplementedError("RetrievalCache does not support selecting batch rows")

    def offload(self):  # the CPU part is already offloaded; the static set stays on the device
        pass

    def prefetch(self):
        pass

    # -- retrieval ---------------------------------------------------------------------------------------------
    @property
    def cpu_tokens(self) -> int:
        self._wait_for_rows()
        return 0 if self.offloaded is None else self.offloaded.size

    @property
    def static_tokens(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def _flat_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(batch, heads, tokens, dim) -> (batch * heads, tokens, dim): every batch row gets its own heads."""
        return t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3])

    def _to_cpu(self, t: torch.Tensor) -> torch.Tensor:
        return self._flat_heads(t).to("cpu", self.cpu_dtype).contiguous()

    def _prompt_to_cpu(self, t: torch.Tensor) -> torch.Tensor:
        """The prompt's CPU part (batch, kv_heads, n, d) -> (batch*kv_heads, n, d) on the CPU (see _to_host)."""
        return _to_host(self._flat_heads(t), self.cpu_dtype)

    def finish_prefill(self, query: torch.Tensor, left_padding: torch.Tensor | None = None) -> None:
        """Split the prompt's KV into the static set and the CPU part, and build the CPU indexes.

        left_padding (batch,) int64: leading pad tokens per row; they stay masked in the static set and are never
        retrieved from the CPU."""
        t0 = time.perf_counter()
        T = self.keys.shape[-2]
        cfg = self.cfg
        n_sink = min(cfg.n_sink, T)
        cpu_end = max(n_sink, T - cfg.n_window)
        if left_padding is not None:
            pad = left_padding.clamp(0, T)
            # pads are a prefix of positions; static positions are [0, n_sink) then [cpu_end, T)
            self.static_pad = pad.clamp(max=n_sink) + (pad - cpu_end).clamp(min=0)
            self.cpu_pad = (pad.clamp(max=cpu_end) - n_sink).clamp(min=0)
        cpu_k, cpu_v = self.keys[:, :, n_sink:cpu_end], self.values[:, :, n_sink:cpu_end]
        if cfg.index == "flat":
            train = query.new_zeros((query.shape[0] * query.shape[1], 0, query.shape[-1]), device="cpu", dtype=torch.float32)
        else:
            q = query
            pos = torch.arange(q.shape[2], device=q.device)  # the queries' places in the prompt
            if cfg.max_train_queries is not None and q.shape[2] > cfg.max_train_queries:
                pos = torch.linspace(0, q.shape[2] - 1, cfg.max_train_queries, device=q.device).round().long()
                q = q[:, :, pos]
            if self.rope_inv_freq is not None and self.train_shift_share > 0:
                # a share of the queries moved to the first decode position, so that they score the keys from the
                # relative positions a decode query has to them (RetrievalConfig.shift_train_queries); a shift of 0
                # leaves the others exactly as they are
                moved = shifted_rows(pos.numel(), self.train_shift_share, pos.device)
                q = rope_shift(q, torch.where(moved, query.shape[2] - pos, 0), self.rope_inv_freq)
            train = _to_host(self._flat_heads(q), torch.float32)
        self.offloaded = _ext._C.OffloadedLayer(
            self.cpu_dtype, self.batch * self.q_heads, self.batch * self.kv_heads, self.head_dim, self.values.shape[-1], cfg.index,
            dict(cfg.index_params), cfg.max_unindexed_tokens, cfg.index_sharing,
        )
        self.offloaded.warm_start = cfg.warm_start
        if self.cpu_pad is not None:
            self.offloaded.set_min_ids(self.cpu_pad.repeat_interleave(self.kv_heads))
        run_async = cfg.async_build if cfg.async_build is not None else self.keys.is_cuda
        # decode_during_build: decoding need not wait for a background build: once the rows are stored, the CPU part
        # answers by exact scans until the indexes are installed. Subclasses with their own cpu_retrieve_attend
        # (research baselines) and on_cpu_tokens hook see the layer only when it is complete.
        serve_early = run_async and cfg.decode_during_build and type(self).cpu_retrieve_attend is RetrievalLayer.cpu_retrieve_attend
        knn = key_knn = proj = None
        if self.keys.is_cuda and cfg.index == "query_guided" and cpu_end > n_sink and train.shape[1] > 0:
            # bipartite kNN on the GPU: only neighbour id lists go to the CPU graph build
            params = _ext._C.resolved_index_params(cfg.index, cfg.index_params)
            marks = []  # (part, CUDA event at its end): knn_seconds and knn_part_seconds

            def mark(part):
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                marks.append((part, event))

            mark("start")
            flat_k = self._flat_heads(cpu_k)
            knn = exact_knn(flat_k, self._flat_heads(q), params["k_train"])
            mark("bipartite")
            # The graphs' projections too (the largest phase of the CPU builds; from the rows as the CPU will hold
            # them) when decoding waits for the builds: 14-34% shorter builds for about 0.07 s more GPU per 8B layer at
            # 128K. With decode_during_build the first token comes right after the prefill, so nothing is added to it
            # (docs/TUNING.md, "Build speed").
            per_index = knn.view(flat_k.shape[0], -1, knn.shape[-1]) if cfg.index_sharing == "per_kv_head" else knn
            if not serve_early and projection_fits(flat_k.shape, per_index.shape, params["n_pivots"]):
                proj = projection_lists(flat_k.to(self.cpu_dtype), per_index, params["n_pivots"], params["degree"])
            mark("projection")
            # each key's ef_weak nearest keys (among every KEY_LIST_COLUMN_STRIDE-th key), from which the graph links the
            # keys its projection leaves weak instead of searching for each on the CPU: 3.5x faster 128K builds for
            # about 0.24 s more prefill per 8B layer on an H200 (docs/TUNING.md, "Build speed"), with or without
            # decode_during_build
            key_knn = build_key_lists(self._flat_heads(cpu_k), params["ef_weak"])
            mark("key_lists")
            knn, proj = _to_host(knn), _to_host(proj) if proj is not None else None
            key_knn = _to_host(key_knn) if key_knn is not None else None
            mark("copies")
            self._knn_events.append(marks)
        n_cpu = cpu_end - n_sink
        t_off = time.perf_counter()
        cpu_k, cpu_v, copied = self._prompt_to_cpu(cpu_k), self._prompt_to_cpu(cpu_v), None
        if self.keys.is_cuda:
            # the rows, training queries and id lists are still being copied: the store thread waits for this event
            # while the device goes on with the next layers; nothing in the prefill waits for the device
            copied = torch.cuda.Event()
            copied.record()
        self.offload_seconds += time.perf_counter() - t_off
        self._set_static(
            torch.cat([self.keys[:, :, :n_sink], self.keys[:, :, cpu_end:]], dim=-2),
            torch.cat([self.values[:, :, :n_sink], self.values[:, :, cpu_end:]], dim=-2),
        )
        self.n_sink_kept = n_sink
        self.phase = "decode"
        self.build_seconds += time.perf_counter() - t0

        def store():
            nonlocal cpu_k, cpu_v, train, knn, key_knn, proj
            t1 = time.perf_counter()
            if copied is not None:
                copied.synchronize()
            # C++, GIL released: rows only
            self.offloaded.build(cpu_k, cpu_v, train, knn, index_now=False, key_knn=key_knn, projection=proj)
            if copied is not None:
                # the layer holds copies of all of it now; a subclass's on_cpu_tokens gets ordinary memory, and the
                # page-locked blocks go back to torch's host cache for the next layer
                hook = type(self).on_cpu_tokens is not RetrievalLayer.on_cpu_tokens
                cpu_k, cpu_v, train = (cpu_k.clone(), cpu_v.clone(), train.clone()) if hook else (None, None, None)
                knn = key_knn = proj = None
            self.build_seconds += time.perf_counter() - t1

        def build(rows):
            if rows is not None:
                rows.result()  # re-raises a failure to store the rows
            t1 = time.perf_counter()
            self._make_indexes()
            self.on_cpu_tokens(cpu_k, cpu_v, train)
            self.indexed_at = time.perf_counter()
            self.build_seconds += self.indexed_at - t1
            logger.info("layer %d: %d CPU tokens indexed (%s) in %.2f s", self.layer_idx, n_cpu, cfg.index,
                        time.perf_counter() - t1)
            if self.on_built is not None:
                self.on_built(n_cpu)

        if run_async:
            # The graphs of layer l are built on the CPU while the GPU computes layers l+1, l+2, ... and, with
            # decode_during_build, while decoding runs (_wait_for_rows).
            rows = _background("ra-store").submit(store)
            self._build_future = _background("ra-index-build").submit(build, rows)
            self._rows_future = rows if serve_early else None
        else:
            store()
            build(None)

    @property
    def knn_seconds(self) -> float:
        """GPU time of the prefill's device kNN (bipartite and key-to-key lists, and the graphs' projections when it makes
        them; their copies to the host included), from CUDA events: the prefill does not wait for the kNN, so its host
        time would not show it. knn_part_seconds splits it."""
        return sum(self.knn_part_seconds.values())

    @property
    def knn_part_seconds(self) -> dict:
        """knn_seconds by part: "bipartite" (exact_knn), "projection" (projection_lists; 0 when not made), "key_lists"
        (exact_key_knn) and "copies" (the lists into page-locked host memory)."""
        parts = {}
        for marks in self._knn_events:
            marks[-1][1].synchronize()
            for (_, before), (part, after) in zip(marks, marks[1:]):
                parts[part] = parts.get(part, 0.0) + before.elapsed_time(after) / 1e3
        return parts

    def _make_indexes(self) -> None:
        """The index half of a build, after the rows are stored: C++ with the GIL released; searches run meanwhile."""
        self.offloaded.build_indexes()

    def _wait_for_rows(self) -> None:
        """Waits until the CPU part can answer: its rows stored (decoding during the index build) or, without that,
        the whole build done."""
        if self._rows_future is not None and self._build_future is not None and not self._build_future.done():
            t0 = time.perf_counter()
            try:
                self._rows_future.result()  # re-raises a failure to store the rows
            finally:
                self.build_wait_seconds += time.perf_counter() - t0
            return
        self._wait_for_build()

    def _wait_for_build(self) -> None:
        future, self._build_future = self._build_future, None
        self._rows_future = None
        if future is not None:
            t0 = time.perf_counter()
            try:
                future.result()  # re-raises a build error here
            finally:
                self.build_wait_seconds += time.perf_counter() - t0

    @property
    def building(self) -> bool:
        """True while this layer's indexes are being built in the background (decoding scans its CPU rows exactly)."""
        return self._build_future is not None and not self._build_future.done()

    # -- the static set lives in preallocated device buffers: appending a token writes in place --------------
    def _set_static(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[-2]
        cap = max(n, self.cfg.n_sink + self.cfg.n_window) + self.cfg.evict_chunk + 8
        self._kbuf = keys.new_empty(keys.shape[:2] + (cap, keys.shape[-1]))
        self._vbuf = values.new_empty(values.shape[:2] + (cap, values.shape[-1]))
        self._kbuf[:, :, :n] = keys
        self._vbuf[:, :, :n] = values
        self._set_len(n)

    def _set_len(self, n: int) -> None:
        self._len = n
        self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]

    def _append_static(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        t, n = keys.shape[-2], self._len
        if n + t > self._kbuf.shape[-2]:  # e.g. a long second prompt chunk: grow once
            self._set_static(torch.cat([self.keys, keys], dim=-2), torch.cat([self.values, values], dim=-2))
            return
        self._kbuf[:, :, n : n + t] = keys
        self._vbuf[:, :, n : n + t] = values
        self._set_len(n + t)

    def _evict_overflow(self) -> None:
        """Before new tokens arrive, shrink the window back to n_window once it has grown by evict_chunk tokens:
        the oldest window tokens become sinks while there are fewer than n_sink, the rest move to the CPU index.
        While the CPU indexes are still being built, the window keeps growing instead (appending would wait for the
        build); the overflow moves once the build is done."""
        if self.building and self._rows_future is not None:
            return
        self._wait_for_build()
        window = self.keys.shape[-2] - self.n_sink_kept
        if window < self.cfg.n_window + self.cfg.evict_chunk:
            return
        overflow = window - self.cfg.n_window
        promote = min(self.cfg.n_sink - self.n_sink_kept, overflow)
        self.n_sink_kept += promote
        overflow -= promote
        if overflow <= 0:
            return
        s = self.n_sink_kept
        if self.static_pad is not None and bool((self.static_pad > s).any()):
            # pad tokens among the evicted ones (tiny, heavily padded prompts) stay excluded on the CPU side
            moved_pads = (self.static_pad - s).clamp(0, overflow)
            self.static_pad = self.static_pad - moved_pads
            self.cpu_pad = self.cpu_pad + moved_pads
            self.offloaded.set_min_ids(self.cpu_pad.repeat_interleave(self.kv_heads))
        t0 = time.perf_counter()
        moved_k, moved_v = self._to_cpu(self.keys[:, :, s : s + overflow]), self._to_cpu(self.values[:, :, s : s + overflow])
        self.offloaded.append(moved_k, moved_v)
        self.on_cpu_tokens(moved_k, moved_v, None)
        self.build_seconds += time.perf_counter() - t0
        n = self._len
        self._kbuf[:, :, s : n - overflow] = self._kbuf[:, :, s + overflow : n].clone()  # source and target overlap
        self._vbuf[:, :, s : n - overflow] = self._vbuf[:, :, s + overflow : n].clone()
        self._set_len(n - overflow)

    def decode_attention(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query (batch, q_heads, m, d) -> attention output (batch, m, q_heads, dv) in the query dtype."""
        B, H, m, d = query.shape
        n_cpu = self.cpu_tokens
        key_start = None if self.static_pad is None else self.static_pad.repeat_interleave(self.kv_heads)
        keys, values = self._flat_heads(self.keys), self._flat_heads(self.values)
        builtin = type(self).cpu_retrieve_attend is RetrievalLayer.cpu_retrieve_attend
        if n_cpu and builtin and (query.device.type == "cpu" or _ext.HAS_CUDA_KERNELS):
            # the built-in retrieval: one C++ call copies the query, queues the static attention, searches and attends on
            # the CPU while the device works, and queues the merge, whose kernel reads the CPU results from page-locked
            # memory in place (OffloadedLayer.decode_step)
            static = None
            if key_start is not None:  # left padding: the kernels do not mask it, the torch math below does
                static = dense_attention_any_device(query.reshape(B * H, m, d), keys, values, scaling, causal=True, key_start=key_start)
            out, lse, lse_c, q_host, visited = self.offloaded.decode_step(
                query, keys, values, scaling, self.cfg.top_k, self.cfg.search_beam(self.offloaded.size),
                *(static if static is not None else (None, None)))
            self._account_cpu_part(lse, lse_c, visited / (B * H * m), n_cpu, lambda: q_host.float(), scaling)
            self.steps += 1
            return out
        q = query.reshape(B * H, m, d)
        # Start the query's copy to the CPU, then launch the device's static attention (asynchronous on a GPU), so the
        # CPU search below overlaps the device work.
        staged = self.query_to_host(q) if n_cpu else None
        out, lse = dense_attention_any_device(q, keys, values, scaling, causal=True, key_start=key_start)
        if n_cpu:
            q_cpu = self.wait_query(staged)  # waits for the query's copy only, not for the static attention queued after it
            out_c, lse_c, visited = self.cpu_retrieve_attend(q_cpu, scaling)
            out_c_dev, lse_c_dev = self.results_to_device(out_c, lse_c, out.device)
            self._account_cpu_part(lse, lse_c, float(visited.double().mean()), n_cpu, lambda: q_cpu, scaling)
            out, lse = merge_attention_any_device(out, lse, out_c_dev, lse_c_dev)
        self.steps += 1
        return out.reshape(B, H, m, -1).transpose(1, 2).to(query.dtype)

    def _account_cpu_part(self, lse_static, lse_c, visited_mean: float, n_cpu: int, q_cpu_fn, scaling: float) -> None:
        """decode_attention's statistics of the CPU part: keys scored, the CPU share of the attention mass (every
        CPU_SHARE_EVERY-th step) and the mass probe (every mass_probe_every-th step; q_cpu_fn() -> the float32 query).
        lse_c: the CPU part's lse on the CPU (from decode_step on a GPU: a page-locked buffer that the next step rewrites)."""
        if self.steps % CPU_SHARE_EVERY == 0:
            # Share of the merged attention mass that came from the CPU keys, exp(lse_cpu - lse) = sigmoid(lse_cpu -
            # lse_static): a copy and a few element-wise ops on (heads, m) tensors, accumulated on the device without a
            # sync, on every CPU_SHARE_EVERY-th step only (each op is a kernel launch on a GPU, per layer and token).
            # The copy is queued before the next step's query copy, which the next CPU part waits for.
            lse_c_dev = lse_c.to(lse_static.device, non_blocking=True)
            share = torch.sigmoid(lse_c_dev - lse_static.float()).mean()
            self._cpu_share_sum = share if self._cpu_share_sum is None else self._cpu_share_sum + share
            self.cpu_share_steps += 1
        every = self.cfg.mass_probe_every
        if every and self.steps % every == 0:
            self._probe_mass(q_cpu_fn(), scaling, lse_static, lse_c)
        self.last_visited_mean = visited_mean
        self.visited_sum += visited_mean
        self.cpu_candidates_sum += n_cpu

    def _host_buffer(self, name: str, shape, dtype=torch.float32) -> torch.Tensor:
        buf = self._host_buffers.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
            buf = torch.empty(tuple(shape), dtype=dtype, pin_memory=True)
            self._host_buffers[name] = buf
        return buf

    def query_to_host(self, q: torch.Tensor):
        """Starts moving q (rows, m, d) from the model's device to the CPU; wait_query(result) gives the float32 CPU
        tensor. On a GPU, q is copied in its own dtype to a reused page-locked buffer without blocking (no widening
        kernel on the device: the CPU widens the few values), and one reused event marks the copy's end. The buffers
        are overwritten by this layer's next decode step."""
        if not q.is_cuda:
            return q.to("cpu", torch.float32), None
        stream = torch.cuda.current_stream(q.device)
        if self._copy_stream is not None and self._copy_stream != stream:
            # the previous step's results copy may still read the reused buffer on that stream: let it end first
            self._copy_stream.synchronize()
        self._copy_stream = stream
        host = self._host_buffer("q_staged", q.shape, q.dtype)
        host.copy_(q, non_blocking=True)
        if self._copy_event is None:
            self._copy_event = torch.cuda.Event()
        self._copy_event.record()
        return host, self._copy_event

    def _wait_staged(self, staged) -> torch.Tensor:
        """-> the CPU tensor of query_to_host in the query's dtype, once its copy has finished."""
        host, ready = staged
        if ready is not None:
            ready.synchronize()
        return host

    def wait_query(self, staged) -> torch.Tensor:
        """-> the query of query_to_host as a float32 CPU tensor (rows, m, d), once its copy has finished."""
        host = self._wait_staged(staged)
        if host.dtype == torch.float32:
            return host
        return self._host_buffer("q", host.shape).copy_(host)

    def results_to_device(self, out_c: torch.Tensor, lse_c: torch.Tensor, device):
        """The CPU part's (out (rows, m, dv), lse (rows, m)) -> the model's device. On a GPU both go in one
        asynchronous copy of one reused page-locked buffer (out then lse), ordered before the merge on the same
        stream; the next step's query copy waits for it before the buffer is written again."""
        if device.type != "cuda":
            return out_c.to(device), lse_c.to(device)
        n_out = out_c.numel()
        flat = self._host_buffer("results", (n_out + lse_c.numel(),))
        flat[:n_out].view(out_c.shape).copy_(out_c)
        flat[n_out:].view(lse_c.shape).copy_(lse_c)
        return self._results_on_device(flat, *lse_c.shape, device)

    @staticmethod
    def _results_on_device(flat: torch.Tensor, rows: int, m: int, device):
        """flat = out (rows, m, dv) then lse (rows, m), float32 on the CPU -> both on `device`, in one asynchronous
        copy on a GPU (flat is then the page-locked results buffer)."""
        dev = flat.to(device, non_blocking=True) if device.type == "cuda" else flat
        n_out = flat.numel() - rows * m
        return dev[:n_out].view(rows, m, -1), dev[n_out:].view(rows, m)

    def exact_cpu_lse(self, q_cpu: torch.Tensor, scaling: float) -> torch.Tensor:
        """q_cpu (batch*q_heads, m, d) float32 -> (batch*q_heads, m) float32: the exact log-sum-exp of the scaled scores
        over *all* of this layer's CPU keys (left-padding rows excluded), by one flat pass over a copy of the keys."""
        keys = self.offloaded.keys()  # (batch*kv_heads, n, d) in the CPU storage dtype
        hkv, n, d = keys.shape
        rows, m, _ = q_cpu.shape
        group = rows // hkv
        scores = torch.matmul(q_cpu.reshape(hkv, group * m, d).float(), keys.float().transpose(1, 2))
        scores.mul_(scaling)
        if self.cpu_pad is not None:
            start = self.cpu_pad.repeat_interleave(self.kv_heads)
            scores.masked_fill_(torch.arange(n)[None, None, :] < start[:, None, None], float("-inf"))
        return torch.logsumexp(scores, dim=-1).reshape(rows, m)

    def _probe_mass(self, q_cpu: torch.Tensor, scaling: float, lse_static: torch.Tensor, lse_retrieved: torch.Tensor) -> None:
        """RetrievalConfig.mass_probe_every: the share of the true attention mass (static set + every CPU key) that the
        static set plus the retrieved keys captured, per (head, query) of this step."""
        ls = lse_static.detach().to("cpu", torch.float32)
        lr = lse_retrieved.to(torch.float32)
        lse_all = self.exact_cpu_lse(q_cpu, scaling)
        recovered = torch.exp(torch.logaddexp(ls, lr) - torch.logaddexp(ls, lse_all))
        self.mass_probes += 1
        self._recovered_sum += float(recovered.double().sum())
        self._recovered_count += recovered.numel()
        low = float(recovered.min())
        self._recovered_min = low if self._recovered_min is None else min(self._recovered_min, low)

    # -- hooks for research baselines (subclass RetrievalLayer, pass layer_class= to RetrievalCache) ------------
    def on_cpu_tokens(self, keys: torch.Tensor, values: torch.Tensor, train_queries) -> None:
        """Called with (batch*kv_heads, t, d) CPU tensors each time tokens move to the CPU (train_queries at prefill)."""

    def cpu_retrieve_attend(self, q_cpu: torch.Tensor, scaling: float):
        """q_cpu (batch*q_heads, m, d) float32 -> (out, lse, visited) over the CPU tokens. q_cpu may be a reused
        staging buffer: copy it if it must outlive the call."""
        return self.offloaded.retrieve_attend(q_cpu, self.cfg.top_k, self.cfg.search_beam(self.offloaded.size), scaling)

    # -- persistence (RetrievalCache.save / RetrievalCache.load) -------------------------------------------------
    def _save_files(self, directory: str, stem: str) -> dict:
        """Writes this layer's static set (torch file) and CPU part (C++ offloaded-layer file); returns its manifest entry."""
        self._wait_for_build()
        if self.phase != "decode":
            raise RuntimeError(f"layer {self.layer_idx}: save() needs a cache after prefill (layer phase is {self.phase!r})")
        static = {
            "keys": self.keys.detach().to("cpu").contiguous(),
            "values": self.values.detach().to("cpu").contiguous(),
            "static_pad": self.static_pad,
            "cpu_pad": self.cpu_pad,
        }
        static_file, cpu_file = f"{stem}.static.pt", f"{stem}.cpu"
        torch.save(static, os.path.join(directory, static_file))
        self.offloaded.save(os.path.join(directory, cpu_file))
        return {
            "layer": self.layer_idx,
            "seen": self.seen,
            "n_sink_kept": self.n_sink_kept,
            "static_tokens": self.static_tokens,
            "cpu_tokens": self.offloaded.size,
            "value_dim": int(self.values.shape[-1]),
            "static_file": static_file,
            "static_sha256": _sha256(os.path.join(directory, static_file)),
            "cpu_file": cpu_file,
            "cpu_sha256": _sha256(os.path.join(directory, cpu_file)),
        }

    def _restore(self, directory: str, entry: dict, batch: int, kv_dtype: torch.dtype, cpu_dtype: torch.dtype, device) -> None:
        """Fills this fresh layer from the files named by its manifest entry (checksums verified by the caller)."""
        where = f"{directory} (layer {self.layer_idx})"
        try:
            static = torch.load(os.path.join(directory, entry["static_file"]), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several kinds for a damaged zip/pickle
            raise ValueError(f"corrupt static-set file in saved cache {where}: {exc}") from exc
        if not isinstance(static, dict) or not {"keys", "values", "static_pad", "cpu_pad"} <= set(static):
            raise ValueError(f"corrupt static-set file in saved cache {where}: unexpected content")
        keys, values = static["keys"], static["values"]
        n_static, dv = int(entry["static_tokens"]), int(entry["value_dim"])
        for name, t, last in (("keys", keys, self.head_dim), ("values", values, dv)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch, self.kv_heads, n_static, last) or t.dtype != kv_dtype:
                got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"saved cache {where}: static {name} are {got}, expected "
                                 f"{(batch, self.kv_heads, n_static, last)} {kv_dtype}")
        for name in ("static_pad", "cpu_pad"):
            t = static[name]
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch,) or t.dtype != torch.int64):
                raise ValueError(f"saved cache {where}: {name} must be None or an int64 tensor of shape ({batch},)")
        cfg = self.cfg
        try:
            self.offloaded = _ext._C.OffloadedLayer.load(
                os.path.join(directory, entry["cpu_file"]), cpu_dtype, batch * self.q_heads, batch * self.kv_heads, self.head_dim, dv,
                cfg.index, dict(cfg.index_params), cfg.max_unindexed_tokens, cfg.index_sharing,
            )
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"cannot load the CPU part of saved cache {where}: {exc}") from exc
        self.offloaded.warm_start = cfg.warm_start
        if self.offloaded.size != int(entry["cpu_tokens"]):
            raise ValueError(f"saved cache {where}: CPU part holds {self.offloaded.size} tokens, manifest says {entry['cpu_tokens']}")
        self.device, self.dtype, self.batch, self.cpu_dtype = torch.device(device), kv_dtype, batch, cpu_dtype
        self.is_initialized = True
        self.static_pad, self.cpu_pad = static["static_pad"], static["cpu_pad"]
        self._set_static(keys.to(device), values.to(device))
        self.n_sink_kept = int(entry["n_sink_kept"])
        self.seen = int(entry["seen"])
        self.phase = "decode"

    def wait_for_index(self) -> None:
        """Blocks until this layer's background index build (if any) is done; re-raises its error."""
        self._wait_for_build()

    def stats(self) -> dict:
        """This layer's figures now; does not wait for a background index build ("index_building" says if one runs)."""
        self._wait_for_rows()
        gpu = 0 if self.keys is None else self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return {
            "layer": self.layer_idx,
            "static_tokens": self.static_tokens,
            "cpu_tokens": self.cpu_tokens,
            "scanned_frac": self.visited_sum / self.cpu_candidates_sum if self.cpu_candidates_sum else 0.0,
            "search_beam": self.cfg.search_beam(self.cpu_tokens) if self.cfg.index == "query_guided" else None,
            "index_build_s": self.build_seconds,
            "train_queries_shifted": self.train_shift_share if self.rope_inv_freq is not None and self.cfg.index != "flat" else 0.0,
            "knn_s": self.knn_seconds,
            "knn_parts_s": self.knn_part_seconds,
            "offload_s": self.offload_seconds,
            "index_build_wait_s": self.build_wait_seconds,
            "index_building": self.building,
            "device_kv_bytes": gpu,
            "cpu_kv_bytes": 0 if self.offloaded is None else self.offloaded.vector_bytes,
            "cpu_index_bytes": 0 if self.offloaded is None else self.offloaded.index_bytes,
            "decode_steps": self.steps,
            "cpu_mass_share": float(self._cpu_share_sum) / self.cpu_share_steps if self.cpu_share_steps else 0.0,
            "mass_probes": self.mass_probes,
            "recovered_mass_mean": self._recovered_sum / self._recovered_count if self._recovered_count else None,
            "recovered_mass_min": self._recovered_min,
        }


class RetrievalCache(Cache):
    """A transformers Cache for RetrievalAttention: pass it as `past_key_values` to `generate` or `forward`.

    cache = RetrievalCache(model.config, RetrievalConfig(n_sink=128, n_window=512, top_k=100))
    """

    def __init__(self, config, retrieval_config: RetrievalConfig | None = None, layer_class: type = RetrievalLayer):
        if retrieval_config is None:
            retrieval_config = RetrievalConfig()
        if not isinstance(retrieval_config, RetrievalConfig):
            raise TypeError(f"retrieval_config must be a RetrievalConfig, got {type(retrieval_config).__name__}")
        n_layers, q_heads, kv_heads, head_dim = model_attention_shape(config)
        warn_if_rope_parameters_ignored(config)
        self.retrieval_config = retrieval_config
        if not (isinstance(layer_class, type) and issubclass(layer_class, RetrievalLayer)):
            raise TypeError("layer_class must be a subclass of RetrievalLayer")
        layers = [layer_class(retrieval_config, q_heads, kv_heads, head_dim, i) for i in range(n_layers)]
        share = float(retrieval_config.shift_train_queries)
        inv_freq = rope_inv_freq(config) if share > 0 else None
        if inv_freq is not None and not 0 < 2 * inv_freq.numel() <= head_dim:
            inv_freq = None  # not a rotary layout this package knows: train on the queries as they are
        for layer in layers:
            layer.rope_inv_freq = inv_freq
            layer.train_shift_share = share if inv_freq is not None else 0.0
        super().__init__(layers=layers)
        self._progress = None
        for layer in layers:
            layer.on_built = self._layer_built

    def _layer_built(self, cpu_tokens: int) -> None:
        """A progress bar over the layers' index builds: shown for long prompts on a terminal or in a notebook (RetrievalConfig.progress)."""
        show = self.retrieval_config.progress
        if show is None:
            show = _progress_by_default(cpu_tokens)
        if not show:
            return
        with _PROGRESS_LOCK:
            if self._progress is None:
                from tqdm.auto import tqdm

                self._progress = tqdm(total=len(self.layers), desc="retrieval_attention: building CPU indexes", unit="layer", leave=False)
            self._progress.update(1)
            if self._progress.n >= len(self.layers):
                self._progress.close()
                self._progress = None

    # -- persistence ----------------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Save this cache after prefill (e.g. of a long document) to the directory `path`, so that
        `RetrievalCache.load(path, model.config)` continues from exactly this state without re-reading the document or
        rebuilding the indexes. Written: per layer the static set (sink + window K/V, on any device) and the CPU part
        (key/value stores and the built indexes, one C++ file each with its own checksum), plus manifest.json with the
        RetrievalConfig, the model's attention shape, the token count, a format version and SHA-256 checksums of every
        file. The directory is written under a temporary name and renamed into place, so a failed save leaves no
        half-written cache at `path`; an existing saved cache at `path` is replaced, any other existing path refused."""
        path = os.fspath(path)
        layers = self.layers
        if not layers or any(l.phase != "decode" for l in layers):
            raise RuntimeError("RetrievalCache.save() needs a cache after prefill: run the model on the document first "
                               "(with attn_implementation='retrieval_attention' or ra.enable(model, cfg))")
        if os.path.exists(path) and not os.path.isfile(os.path.join(path, _MANIFEST)):
            raise FileExistsError(f"{path} exists and is not a saved RetrievalCache; refusing to overwrite it")
        first = layers[0]
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        os.makedirs(tmp)
        try:
            entries = [layer._save_files(tmp, f"layer{i:03d}") for i, layer in enumerate(layers)]
            n_layers, q_heads, kv_heads, head_dim = len(layers), first.q_heads, first.kv_heads, first.head_dim
            manifest = {
                "format": _FORMAT,
                "format_version": _FORMAT_VERSION,
                "package_version": __version__,
                "retrieval_config": self.retrieval_config.to_dict(),
                "model": {"num_layers": n_layers, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim},
                "batch": first.batch,
                "kv_dtype": str(first.dtype),
                "cpu_dtype": str(first.cpu_dtype),
                "seen_tokens": first.seen,
                "layers": entries,
            }
            body = json.dumps(manifest, indent=1, sort_keys=True)
            with open(os.path.join(tmp, _MANIFEST), "w") as f:
                json.dump({"sha256": hashlib.sha256(body.encode()).hexdigest(), "manifest": manifest}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            old = None
            if os.path.exists(path):
                old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex}")
                os.rename(path, old)
            os.rename(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path, model_config, retrieval_config: RetrievalConfig | None = None, device=None,
             layer_class: type = RetrievalLayer) -> "RetrievalCache":
        """A cache restored from `save(path)`: generation continues exactly as from the saved cache.

        model_config: the config of the model it will be used with; its attention shape must match the saved one.
        retrieval_config: None uses the saved one. Otherwise settings that shaped the saved state (n_sink, n_window,
            index, index_params, index_sharing, max_train_queries, cpu_dtype) must equal the saved ones; search and
            bookkeeping settings (top_k, ef, evict_chunk, max_unindexed_tokens, progress, async_build, mass_probe_every)
            may differ.
        device: where the static set goes (default "cpu"); the CPU part is always in CPU memory.
        Every file is checked (presence, SHA-256, shapes, dtypes, counts); a missing, corrupt, truncated or mismatched
        save raises FileNotFoundError or ValueError naming the file."""
        path = os.fspath(path)
        manifest = _read_manifest(path)
        stored_cfg = _config_from_dict(manifest["retrieval_config"], path)
        if retrieval_config is None:
            retrieval_config = stored_cfg
        elif not isinstance(retrieval_config, RetrievalConfig):
            raise TypeError(f"retrieval_config must be a RetrievalConfig or None, got {type(retrieval_config).__name__}")
        else:
            differ = [f"{k} (saved {getattr(stored_cfg, k)!r}, given {getattr(retrieval_config, k)!r})"
                      for k in _STRUCTURAL_FIELDS if getattr(stored_cfg, k) != getattr(retrieval_config, k)]
            if differ:
                raise ValueError(f"saved cache {path} was built with a different RetrievalConfig: " + "; ".join(differ))
        n_layers, q_heads, kv_heads, head_dim = model_attention_shape(model_config)
        want = {"num_layers": n_layers, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim}
        got = manifest["model"]
        if not isinstance(got, dict) or any(got.get(k) != v for k, v in want.items()):
            raise ValueError(f"saved cache {path} is for a model with attention shape {got}, this model's is {want}")
        kv_dtype, cpu_dtype = _dtype(manifest["kv_dtype"], path), _dtype(manifest["cpu_dtype"], path)
        batch = manifest["batch"]
        entries = manifest["layers"]
        if not isinstance(batch, int) or batch < 1 or not isinstance(entries, list) or len(entries) != n_layers:
            raise ValueError(f"corrupt manifest in saved cache {path}: batch or layer list invalid")
        cache = cls(model_config, retrieval_config, layer_class=layer_class)
        device = torch.device("cpu" if device is None else device)
        for layer, entry in zip(cache.layers, entries):
            try:
                files = [(entry["static_file"], entry["static_sha256"]), (entry["cpu_file"], entry["cpu_sha256"])]
                for key in ("seen", "n_sink_kept", "static_tokens", "cpu_tokens", "value_dim"):
                    if not isinstance(entry[key], int) or entry[key] < 0:
                        raise ValueError(key)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"corrupt manifest in saved cache {path}: layer entry {layer.layer_idx} is invalid ({exc})") from None
            if entry["seen"] != manifest["seen_tokens"] or entry["static_tokens"] + entry["cpu_tokens"] != entry["seen"]:
                raise ValueError(f"corrupt manifest in saved cache {path}: token counts of layer {layer.layer_idx} do not add up")
            for name, digest in files:
                if not isinstance(name, str) or os.path.basename(name) != name:
                    raise ValueError(f"corrupt manifest in saved cache {path}: bad file name {name!r}")
                full = os.path.join(path, name)
                if not os.path.isfile(full):
                    raise FileNotFoundError(f"saved cache {path} is incomplete: {name} is missing")
                if _sha256(full) != digest:
                    raise ValueError(f"saved cache {path}: {name} is corrupt or truncated (SHA-256 mismatch)")
            layer._restore(path, entry, batch, kv_dtype, cpu_dtype, device)
        return cache

    def stats(self) -> list[dict]:
        """Per-layer figures, one dict per decoder layer:

        layer, static_tokens, cpu_tokens; scanned_frac (CPU keys scored per query head and step / CPU keys);
        search_beam: the graph search's beam at this layer's current CPU tokens (RetrievalConfig.search_beam; None
        for index="flat");
        index_build_s (split at prefill + graph builds + later inserts; host time); train_queries_shifted: the share of the
        graphs' training queries moved to the first decode position (RetrievalConfig.shift_train_queries where the
        package can move the model's RoPE, else 0.0); knn_s: the GPU time of the
        prefill's kNN on the device (bipartite and key-to-key lists, projections, their copies; index_build_s grows
        until the layer's background build is done) and knn_parts_s, the same by part (knn_part_seconds); offload_s:
        the prefill's
        time handing the prompt's CPU part to the CPU (from a GPU the copy is asynchronous, so this is mostly queueing
        it); index_build_wait_s: time decoding waited for a background build (only for its rows to be stored: decoding scans them exactly meanwhile);
        index_building: whether the layer's background index build is still running (stats() does not wait for it;
        wait_for_indexes() does);
        device_kv_bytes, cpu_kv_bytes, cpu_index_bytes;
        decode_steps; cpu_mass_share: mean over heads, queries and decode steps (with CPU tokens) of the share of the merged
        attention mass that came from the retrieved CPU keys, sigmoid(lse_cpu - lse_static) (always on, nearly free);
        mass_probes, recovered_mass_mean, recovered_mass_min: with RetrievalConfig.mass_probe_every > 0, the mean and
        minimum over probed (head, query, step) of the share of the exact attention mass (static set + all CPU keys)
        that the static set plus the retrieved keys captured (1.0: nothing missed; None before the first probe)."""
        return [layer.stats() for layer in self.layers]

    def wait_for_indexes(self) -> None:
        """Blocks until every layer's background index build is done (on a GPU they run during and after the prefill,
        while decoding goes on with exact scans of the layers not yet indexed); re-raises a build's error."""
        for layer in self.layers:
            layer.wait_for_index()

    def summary(self) -> dict:
        s = self.stats()
        cpu = sum(x["cpu_tokens"] for x in s)
        probed = [x["recovered_mass_mean"] for x in s if x["recovered_mass_mean"] is not None]
        return {
            "device_kv_bytes": sum(x["device_kv_bytes"] for x in s),
            "cpu_kv_bytes": sum(x["cpu_kv_bytes"] for x in s),
            "cpu_index_bytes": sum(x["cpu_index_bytes"] for x in s),
            "scanned_frac": sum(x["scanned_frac"] * x["cpu_tokens"] for x in s) / cpu if cpu else 0.0,
            "search_beam": max((x["search_beam"] for x in s if x["search_beam"] is not None), default=None),
            "index_build_s": sum(x["index_build_s"] for x in s),
            "train_queries_shifted": min((x["train_queries_shifted"] for x in s), default=0.0),
            "knn_s": sum(x["knn_s"] for x in s),
            "knn_parts_s": {p: sum(x["knn_parts_s"].get(p, 0.0) for x in s) for p in dict.fromkeys(p for x in s for p in x["knn_parts_s"])},
            "offload_s": sum(x["offload_s"] for x in s),
            "index_build_wait_s": sum(x["index_build_wait_s"] for x in s),
            "index_building_layers": sum(bool(x["index_building"]) for x in s),
            "cpu_mass_share": sum(x["cpu_mass_share"] for x in s) / len(s) if s else 0.0,
            "recovered_mass_mean": sum(probed) / len(probed) if probed else None,
            "recovered_mass_min": min(x["recovered_mass_min"] for x in s if x["recovered_mass_min"] is not None) if probed else None,
        }
