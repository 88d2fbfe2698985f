#!/usr/bin/env python
"""Record the bundled model's post-RoPE queries and keys on a long passkey input (the "model_qk" data set).

    python benchmarks/dump_model_qk.py                    # T=16384 -> benchmarks/results/cache/model_qk_T16384.npz
    python benchmarks/dump_model_qk.py --T 32768 --q-stride 4
    python benchmarks/dump_model_qk.py --T 32768 --decode 64   # + 64 generated tokens -> model_qk_T32768_decode64.npz

The haystack is natural text that exists on any Debian machine with Python: /usr/share/common-licenses/* (GPL, Apache,
Artistic, ... licence texts), then, if more is needed, the .py files of Python's standard library, concatenated in sorted
order. A passkey needle (`The pass key is NNNNN. Remember it. NNNNN is the pass key.`, the model's training format) is
inserted at --depth, and the prompt ends with `\\nWhat is the pass key? The pass key is `.

A recording attention function registered with transformers.AttentionInterface (plus sdpa_mask registered under the
same name with AttentionMaskInterface, without which no causal mask is passed) captures the `query`/`key` states that
reach the attention kernel -- after RoPE, exactly what a KV cache holds -- and then runs SDPA, so the forward pass is
the model's normal one. One prefill forward pass; GPU when available (bf16), else CPU (float32).

Output .npz (float16 vectors; gitignored cache):
    q      [L, Hq, P, d]  queries at positions q_pos (every --q-stride-th position plus always the last 64)
    q_pos  [P] int32
    k      [L, Hkv, T, d] keys at all positions
    tokens [T] int16, needle_span [2], passkey (str), pred (the model's greedy next byte after the prompt),
    meta (json string)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import sysconfig
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import qk_data  # noqa: E402

BOS = 256


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def default_model_path():
    for p in (os.path.join(REPO, "models", "tinyllama-byte-32k"), "/work/shared/models/tinyllama-byte-32k",
              os.path.join(REPO, "..", "shared", "models", "tinyllama-byte-32k")):
        if os.path.exists(os.path.join(p, "config.json")):
            return p
    raise FileNotFoundError("tinyllama-byte-32k not found under models/ (or ../shared/models/)")


def haystack_bytes(n_bytes: int) -> bytes:
    """Deterministic natural text of at least n_bytes (licence texts first, then Python stdlib sources)."""
    files = sorted(f for f in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(f))
    std = sysconfig.get_paths().get("stdlib")
    if std:
        files += sorted(glob.glob(os.path.join(std, "*.py")))
    files += sorted(glob.glob(os.path.join(REPO, "**", "*.md"), recursive=True))
    out, seen = bytearray(), set()
    for f in files:
        real = os.path.realpath(f)
        if real in seen:
            continue
        seen.add(real)
        try:
            b = open(real, "rb").read()
        except OSError:
            continue
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        out += b.replace(b"\x0c", b"") + b"\n\n"
        if len(out) >= n_bytes:
            break
    if len(out) < n_bytes:
        raise RuntimeError(f"only {len(out)} bytes of local text found, need {n_bytes}")
    return bytes(out[:n_bytes])


def build_prompt(T: int, depth: float, passkey: str):
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key.\n".encode()
    question = b"\nWhat is the pass key? The pass key is "
    n_hay = T - 1 - len(needle) - len(question)
    hay = haystack_bytes(n_hay)
    cut = int(depth * n_hay)
    nl = hay.rfind(b"\n", 0, cut)          # insert at a line start near the requested depth
    cut = nl + 1 if nl > 0 else cut
    ids = [BOS] + list(hay[:cut]) + list(needle) + list(hay[cut:]) + list(question)
    assert len(ids) == T, (len(ids), T)
    span = (1 + cut, 1 + cut + len(needle))
    return ids, span


def load_model(path: str, device: str, attn_implementation: str):
    """(the bundled model on device in eval mode, its dtype): bf16 on CUDA, float32 on the CPU."""
    import torch
    from transformers import LlamaForCausalLM

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), dtype


def record_attention_inputs(ids, device: str, model_path: str | None = None, q_pos=None, values: bool = False) -> dict:
    """One forward pass of the bundled model over `ids` on `device` (bf16 on CUDA, float32 on the CPU), recording what
    reaches each layer's attention kernel, post-RoPE (exactly what a KV cache holds). Returns {"q": [L] tensors
    (Hq, P, d) at positions q_pos (all positions when None), "k": [L] (Hkv, T, d), "v": [L] (Hkv, T, d) when `values`,
    "pred": the greedy next token after ids, "dtype", "config"}; the tensors stay on `device` in the forward's dtype.

    A recording attention function registered with transformers.AttentionInterface (plus sdpa_mask under the same name
    with AttentionMaskInterface, without which no causal mask is passed) captures the states and then runs SDPA, so the
    forward pass is the model's normal one."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    path = model_path or default_model_path()
    q_pos_t = None if q_pos is None else torch.as_tensor(np.asarray(q_pos), dtype=torch.long, device=device)
    rec_q, rec_k, rec_v = {}, {}, {}

    def recording_attention(module, query, key, value, attention_mask, **kw):
        # query: [B, Hq, T, d], key/value: [B, Hkv, T, d], post-RoPE (what SDPA and a KV cache see)
        li = module.layer_idx
        rec_q[li] = query[0].clone() if q_pos_t is None else query[0].index_select(1, q_pos_t)
        rec_k[li] = key[0].clone()
        if values:
            rec_v[li] = value[0].clone()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("qk_record", recording_attention)
    AttentionMaskInterface.register("qk_record", sdpa_mask)
    model, dtype = load_model(path, device, "qk_record")
    x = torch.tensor([list(ids)], device=device)
    with torch.inference_mode():
        logits = model(x, logits_to_keep=1).logits
    L = len(rec_k)
    out = {"q": [rec_q[i] for i in range(L)], "k": [rec_k[i] for i in range(L)], "pred": int(logits[0, -1].argmax()),
           "dtype": dtype, "config": model.config}
    if values:
        out["v"] = [rec_v[i] for i in range(L)]
    del model
    return out


def greedy_continuation(ids, n: int, device: str, model_path: str) -> list[int]:
    """n tokens the bundled model generates greedily after ids (its own SDPA attention, a normal KV cache)."""
    import torch

    model, _ = load_model(model_path, device, "sdpa")
    x = torch.tensor([list(ids)], device=device)
    with torch.inference_mode():
        y = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=model.config.pad_token_id)
    del model
    return [int(t) for t in y[0, len(ids):]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--T", type=int, default=16384, help="tokens (bytes + BOS); the model is trained up to 32768")
    ap.add_argument("--depth", type=float, default=0.4, help="needle depth in the haystack (0..1)")
    ap.add_argument("--passkey", default="48213")
    ap.add_argument("--q-stride", type=int, default=1, help="keep every s-th query (plus the last 64)")
    ap.add_argument("--decode", type=int, default=0,
                    help="generate this many tokens greedily after a prompt of T - N tokens and record them too: the "
                         "last N queries are then real decode queries, and every query before them is the prompt's "
                         "(the model_qk loader's default split trains on the whole prompt, question included)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = args.model or default_model_path()
    out = args.out or qk_data.default_model_qk_path(args.T)
    if args.decode and not args.out:
        out = out[:-len(".npz")] + f"_decode{args.decode}.npz"
    T = args.T
    if not 0 <= args.decode < T // 2:
        raise SystemExit(f"--decode must be in [0, T/2), got {args.decode}")
    q_pos = np.unique(np.concatenate([np.arange(args.q_stride - 1, T, args.q_stride),
                                      np.arange(T - max(64, args.decode), T)]))
    t0 = time.perf_counter()
    ids, span = build_prompt(T - args.decode, args.depth, args.passkey)
    generated = ""
    if args.decode:
        ids = ids + greedy_continuation(ids, args.decode, dev, path)
        generated = bytes(t for t in ids[T - args.decode:] if t < 256).decode("utf-8", "replace")
        log(f"[dump_model_qk] generated {args.decode} tokens in {time.perf_counter() - t0:.1f}s: {generated!r}")
    log(f"[dump_model_qk] {path} on {dev}, T={T}, needle at {span}, {len(q_pos)} query positions")
    r = record_attention_inputs(ids, dev, path, q_pos=q_pos)
    pred = r["pred"]
    dtype = r["dtype"]
    pred_s = chr(pred) if pred < 256 else f"<{pred}>"
    # the answer's first byte: the prompt's greedy next byte, or the first generated one
    answer_s = generated[:1] if args.decode else pred_s
    log(f"[dump_model_qk] forward {time.perf_counter() - t0:.1f}s; the answer starts with {answer_s!r} "
        f"(passkey starts with {args.passkey[0]!r}: {'correct' if answer_s == args.passkey[0] else 'WRONG'})")
    q = np.stack([x.to(torch.float16).cpu().numpy() for x in r["q"]])
    k = np.stack([x.to(torch.float16).cpu().numpy() for x in r["k"]])
    meta = {"model": os.path.basename(os.path.normpath(path)), "T": T, "depth": args.depth, "passkey": args.passkey,
            "needle_span": list(span), "q_stride": args.q_stride, "device": dev, "dtype": str(dtype),
            "pred_next_byte": pred_s, "correct_first_digit": answer_s == args.passkey[0],
            "decode_tokens": args.decode, "prompt_tokens": T - args.decode, "generated": generated,
            "haystack": "/usr/share/common-licenses/* then Python stdlib *.py (sorted)",
            "gqa": f"query head h uses kv head h // {q.shape[1] // k.shape[1]}"}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp.npz"
    np.savez(tmp, q=q, q_pos=q_pos.astype(np.int32), k=k, tokens=np.array(ids, dtype=np.int16),
             needle_span=np.array(span), passkey=np.array(args.passkey), pred=np.array(pred),
             meta=np.array(json.dumps(meta)))
    os.replace(tmp, out)
    log(f"[dump_model_qk] wrote {out}: q {q.shape}, k {k.shape} ({os.path.getsize(out) / 2**20:.0f} MiB) "
        f"in {time.perf_counter() - t0:.1f}s")
    return out


if __name__ == "__main__":
    main()
