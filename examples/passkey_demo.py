"""Passkey demo: the bundled byte-level Llama finds a pass key hidden in a few thousand tokens, once with full
attention and once with RetrievalAttention (default config: 128 sink + 512 window tokens on the model's device,
the rest on the CPU behind a query-guided graph index, top-100 retrieval per head).

    python examples/passkey_demo.py [--context 4000] [--device cpu|cuda] [--index query_guided|flat]
"""
import argparse
import os
import random
import time

import torch
from transformers import DynamicCache, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList

import retrieval_attention as ra
from retrieval_attention.compat import cache_kwarg  # "cache" in the newest transformers, else "past_key_values"

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "..", "models", "tinyllama-byte-32k")


def haystack_text() -> str:
    """Natural English text shipped with the project (the model card and evaluation notes)."""
    parts = [open(os.path.join(MODEL, name), encoding="utf-8").read() for name in ("README.md", "EVAL.md")]
    lines = "\n".join(parts).splitlines()
    # drop lines that talk about pass keys themselves: they would be distractors
    return "\n".join(l for l in lines if "pass key" not in l.lower() and "passkey" not in l.lower()) + "\n"


def passkey_prompt(context: int, seed: int = 0):
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    question = "\nWhat is the pass key? The pass key is "
    text = haystack_text()
    body_len = context - len(needle) - len(question) - 1
    body = (text * (body_len // len(text) + 1))[:body_len]
    depth = int(body_len * rng.uniform(0.2, 0.8))
    depth = body.rfind("\n", 0, depth) + 1 or depth
    prompt = body[:depth] + needle + body[depth:] + question
    return key, torch.tensor([[256] + list(prompt.encode("utf-8"))])


def decode(ids) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class StepClock(StoppingCriteria):
    """Records the time after every generated token (never stops generation)."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores, **kwargs):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=4000, help="prompt length in tokens (bytes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--index", default=ra.RetrievalConfig().index, choices=["query_guided", "flat"])
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = LlamaForCausalLM.from_pretrained(MODEL, dtype=dtype, attn_implementation="retrieval_attention").to(args.device).eval()
    key, ids = passkey_prompt(args.context, args.seed)
    print(f"prompt: {ids.shape[1]} tokens, hidden pass key {key}, device {args.device}, dtype {dtype}")

    cfg = ra.RetrievalConfig(index=args.index)
    rows = []
    for name, make_cache in (("full attention", DynamicCache), ("retrieval attention", lambda: ra.RetrievalCache(model.config, cfg))):
        cache, clock = make_cache(), StepClock(args.device)
        t0 = time.perf_counter()
        out = model.generate(ids.to(args.device), max_new_tokens=args.new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([clock]), **{cache_kwarg(model): cache})
        prefill_s = clock.stamps[0] - t0  # prompt + first token (includes the index build)
        decode_s = (clock.stamps[-1] - clock.stamps[0]) / max(len(clock.stamps) - 1, 1)
        answer = decode(out[0, ids.shape[1]:].tolist())
        if isinstance(cache, ra.RetrievalCache):
            s = cache.summary()
            dev_bytes, cpu_bytes, scanned = s["device_kv_bytes"], s["cpu_kv_bytes"] + s["cpu_index_bytes"], s["scanned_frac"]
        else:
            dev_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
            cpu_bytes, scanned = 0, 1.0
        rows.append((name, answer.strip().split()[0] if answer.strip() else "", prefill_s, decode_s, dev_bytes, cpu_bytes, scanned))

    print(f"\n{'method':<20} {'answer':<8} {'prefill s':>9} {'s/token':>8} {'device KV':>11} {'CPU KV+index':>13} {'keys scanned':>12}")
    for name, ans, pre, per_tok, dev, cpu, scanned in rows:
        print(f"{name:<20} {ans:<8} {pre:>9.2f} {per_tok:>8.3f} {dev / 2**20:>9.2f}MB {cpu / 2**20:>11.2f}MB {scanned:>12.1%}")
    full_ans, ours_ans = rows[0][1], rows[1][1]
    print(f"\npass key {key}: full attention {'found' if key in full_ans else 'MISSED'}, retrieval attention "
          f"{'found' if key in ours_ans else 'MISSED'}; answers {'match' if full_ans == ours_ans else 'DIFFER'}")


if __name__ == "__main__":
    main()
