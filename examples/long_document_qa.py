"""Question answering over a long document whose cache is saved once and loaded for every question.

Reading a long document is the expensive part of RetrievalAttention: the prefill forward pass plus building a
query-guided graph index per (layer, head) over the document's keys. When several independent questions are asked
about the same document, that work can be done once:

    1. prefill the document into a RetrievalCache (the indexes are built here),
    2. `cache.save(directory)` writes the static set, the CPU key/value stores, the built graphs and the config,
    3. for each question: `ra.RetrievalCache.load(directory, model.config)` gives a cache in exactly the state after
       the document, and `model.generate(document + question, past_key_values=cache)` only processes the question.

Each question gets its own fresh copy of the document's cache, so questions do not see each other (unlike
examples/chat_long_document.py, where they share one conversation).

The model is the bundled byte-level Llama (models/tinyllama-byte-32k: ids 0-255 are UTF-8 bytes, 256 is BOS); the
document is local natural text with three facts hidden in the model's trained formats (a pass key, a `key-xxxxxx:
NNNNNN` line and "The special magic number for X is: N").

    python examples/long_document_qa.py                  # ~8K-token document, 3 questions
    python examples/long_document_qa.py --context 16000 --save-dir /tmp/doc_cache
    python examples/long_document_qa.py --quick          # small and fast (CI)
"""
import argparse
import os
import sys
import tempfile
import time

import torch
from transformers import LlamaForCausalLM, StoppingCriteriaList

import retrieval_attention as ra
from retrieval_attention.compat import cache_kwarg

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# the document and question helpers of the chat example: same facts, same formats
from chat_long_document import BOS, MODEL, StopAfterNumber, build_document, decode, encode, first_number, make_facts  # noqa: E402


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def answer(model, cache, ids, max_new_tokens=10):
    """Greedy answer to the question at the end of `ids`; the cache already holds everything before the question."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         stopping_criteria=StoppingCriteriaList([StopAfterNumber(ids.shape[1])]), pad_token_id=0,
                         **{cache_kwarg(model): cache})
    return decode(out[0, ids.shape[1]:].tolist())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=8000, help="document length in tokens (bytes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--ef", type=int, default=None, help="search beam (default: RetrievalConfig's automatic beam)")
    p.add_argument("--index-sharing", default="per_query_head", choices=["per_query_head", "per_kv_head"])
    p.add_argument("--save-dir", default=None, help="where to save the document's cache (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a 1,500-token document (CI)")
    args = p.parse_args()
    if args.quick:
        args.context = 1500

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = LlamaForCausalLM.from_pretrained(MODEL, dtype=dtype, attn_implementation="retrieval_attention").to(args.device).eval()
    cfg = ra.RetrievalConfig(top_k=args.top_k, ef=args.ef, index_sharing=args.index_sharing)

    import random

    rng = random.Random(args.seed)
    facts = make_facts(rng, n_kv=1, n_magic=1)  # a pass key, one key-value line, one magic number
    document, sources, depth_of = build_document(args.context, facts, rng)
    doc_ids = torch.tensor([[BOS] + encode(document)], device=args.device)
    print(f"document: {doc_ids.shape[1]} tokens from {', '.join(sources[:3])}{' ...' if len(sources) > 3 else ''}; "
          f"{len(facts)} hidden facts; device {args.device}, {dtype}")
    print(f"retrieval attention: {cfg.n_sink} sink + {cfg.n_window} window tokens on the device, the rest on the CPU "
          f"({cfg.index} index, {cfg.index_sharing}, top_k {cfg.top_k}, ef {cfg.ef or 'auto'})")

    # 1. read the document once: prefill + index build
    t0 = time.perf_counter()
    cache = ra.RetrievalCache(model.config, cfg)
    with torch.no_grad():
        model(doc_ids, **{cache_kwarg(model): cache})
    s = cache.summary()  # waits for background index builds (on a GPU) to finish
    prefill_s = time.perf_counter() - t0
    print(f"\nprefill + index build: {prefill_s:.2f} s (index build {s['index_build_s']:.2f} s, all layers)")

    # 2. save it
    tmp = None
    save_dir = args.save_dir
    if save_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ra_doc_cache_")
        save_dir = os.path.join(tmp.name, "document")
    t0 = time.perf_counter()
    cache.save(save_dir)
    save_s = time.perf_counter() - t0
    print(f"saved to {save_dir} in {save_s:.2f} s ({dir_bytes(save_dir) / 2**20:.1f} MB: static set, CPU "
          f"keys/values {s['cpu_kv_bytes'] / 2**20:.1f} MB, indexes {s['cpu_index_bytes'] / 2**20:.1f} MB)")

    # 3. every question from a freshly loaded copy of the document's cache
    print(f"\n{'question about':<26} {'depth':>5} {'truth':>8} {'answer':>8} {'ok':>3} {'load s':>7} {'answer s':>8}")
    n_ok, load_total, first_loaded_answer = 0, 0.0, None
    for i, (name, _, question, truth) in enumerate(facts):
        t0 = time.perf_counter()
        qcache = ra.RetrievalCache.load(save_dir, model.config, device=args.device)
        load_s = time.perf_counter() - t0
        ids = torch.cat([doc_ids, torch.tensor([encode(question)], device=args.device)], dim=1)
        t0 = time.perf_counter()
        text = answer(model, qcache, ids)
        answer_s = time.perf_counter() - t0
        got = first_number(text)
        ok = got == truth
        n_ok += ok
        load_total += load_s
        if i == 0:
            first_loaded_answer = text
        print(f"{name:<26} {depth_of[i]:>5.2f} {truth:>8} {got or repr(text):>8} {'yes' if ok else 'no':>3} {load_s:>7.2f} {answer_s:>8.2f}")

    # the same first question with the document re-read from scratch: the loaded cache must give the same answer
    t0 = time.perf_counter()
    fresh = ra.RetrievalCache(model.config, cfg)
    ids = torch.cat([doc_ids, torch.tensor([encode(facts[0][2])], device=args.device)], dim=1)
    fresh_text = answer(model, fresh, ids)
    rebuild_s = time.perf_counter() - t0
    load_mean = load_total / len(facts)
    print(f"\n{n_ok}/{len(facts)} answers correct from the saved cache")
    print(f"same answer as re-reading the document: {fresh_text == first_loaded_answer}")
    n = len(facts)
    saved_total = n * prefill_s - (prefill_s + save_s + n * load_mean)
    print(f"per question: load {load_mean:.2f} s instead of prefill + index build {prefill_s:.2f} s "
          f"({prefill_s / max(load_mean, 1e-9):.1f}x faster to start); time saved vs rebuilding for {n} questions: "
          f"{saved_total:.2f} s (1 read + save + {n} loads instead of {n} reads); "
          f"answering the first question with a fresh prefill took {rebuild_s:.2f} s")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
