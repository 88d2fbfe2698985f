"""Build and search a query-guided index directly, on real attention vectors, and check it against exact search.

The keys are one attention head's post-RoPE keys from the bundled model on an 8K-token input (data/qk); the
training queries are that head's queries at earlier positions; the test queries are the last 64 positions.

    python examples/index_search.py [--layer 3] [--head 0] [--k 100] [--ef 128]
"""
import argparse
import os
import tempfile

import numpy as np
import torch

import retrieval_attention as ra

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "qk", "qk_passkey.npz")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--head", type=int, default=0, help="query head (GQA: kv head = head // 3)")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--ef", type=int, default=128)
    args = p.parse_args()

    z = np.load(DATA)
    pos = z["q_sample_pos"]
    test = pos >= pos.max() - 63  # the last 64 positions: decode-like queries
    keys = torch.from_numpy(z["keys"][args.layer, args.head // 3, : pos[test].min()])  # keys before the test queries
    train_q = torch.from_numpy(z["q_sample"][args.layer, args.head, ~test]).float()
    test_q = torch.from_numpy(z["q_sample"][args.layer, args.head, test]).float()
    print(f"{keys.shape[0]} keys ({keys.dtype}), {train_q.shape[0]} training queries, {test_q.shape[0]} test queries")

    graph = ra.QueryGuidedIndex(keys, train_q, degree=32, k_train=100)
    flat = ra.FlatIndex(keys)
    ids, scores = graph.search(test_q, k=args.k, ef=args.ef)
    exact, _ = flat.search(test_q, k=args.k)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / args.k for a, b in zip(ids, exact)])
    scanned = graph.last_search_stats["scanned_frac"]
    print(f"query-guided: recall@{args.k} {recall:.3f} scanning {scanned:.1%} of keys (exact search scans 100%); "
          f"built in {graph.build_seconds:.2f} s")

    with tempfile.TemporaryDirectory() as tmp:  # persistence: the file holds keys and graph
        path = os.path.join(tmp, "head.raidx")
        graph.save(path)
        again = ra.load_index(path)
        same = torch.equal(again.search(test_q, k=args.k, ef=args.ef)[0], ids)
        print(f"saved {os.path.getsize(path) / 2**20:.1f} MB, reloaded as {again!r}, same results: {same}")


if __name__ == "__main__":
    main()
