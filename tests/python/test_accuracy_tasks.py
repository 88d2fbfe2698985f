"""Fast tests of the accuracy benchmark: task generators (benchmarks/tasks.py) and a tiny end-to-end run of
benchmarks/accuracy.py (all baseline layers, small static set so the CPU part is exercised)."""
from __future__ import annotations

import json
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import tasks as T  # noqa: E402

MODEL = os.path.join(REPO, "models", "tinyllama-byte-32k")


@pytest.fixture(scope="module")
def hay():
    return T.load_haystack(1 << 18, sources="generated")[0]


def test_haystack_sources():
    text, desc = T.load_haystack(1 << 18)
    assert len(text) >= 1 << 18 and text.isascii()
    assert "bytes from" in desc
    gen, gdesc = T.load_haystack(5000, sources="generated")
    assert len(gen) >= 5000 and "generated" in gdesc
    assert T.generated_text(3000, seed=7) == T.generated_text(3000, seed=7)


@pytest.mark.parametrize("task", T.TASKS)
@pytest.mark.parametrize("context", [512, 1024, 3000])
def test_sample_shape_and_answer(task, context, hay):
    samples = T.make_samples(task, context, 4, seed=3, haystack=hay)
    for s in samples:
        assert len(s.ids) == context and s.ids[0] == T.BOS
        assert all(0 <= i < 256 for i in s.ids[1:])
        p = s.prompt
        assert re.fullmatch(r"\d+", s.answer)
        assert len(s.answer) == {"passkey": 5, "kv": 6, "niah": 7, "niah_multi": 7}[task]
        if task == "passkey":
            assert p.endswith("\nWhat is the pass key? The pass key is ")
            assert f"The pass key is {s.answer}. Remember it. {s.answer} is the pass key.\n" in p
        elif task == "kv":
            key = re.search(r"What is the value of (key-[a-z0-9]{6})\? \1: $", p).group(1)
            assert f"\n{key}: {s.answer}\n" in p or p.startswith(f"{key}: {s.answer}\n")
            assert len(re.findall(r"key-[a-z0-9]{6}: \d{6}\n", p)) == 16
        else:
            word = re.search(r"What is the special magic number for (\w+)\? The special magic number for \1 is: $", p).group(1)
            assert f"The special magic number for {word} is: {s.answer}.\n" in p
            assert len(re.findall(r"The special magic number for \w+ is: \d{7}\.\n", p)) == (1 if task == "niah" else 4)
    # depth sweep: the queried needle moves from the start to the end of the haystack
    for s in samples:
        target = s.depth * s.meta["haystack_chars"]
        assert target - 400 <= s.meta["queried_position"] <= target + 1
    assert samples[0].meta["queried_position"] < samples[-1].meta["queried_position"]


def test_deterministic_and_distinct(hay):
    a = T.make_samples("niah_multi", 1024, 3, seed=1, haystack=hay)
    b = T.make_samples("niah_multi", 1024, 3, seed=1, haystack=hay)
    c = T.make_samples("niah_multi", 1024, 3, seed=2, haystack=hay)
    assert [s.ids for s in a] == [s.ids for s in b]
    assert [s.ids for s in a] != [s.ids for s in c]
    assert len({s.answer for s in a}) == 3


def test_too_short_context_raises(hay):
    with pytest.raises(ValueError):
        T.make_sample("kv", 300, 0, 1, haystack=hay)


def test_score_and_natural_text(hay):
    assert T.score("57213", "57213.")
    assert T.score("57213", " 57213\n")
    assert not T.score("57213", "572134")
    assert not T.score("57213", "5721.")
    assert not T.score("57213", "abc")
    ids = T.natural_text_ids(600, 5, haystack=hay)
    assert len(ids) == 605 and ids[0] == T.BOS  # context + continuation


@pytest.mark.skipif(not os.path.isdir(MODEL), reason="bundled model missing")
def test_harness_end_to_end(tmp_path, capsys):
    pytest.importorskip("faiss")
    import accuracy as A

    methods = "full,retrieval_attention,flat_topk,ivf_topk,quest,static_only"
    results, kl = A.main(["--json", "--contexts", "640", "--samples", "1", "--tasks", "passkey", "--methods", methods,
                          "--n-sink", "16", "--n-window", "64", "--top-k", "32", "--kl-contexts", "400",
                          "--kl-tokens", "3", "--device", "cpu", "--out", str(tmp_path), "--analysis"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    acc = [r for r in lines if r["bench"] == "accuracy"]
    assert [r["method"] for r in acc] == methods.split(",")
    for r in acc:
        for key in ("task", "context", "method", "accuracy", "samples", "scanned_frac"):
            assert key in r
        assert r["context"] == 640 and r["samples"] == 1 and 0.0 <= r["accuracy"] <= 1.0
    by = {r["method"]: r for r in acc}
    assert by["full"]["scanned_frac"] == 1.0 and by["flat_topk"]["scanned_frac"] == pytest.approx(1.0)
    assert by["static_only"]["scanned_frac"] == 0.0
    assert 0.0 < by["quest"]["scanned_frac"] < 1.0 and 0.0 < by["ivf_topk"]["scanned_frac"] <= 1.0
    assert 0.0 < by["retrieval_attention"]["scanned_frac"] <= 1.0
    assert by["ivf_topk"]["target_scan"] == by["retrieval_attention"]["scanned_frac"]  # matched scan budget
    assert by["flat_topk"]["topk_mass_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert by["static_only"]["topk_mass_ratio"] == 0.0
    kls = {r["method"]: r for r in lines if r["bench"] == "accuracy_kl"}
    assert set(kls) == set(methods.split(",")) - {"full"}
    assert all(r["kl"] >= -1e-6 for r in kls.values())
    assert kls["flat_topk"]["cpu_mass_recovered"] <= 1.0 + 1e-4
    for f in ("accuracy.jsonl", "accuracy.md", "accuracy.png"):
        assert (tmp_path / f).stat().st_size > 0


def test_exactness_mode_matches_full(hay):
    """With top_k >= all CPU tokens, flat_topk and quest must reproduce full attention's next-token distribution."""
    if not os.path.isdir(MODEL):
        pytest.skip("bundled model missing")
    pytest.importorskip("faiss")
    import torch

    import accuracy as A

    args = A.parse_args(["--device", "cpu", "--n-sink", "8", "--n-window", "32", "--top-k", "1000"])
    runner = A.Runner(args)
    ids = T.natural_text_ids(300, 4, haystack=hay)
    from transformers import DynamicCache

    ref = runner.teacher_forced_logprobs([ids], 300, DynamicCache())
    for method in ("flat_topk", "quest", "ivf_topk", "retrieval_attention"):
        if method == "ivf_topk":
            runner.layers["ivf_topk"].target_scan = 1.0
        lp = runner.teacher_forced_logprobs([ids], 300, runner.make_cache(method))
        assert torch.allclose(lp, ref, atol=2e-3), (method, (lp - ref).abs().max())


def test_resume_reuses_only_matching_cells(tmp_path):
    """accuracy.py --resume: cells of an earlier run with the same samples, tasks, contexts, methods and index sharing
    are reused; anything else in the file is ignored (not comparable)."""
    import accuracy

    recs = [
        {"bench": "accuracy", "task": "passkey", "context": 1024, "method": "full", "samples": 2, "accuracy": 1.0},
        {"bench": "accuracy", "task": "passkey", "context": 1024, "method": "retrieval_attention", "samples": 2,
         "accuracy": 1.0, "scanned_frac": 0.3, "index_sharing": "per_query_head", "train_shifted": 0.5},
        {"bench": "accuracy", "task": "passkey", "context": 2048, "method": "full", "samples": 50, "accuracy": 1.0},
        {"bench": "accuracy", "task": "kv", "context": 1024, "method": "retrieval_attention", "samples": 2,
         "accuracy": 1.0, "scanned_frac": 0.3, "index_sharing": "per_kv_head", "train_shifted": 0.5},
        {"bench": "accuracy_kl", "context": 1024, "method": "full", "kl": 0.0},
    ]
    path = tmp_path / "prev.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\nnot json\n")
    args = accuracy.parse_args(["--quick", "--resume", str(path)])
    done, done_kl = accuracy.load_resume(args)
    assert set(done) == {("passkey", 1024, "full"), ("passkey", 1024, "retrieval_attention")}
    assert list(done_kl) == [1024]
    args = accuracy.parse_args(["--quick", "--resume", str(path), "--index-sharing", "per_kv_head"])
    done, _ = accuracy.load_resume(args)
    assert set(done) == {("passkey", 1024, "full"), ("kv", 1024, "retrieval_attention")}
    # the first run of a resumed series: the file does not exist yet
    args = accuracy.parse_args(["--quick", "--resume", str(tmp_path / "not_yet.jsonl")])
    assert accuracy.load_resume(args) == ({}, {})


def test_resume_reruns_cells_built_with_other_training_queries(tmp_path, monkeypatch):
    """A retrieval_attention cell is reused only if its graphs were trained on as many queries as this version's
    RetrievalConfig would use (records without "train_queries" used every prompt token), and an ivf_topk cell only if
    its scan budget is the reused retrieval_attention cell's scanned fraction."""
    import accuracy
    import retrieval_attention as ra

    assert accuracy.train_queries(32768) == (ra.RetrievalConfig().max_train_queries or 32768)
    monkeypatch.setattr(accuracy, "train_queries", lambda context: min(context, 8192))  # as with a cap of 8192
    common = {"bench": "accuracy", "task": "passkey", "samples": 50, "accuracy": 1.0, "index_sharing": "per_query_head",
              "train_shifted": 0.5}
    recs = [
        dict(common, context=1024, method="retrieval_attention", scanned_frac=0.9),  # 1024 <= cap: the same build
        dict(common, context=1024, method="ivf_topk", target_scan=0.9),
        dict(common, context=16384, method="retrieval_attention", scanned_frac=0.09),  # all 16384 queries: stale
        dict(common, context=16384, method="ivf_topk", target_scan=0.09),  # budget of the stale cell: stale
        dict(common, context=16384, method="flat_topk", scanned_frac=1.0),
    ]
    path = tmp_path / "prev.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    argv = ["--contexts", "1024,16384", "--tasks", "passkey", "--resume", str(path)]
    done, _ = accuracy.load_resume(accuracy.parse_args(argv))
    assert set(done) == {("passkey", 1024, "retrieval_attention"), ("passkey", 1024, "ivf_topk"),
                         ("passkey", 16384, "flat_topk")}
    recs[2]["train_queries"] = 8192
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    done, _ = accuracy.load_resume(accuracy.parse_args(argv))
    assert ("passkey", 16384, "retrieval_attention") in done and ("passkey", 16384, "ivf_topk") in done
    # a different IVF budget than the reused cell's scanned fraction is not reused
    recs[3]["target_scan"] = 0.2
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    done, _ = accuracy.load_resume(accuracy.parse_args(argv))
    assert ("passkey", 16384, "ivf_topk") not in done


def test_resume_picks_the_matching_record_among_several(tmp_path, monkeypatch):
    """A resume file holding the same cell from two runs with different settings (e.g. a capped and an uncapped
    training set) reuses the record that matches this run, whichever line comes last."""
    import accuracy

    monkeypatch.setattr(accuracy, "train_queries", lambda context: context)  # every prompt token
    common = {"bench": "accuracy", "task": "passkey", "samples": 50, "context": 16384, "index_sharing": "per_query_head",
              "train_shifted": 0.5}
    recs = [
        dict(common, method="retrieval_attention", accuracy=1.0, scanned_frac=0.094),  # all queries (no field)
        dict(common, method="ivf_topk", accuracy=0.92, target_scan=0.094),
        dict(common, method="retrieval_attention", accuracy=0.98, scanned_frac=0.091, train_queries=8192),
        dict(common, method="ivf_topk", accuracy=0.9, target_scan=0.091),
        {"bench": "accuracy_kl", "context": 2048, "method": "quest", "kl": 0.1},
        {"bench": "accuracy_kl", "context": 2048, "method": "quest", "kl": 0.2},
    ]
    path = tmp_path / "prev.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    done, done_kl = accuracy.load_resume(accuracy.parse_args(["--contexts", "16384", "--tasks", "passkey", "--resume", str(path)]))
    assert done[("passkey", 16384, "retrieval_attention")]["accuracy"] == 1.0
    assert done[("passkey", 16384, "ivf_topk")]["accuracy"] == 0.92
    assert [r["kl"] for r in done_kl[2048]] == [0.2]


def test_render_flags_cells_below_97_percent_of_full(tmp_path, monkeypatch):
    """--render writes the merged table of a resume file without running anything, and names every cell where
    retrieval_attention is below 97% of full attention (the issue's criterion) - and only those."""
    import accuracy

    monkeypatch.setattr(accuracy, "train_queries", lambda context: context)
    common = {"bench": "accuracy", "samples": 50, "index_sharing": "per_query_head", "train_shifted": 0.5}
    recs = [
        dict(common, task="passkey", context=1024, method="full", accuracy=0.88, scanned_frac=1.0),
        dict(common, task="passkey", context=1024, method="retrieval_attention", accuracy=0.84, scanned_frac=0.05),
        dict(common, task="kv", context=1024, method="full", accuracy=0.72, scanned_frac=1.0),
        dict(common, task="kv", context=1024, method="retrieval_attention", accuracy=0.70, scanned_frac=0.05),
        dict(common, task="kv", context=1024, method="static_only", accuracy=0.02, scanned_frac=0.0),
        dict(common, task="niah", context=1024, method="full", accuracy=0.90, scanned_frac=1.0),  # ours not run yet
    ]
    path = tmp_path / "all.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "grid"
    results, _ = accuracy.main(["--render", "--resume", str(path), "--out", str(out), "--contexts", "1024",
                                "--tasks", "passkey,kv,niah", "--kl-contexts", "none"])
    assert len(results) == 6
    md = (out / "accuracy.md").read_text()
    assert ("below 97% of full attention (where full is above chance): passkey 1K: 0.84 vs 0.88 (95.5%) "
            "(not checked, retrieval_attention not run: niah 1K)\n") in md
    assert "kv 1K" not in md.split("below 97%")[1].split("\n")[0]  # 0.70 / 0.72 = 97.2%
    assert "| kv | static_only | 0.02 (0.000) |" in md and (out / "accuracy.png").exists()
    with pytest.raises(SystemExit):
        accuracy.main(["--render", "--out", str(out)])  # nothing to render from


def test_resume_reruns_cells_of_another_beam_or_top_k(tmp_path, monkeypatch):
    """A retrieval_attention cell searched with another ef, or any retrieval cell with another top_k, is not reused
    (records from before these fields were written used ef 128 and top-100)."""
    import accuracy

    monkeypatch.setattr(accuracy, "train_queries", lambda context: context)
    common = {"bench": "accuracy", "task": "niah", "context": 1024, "samples": 50, "accuracy": 1.0,
              "index_sharing": "per_query_head", "train_shifted": 0.5}
    recs = [dict(common, method="retrieval_attention", scanned_frac=0.9), dict(common, method="flat_topk", scanned_frac=1.0),
            dict(common, method="full", scanned_frac=1.0)]
    path = tmp_path / "prev.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    argv = ["--contexts", "1024", "--tasks", "niah", "--resume", str(path)]
    assert len(accuracy.load_resume(accuracy.parse_args(argv))[0]) == 3
    done, _ = accuracy.load_resume(accuracy.parse_args(argv + ["--ef", "256"]))
    assert set(m for _, _, m in done) == {"flat_topk", "full"}
    done, _ = accuracy.load_resume(accuracy.parse_args(argv + ["--top-k", "200"]))
    assert set(m for _, _, m in done) == {"full"}


def test_resume_compares_the_beam_searched_with(tmp_path, monkeypatch):
    """The default ef (None) is RetrievalConfig's automatic beam: an ef-128 record of a 1K cell (beam 128 there) is
    reused, one of a 32K cell (beam 251 there) is not; a record written with the automatic beam matches --ef 251."""
    import accuracy

    monkeypatch.setattr(accuracy, "train_queries", lambda context: context)
    base = {"bench": "accuracy", "task": "niah", "samples": 50, "accuracy": 1.0, "index_sharing": "per_query_head",
            "method": "retrieval_attention", "scanned_frac": 0.1, "train_shifted": 0.5}
    path = tmp_path / "prev.jsonl"
    path.write_text(json.dumps(dict(base, context=1024, ef=128)) + "\n" + json.dumps(dict(base, context=32768, ef=128)) + "\n")
    args = accuracy.parse_args(["--contexts", "1024,32768", "--tasks", "niah", "--methods", "retrieval_attention",
                                "--resume", str(path)])
    assert accuracy.beam_for(accuracy.run_config(args), 32768) == 251
    assert set(accuracy.load_resume(args)[0]) == {("niah", 1024, "retrieval_attention")}
    path.write_text(json.dumps(dict(base, context=32768, ef=None, ef_used=251)) + "\n")
    args = accuracy.parse_args(["--contexts", "32768", "--tasks", "niah", "--methods", "retrieval_attention",
                                "--resume", str(path), "--ef", "251"])
    assert set(accuracy.load_resume(args)[0]) == {("niah", 32768, "retrieval_attention")}


def test_resume_reruns_cells_trained_on_unshifted_queries(tmp_path, monkeypatch):
    """A retrieval_attention cell is reused only if its graphs were trained as this run's would be: records without
    "train_shifted" (written before the training queries were moved by RoPE) match --train-shift 0 only, those with
    True (all moved, twenty-first and twenty-second sessions) --train-shift 1 only, and the default share its own records."""
    import accuracy

    monkeypatch.setattr(accuracy, "train_queries", lambda context: context)
    common = {"bench": "accuracy", "task": "niah", "context": 1024, "samples": 50, "accuracy": 1.0,
              "index_sharing": "per_query_head", "method": "retrieval_attention", "scanned_frac": 0.5}
    path = tmp_path / "prev.jsonl"
    path.write_text(json.dumps(common) + "\n")
    argv = ["--contexts", "1024", "--tasks", "niah", "--methods", "retrieval_attention", "--resume", str(path)]
    assert accuracy.load_resume(accuracy.parse_args(argv))[0] == {}
    assert set(accuracy.load_resume(accuracy.parse_args(argv + ["--train-shift", "0"]))[0]) == {("niah", 1024, "retrieval_attention")}
    path.write_text(json.dumps(dict(common, train_shifted=True)) + "\n")
    assert set(accuracy.load_resume(accuracy.parse_args(argv + ["--train-shift", "1"]))[0]) == {("niah", 1024, "retrieval_attention")}
    assert accuracy.load_resume(accuracy.parse_args(argv))[0] == {}  # the default moves half of them
    assert accuracy.load_resume(accuracy.parse_args(argv + ["--train-shift", "0"]))[0] == {}
    path.write_text(json.dumps(dict(common, train_shifted=0.5)) + "\n")
    assert set(accuracy.load_resume(accuracy.parse_args(argv))[0]) == {("niah", 1024, "retrieval_attention")}
