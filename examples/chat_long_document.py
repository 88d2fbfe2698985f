"""Chat with a long document: a few facts are hidden in a long text, then questions are asked one after another in
the same conversation, once with full attention and once with RetrievalAttention.

The document is read (prefilled) once; with retrieval attention that is when the CPU indexes are built. Every
question and every answer is appended to the same cache, so later questions see the earlier turns, and the
document's keys stay on the CPU behind the query-guided index. Only the cache object differs between the two runs:
the model is patched once with `ra.enable`, and without a RetrievalCache its attention is plain exact SDPA.

The model is the bundled byte-level Llama (models/tinyllama-byte-32k: ids 0-255 are UTF-8 bytes, 256 is BOS). It knows
three question formats (its EVAL.md): the pass key, `key-xxxxxx: NNNNNN` lines, and "The special magic number for X is: N".

    python examples/chat_long_document.py                      # ~8K-token document, 6 questions
    python examples/chat_long_document.py --context 16000 --device cuda
    python examples/chat_long_document.py --quick              # small and fast (CI)
    python examples/chat_long_document.py --plot stats.png     # also plot cache.stats() per layer
"""
import argparse
import glob
import os
import random
import re
import time

import torch
from transformers import DynamicCache, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList

import retrieval_attention as ra
from retrieval_attention.compat import cache_kwarg

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODEL = os.path.join(ROOT, "models", "tinyllama-byte-32k")
BOS = 256
WORDS = ["lantern", "harbor", "violet", "granite", "meadow", "copper", "falcon", "juniper"]


# -- the document ----------------------------------------------------------------------------------------------------
def local_text(min_chars: int) -> tuple[str, list[str]]:
    """Natural English text found on the machine: the Debian licence texts, then this project's documentation."""
    files = sorted(p for p in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(p))
    files += [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    files += [os.path.join(MODEL, "README.md")]
    parts, used, size = [], [], 0
    for path in files:
        if size >= min_chars:
            break
        try:
            text = open(path, encoding="utf-8", errors="replace").read()
        except OSError:
            continue
        text = text.encode("ascii", "ignore").decode("ascii")  # one byte per character: len(text) == tokens
        # lines about pass keys, keys or magic numbers would be distractors for the questions below
        text = "\n".join(l for l in text.splitlines() if not re.search(r"pass ?key|magic number|key-", l, re.I))
        if len(text) > 500:
            parts.append(text.strip() + "\n\n")
            used.append(os.path.basename(path))
            size += len(parts[-1])
    text = "".join(parts)
    if not text:
        raise SystemExit("no local text found for the document")
    return (text * (min_chars // len(text) + 1))[:min_chars], used


def make_facts(rng: random.Random, n_kv: int, n_magic: int):
    """Facts in the model's trained formats, each with the question whose continuation is its answer."""
    key = str(rng.randint(10000, 99999))
    facts = [("pass key", f"The pass key is {key}. Remember it. {key} is the pass key.\n",
              "\nWhat is the pass key? The pass key is ", key)]
    for _ in range(n_kv):
        name = "key-" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(6))
        value = str(rng.randint(100000, 999999))
        facts.append((name, f"{name}: {value}\n", f"\nWhat is the value of {name}? {name}: ", value))
    for word in rng.sample(WORDS, n_magic):
        number = str(rng.randint(1000000, 9999999))
        facts.append((f"magic number for {word}", f"The special magic number for {word} is: {number}.\n",
                      f"\nWhat is the special magic number for {word}? The special magic number for {word} is: ", number))
    return facts


def build_document(context: int, facts, rng: random.Random):
    """A document of about `context` tokens with each fact inserted at a line start, spread over depths 0.1-0.75 (so
    that with the default config they end up in the CPU part, outside the sink and window kept on the device)."""
    body, sources = local_text(context - sum(len(f[1]) for f in facts) - 1)
    depths = sorted(rng.uniform(0.1, 0.75) for _ in facts)
    order = list(range(len(facts)))
    rng.shuffle(order)
    pieces, last = [], 0
    for depth, i in zip(depths, order):
        pos = body.rfind("\n", 0, int(len(body) * depth)) + 1 or int(len(body) * depth)
        pos = max(pos, last)
        pieces += [body[last:pos], facts[i][1]]
        last = pos
    pieces.append(body[last:])
    doc = "".join(pieces)
    depth_of = {i: (doc.index(facts[i][1]) + 1) / (len(doc) + 1) for i in range(len(facts))}
    return doc, sources, depth_of


# -- the conversation ------------------------------------------------------------------------------------------------
def encode(text: str) -> list:
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class StopAfterNumber(StoppingCriteria):
    """Stops once the answer has started with a digit and a non-digit follows (or a newline comes first)."""

    def __init__(self, start: int):
        self.start = start

    def __call__(self, input_ids, scores, **kwargs):
        text = decode(input_ids[0, self.start:].tolist())
        done = bool(re.match(r"\s*\d+\D", text)) or "\n" in text
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def chat(model, document_ids, facts, cache, device, max_answer_tokens):
    """Prefill the document, then ask every question in turn in one conversation; returns per-turn answers/times."""
    kw = cache_kwarg(model)
    history = torch.tensor([[BOS] + document_ids], device=device)
    turns = []
    for _, _, question, _ in facts:
        history = torch.cat([history, torch.tensor([encode(question)], device=device)], dim=1)
        t0 = time.perf_counter()
        kwargs = {} if cache is None else {kw: cache}
        out = model.generate(history, max_new_tokens=max_answer_tokens, do_sample=False, return_dict_in_generate=True,
                             stopping_criteria=StoppingCriteriaList([StopAfterNumber(history.shape[1])]), **kwargs)
        if cache is None:  # the first turn: ra.enable's generate made the RetrievalCache; keep it for the next turns
            cache = getattr(out, "cache", None)  # transformers 5 names it `cache`, 4.x `past_key_values`
            if cache is None:
                cache = out.past_key_values
        seconds = time.perf_counter() - t0
        new = out.sequences[0, history.shape[1]:].tolist()
        turns.append((decode(new), seconds))
        history = out.sequences  # the answer stays in the conversation
    return turns, cache


def first_number(text: str) -> str:
    m = re.match(r"\s*(\d+)", text)
    return m.group(1) if m else ""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=8000, help="document length in tokens (bytes)")
    p.add_argument("--kv", type=int, default=2, help="number of key-xxxxxx: NNNNNN facts")
    p.add_argument("--magic", type=int, default=3, help="number of magic-number facts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--index", default="query_guided", choices=["query_guided", "flat"])
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--ef", type=int, default=None, help="search beam (default: RetrievalConfig's automatic beam)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="save a plot of the retrieval cache's per-layer stats here (matplotlib)")
    p.add_argument("--quick", action="store_true", help="a 1,500-token document and 3 questions (CI)")
    args = p.parse_args()
    if args.quick:
        args.context, args.kv, args.magic = 1500, 1, 1

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = LlamaForCausalLM.from_pretrained(MODEL, dtype=dtype).to(args.device).eval()
    cfg = ra.RetrievalConfig(index=args.index, top_k=args.top_k, ef=args.ef)
    ra.enable(model, cfg)  # generate() without a cache now builds a RetrievalCache with cfg

    rng = random.Random(args.seed)
    facts = make_facts(rng, args.kv, args.magic)
    document, sources, depth_of = build_document(args.context, facts, rng)
    doc_ids = encode(document)
    print(f"document: {len(doc_ids) + 1} tokens from {', '.join(sources[:4])}{' ...' if len(sources) > 4 else ''}; "
          f"{len(facts)} hidden facts; device {args.device}, {dtype}")
    print(f"retrieval attention: {cfg.n_sink} sink + {cfg.n_window} window tokens on the device, the rest on the CPU "
          f"({cfg.index} index, top_k {cfg.top_k}, ef {cfg.ef or 'auto'})\n")

    max_answer = 10
    with torch.no_grad():
        full_turns, _ = chat(model, doc_ids, facts, DynamicCache(), args.device, max_answer)
        ra_turns, cache = chat(model, doc_ids, facts, None, args.device, max_answer)

    print(f"{'question about':<28} {'depth':>5} {'truth':>8} | {'full attention':>14} {'s':>5} | {'retrieval attention':>19} {'s':>5}")
    n_full = n_ra = 0
    for i, (name, _, _, answer) in enumerate(facts):
        (fa, fs), (ra_, rs) = full_turns[i], ra_turns[i]
        f_ok, r_ok = first_number(fa) == answer, first_number(ra_) == answer
        n_full += f_ok
        n_ra += r_ok
        print(f"{name:<28} {depth_of[i]:>5.2f} {answer:>8} | {first_number(fa) or repr(fa):>12} {'ok' if f_ok else '--'} {fs:>5.2f} | "
              f"{first_number(ra_) or repr(ra_):>17} {'ok' if r_ok else '--'} {rs:>5.2f}")
    print("(the first turn's time includes reading the document; for retrieval attention also the index build)")

    s = cache.summary()
    n_cpu = sum(x["cpu_tokens"] for x in cache.stats())
    print(f"\nfull attention: {n_full}/{len(facts)} correct; retrieval attention: {n_ra}/{len(facts)} correct")
    print(f"retrieval cache: {n_cpu // max(len(cache.stats()), 1)} tokens per layer on the CPU, "
          f"device KV {s['device_kv_bytes'] / 2**20:.2f} MB, CPU KV {s['cpu_kv_bytes'] / 2**20:.2f} MB + index "
          f"{s['cpu_index_bytes'] / 2**20:.2f} MB, keys scanned per query {s['scanned_frac']:.1%}, "
          f"index build {s['index_build_s']:.1f} s (all layers)")
    if args.plot:
        from retrieval_attention.plotting import plot_stats

        plot_stats(cache, args.plot, title=f"chat over a {len(doc_ids) + 1}-token document")
        print(f"per-layer stats plotted to {args.plot}")


if __name__ == "__main__":
    main()
