"""Smoke test of benchmarks/recall.py: the --quick --json code path on tiny data, the JSON fields of DESIGN.md §6,
the hnswlib scan counter (a replay of hnswlib's search) and the --build-time mode. A few seconds."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCH)

REQUIRED = {"bench": str, "data": str, "index": str, "n": int, "d": int, "k": int, "param": dict,
            "recall": float, "scanned_frac": float, "qps": float, "build_s": float}


def _installed_baselines():
    """The baseline indexes whose packages import here (all three in CI; the GPU machine has no hnswlib)."""
    import importlib.util

    import recall
    return [n for n, (module, _) in recall.BASELINE_PACKAGES.items() if importlib.util.find_spec(module) is not None]


def _has_query_guided():
    try:
        import retrieval_attention as ra
    except Exception:
        return False
    return hasattr(ra, "QueryGuidedIndex")


def _run(*args, timeout=120):
    # the repo's python/ goes last: an installed or PYTHONPATH-given retrieval_attention wins, as in this process
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [x for x in (os.environ.get("PYTHONPATH", ""), os.path.join(REPO, "python")) if x]))
    p = subprocess.run([sys.executable, os.path.join(BENCH, "recall.py"), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=REPO, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.strip()]
    return lines, p.stderr


@pytest.fixture(scope="module")
def quick_lines(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    lines, err = _run("--quick", "--json", "--data", "real,synthetic_ood,in_distribution", "--layers", "3",
                      "--heads", "0", "--n", "1024", "--n-eval", "8", "--k", "100,10", "--ef-construction", "64",
                      "--out", str(out))
    return lines, err, out


def test_recall_json_fields(quick_lines):
    lines, err, out = quick_lines
    rows = [r for r in lines if r["bench"] == "recall"]
    assert rows, err[-2000:]
    for r in rows:
        for key, typ in REQUIRED.items():
            assert key in r, (key, r)
            assert isinstance(r[key], (int, float) if typ is float else typ), (key, r)
        assert r["data"] in ("real", "model_qk", "synthetic_ood", "in_distribution")
        assert r["index"] in ("query_guided", "flat", "hnswlib", "faiss_ivf", "faiss_hnsw")
        assert r["k"] in (10, 100)
        assert 0.0 <= r["recall"] <= 1.0
        # distance computations / n: HNSW may exceed 1 at tiny n (upper levels, large ef); the rest cannot
        assert 0.0 < r["scanned_frac"] <= (2.0 if r["index"] in ("hnswlib", "faiss_hnsw") else 1.0 + 1e-9)
        assert r["qps"] > 0 and r["build_s"] >= 0
    got = {(r["data"], r["index"]) for r in rows}
    expect_idx = set(_installed_baselines()) | ({"query_guided"} if _has_query_guided() else set())
    for dname in ("real", "synthetic_ood", "in_distribution"):
        for iname in expect_idx:
            assert (dname, iname) in got, (dname, iname, sorted(got))
    for r in rows:
        if r["data"] == "real":
            assert r["n"] == 8192 - 8 and r["d"] == 64   # keys = positions before the 8 eval queries
            ages = [a for a in r["recall_by_age"] if a is not None]  # key ids are positions: recall per age slice
            assert len(r["recall_by_age"]) == 5 and ages and all(0.0 <= a <= 1.0 for a in ages)
            if r["index"] == "flat":
                assert ages == [1.0] * len(ages)
        else:
            assert "recall_by_age" not in r  # synthetic ids are not positions
        if r["index"] == "flat":
            assert r["recall"] == 1.0 and r["scanned_frac"] == pytest.approx(1.0)
        if r["index"] == "faiss_ivf" and r["n"] == 1024 and r["param"]["nprobe"] >= 32:   # nlist=32: exhaustive
            assert r["recall"] == 1.0
    # recall grows with the beam for the graph baselines
    for iname in {"hnswlib", "faiss_hnsw"} & expect_idx:
        rs = sorted([r for r in rows if r["index"] == iname and r["data"] == "in_distribution" and r["k"] == 100],
                    key=lambda r: r["param"]["ef"])
        assert rs[-1]["recall"] >= rs[0]["recall"] and rs[-1]["scanned_frac"] > rs[0]["scanned_frac"]


def test_summary_and_outputs(quick_lines):
    lines, err, out = quick_lines
    summ = [r for r in lines if r["bench"] == "recall_summary"]
    assert summ
    for s in summ:
        assert {"data", "index", "k", "target_recall", "scanned_frac_at_target", "ratio_vs_query_guided"} <= set(s)
        if s["scanned_frac_at_target"] is not None:
            assert 0 < s["scanned_frac_at_target"] <= s["scanned_frac_measured"] <= 2.0
    assert (out / "recall_quick.png").stat().st_size > 1000
    assert len((out / "recall_quick.jsonl").read_text().splitlines()) == len(lines)
    if "hnswlib" in _installed_baselines():
        assert "replay agreement with hnswlib results: 1.000" in err or "replay agreement" in err
    else:
        assert "hnswlib needs the hnswlib package" in err


def test_recall_by_age_slices():
    import recall

    true_ids = np.array([[0, 5, 9], [1, 2, 8]])   # n = 10: slices of 2 positions, oldest first
    found = np.array([[0, 9, 3], [2, 7, 6]])
    hits, cnt = recall.recall_by_age(found, true_ids, 10)
    assert cnt.tolist() == [2, 1, 1, 0, 2]        # 0,1 | 2 | 5 | - | 8,9
    assert hits.tolist() == [1, 1, 0, 0, 1]       # 0 found, 1 not | 2 found | 5 not | 9 found, 8 not


def test_hnswlib_replay_matches_hnswlib():
    hnswlib = pytest.importorskip("hnswlib")
    import recall
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2000, 16)).astype(np.float32) + 1.0
    q = rng.standard_normal((20, 16)).astype(np.float32)
    idx = hnswlib.Index(space="ip", dim=16)
    idx.init_index(max_elements=2000, M=8, ef_construction=50, random_seed=1)
    idx.add_items(keys, np.arange(2000))
    idx.set_ef(40)
    labels, _ = idx.knn_query(q, k=10, num_threads=1)
    rep = recall.HnswlibReplay(idx, keys)
    same = 0
    for i in range(len(q)):
        ids, ndis = rep.search(q[i], 10, 40)
        same += set(ids.tolist()) == set(labels[i].tolist())
        assert 10 <= ndis <= 2000 + 200
    assert same >= 19


def test_recall_metric_tie_tolerant():
    import qk_data
    keys = np.array([[1.0, 0], [1.0, 0], [0.5, 0], [0, 1]], np.float32)   # keys 0 and 1 tie
    q = np.array([[1.0, 0]], np.float32)
    ids, sc = qk_data.exact_topk(keys, q, 1)
    assert qk_data.recall_per_query(np.array([[1]]), keys, q, sc[:, 0], 1)[0] == 1.0   # the other tied key counts
    assert qk_data.recall_per_query(np.array([[2]]), keys, q, sc[:, 0], 1)[0] == 0.0
    ids, sc = qk_data.exact_topk(keys, q, 2)
    assert qk_data.recall_per_query(np.array([[0, 0]]), keys, q, sc[:, 1], 2)[0] == 0.5    # duplicates count once
    assert qk_data.recall_per_query(np.array([[-1, 1]]), keys, q, sc[:, 1], 2)[0] == 0.5   # -1 padding


def test_synthetic_ood_is_out_of_distribution():
    import qk_data
    ood = qk_data.make_synthetic("synthetic_ood", n=2048, d=32, n_eval=64)[0]
    ind = qk_data.make_synthetic("in_distribution", n=2048, d=32, n_eval=64)[0]
    assert qk_data.mahalanobis_ratio(ood) > 2.0
    assert 0.8 < qk_data.mahalanobis_ratio(ind) < 1.25
    assert ood.train_q.shape == (2048, 32) and ood.eval_q.shape == (64, 32)
    assert not np.shares_memory(ood.train_q, ood.eval_q)


def test_real_split_has_no_eval_queries_in_training():
    import qk_data
    p = qk_data.load_real(layers=[3], heads=[0])[0]
    assert p.keys.shape == (8128, 64) and p.eval_q.shape == (64, 64) and p.train_q.shape == (63, 64)
    # no training query equals an evaluation query
    assert not any(np.array_equal(t, e) for t in p.train_q for e in p.eval_q)


def test_decode_dump_appends_the_greedy_continuation(tmp_path):
    # --decode N: the prompt is the one a plain dump of T - N tokens makes, followed by the model's greedy tokens; the
    # loader's default split then evaluates the decode queries against the prompt's keys, trained on the whole prompt
    import dump_model_qk
    import qk_data
    plain = np.load(dump_model_qk.main(["--T", "496", "--device", "cpu", "--out", str(tmp_path / "plain.npz")]))
    dec = np.load(dump_model_qk.main(["--T", "512", "--decode", "16", "--device", "cpu",
                                      "--out", str(tmp_path / "dec.npz")]))
    assert np.array_equal(dec["tokens"][:496], plain["tokens"])
    assert int(dec["tokens"][496]) == int(plain["pred"])        # the first generated token is the prompt's greedy one
    np.testing.assert_allclose(dec["k"][:, :, :496].astype(np.float32), plain["k"].astype(np.float32), atol=2e-2)
    meta = json.loads(str(dec["meta"]))
    assert meta["decode_tokens"] == 16 and meta["prompt_tokens"] == 496
    p = qk_data.load_model_qk(str(tmp_path / "dec.npz"), layers=[2], heads=[1], n_eval=8)[0]
    assert p.keys.shape == (496, 64) and p.train_q.shape == (496, 64) and p.eval_q.shape == (8, 64)
    np.testing.assert_array_equal(p.eval_q, dec["q"][2, 1, 496:504])   # the first 8 decode queries
    with pytest.raises(ValueError, match="decode tokens"):
        qk_data.load_model_qk(str(tmp_path / "dec.npz"), n_eval=17)


def test_build_time_mode():
    lines, err = _run("--build-time", "--quick", "--json", "--bt-n", "1024", "--bt-d", "32", "--bt-heads", "2",
                      "--bt-kv-heads", "1", "--bt-layers", "1", "--bt-indexes",
                      ",".join(_installed_baselines() + (["query_guided"] if _has_query_guided() else [])))
    assert lines, err[-2000:]
    for r in lines:
        assert r["bench"] == "build_time"
        assert r["builds_done"] == r["builds"] and r["total_s"] is not None and r["total_s"] >= 0
        assert r["builds"] == (2 if r["index"] == "query_guided" else 1)


@pytest.mark.skipif(not _has_query_guided(), reason="retrieval_attention not built")
def test_sharing_per_kv_head_vs_per_query_head():
    # real dump: 6 query heads / 2 kv heads, so query heads 0-2 share kv head 0 (one pooled graph under per_kv_head)
    lines, err = _run("--json", "--data", "real", "--layers", "3", "--heads", "0,1,2", "--n-eval", "8", "--k", "10",
                      "--indexes", "query_guided,flat", "--sharing", "per_query_head,per_kv_head")
    rows = [r for r in lines if r["bench"] == "recall"]
    assert {r["sharing"] for r in rows} == {"per_query_head", "per_kv_head"}, err[-2000:]
    for r in rows:
        assert r["heads"] == 3 and r["queries"] == 3 * 8
        assert r["indexes_built"] == (3 if r["sharing"] == "per_query_head" else 1)
        assert r["build_s_total"] == pytest.approx(r["build_s"] * r["indexes_built"], rel=0.05, abs=0.01)
    qg = {r["sharing"]: r for r in rows if r["index"] == "query_guided"}
    # the pooled graph is trained on the three heads' training queries together
    assert qg["per_kv_head"]["train_queries"] == 3 * qg["per_query_head"]["train_queries"]
    summaries = [r for r in lines if r["bench"] == "recall_summary"]
    assert {(s["index"], s["sharing"]) for s in summaries} == {(i, sh) for i in ("query_guided", "flat")
                                                               for sh in ("per_query_head", "per_kv_head")}
    for s in summaries:
        if s["index"] == "flat":
            assert s["ratio_vs_query_guided"] is None or s["ratio_vs_query_guided"] >= 1.0


def test_sharing_rejects_unknown_mode():
    env = dict(os.environ)
    p = subprocess.run([sys.executable, os.path.join(BENCH, "recall.py"), "--json", "--data", "synthetic_ood", "--n", "256",
                        "--indexes", "flat", "--sharing", "per_layer"], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env=env)
    assert p.returncode != 0 and "unknown --sharing" in p.stderr


def test_cut_static_set_keeps_the_cpu_keys_only():
    import qk_data
    p = qk_data.load_real(layers=[3], heads=[0])[0]
    cut = qk_data.cut_static_set(p, 128, 512)
    assert cut.n == p.n - 640 and np.array_equal(cut.keys, p.keys[128 : p.n - 512])
    assert np.array_equal(cut.train_q, p.train_q) and np.array_equal(cut.eval_q, p.eval_q)
    assert cut.meta["n_sink"] == 128 and cut.meta["n_window"] == 512
    with pytest.raises(ValueError, match="leaves no keys"):
        qk_data.cut_static_set(p, 4000, p.n - 4000)


def test_static_set_flag_measures_over_the_cpu_keys():
    lines, err = _run("--json", "--data", "real", "--layers", "3", "--heads", "0", "--n-eval", "8", "--k", "10",
                      "--indexes", "flat", "--static-set", "100,400")
    import qk_data
    n_all = qk_data.load_real(layers=[3], heads=[0], n_eval=8)[0].n
    rows = [r for r in lines if r["bench"] == "recall"]
    assert rows, err[-2000:]
    for r in rows:
        assert r["static_set"] == [100, 400] and r["n"] == n_all - 500
        assert r["recall"] == pytest.approx(1.0)  # the flat scan is exact over the keys it holds
    assert all(s["static_set"] == [100, 400] for s in lines if s["bench"] == "recall_summary")
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "python"))
    p = subprocess.run([sys.executable, os.path.join(BENCH, "recall.py"), "--json", "--data", "real", "--indexes", "flat",
                        "--static-set", "100"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert p.returncode != 0 and "--static-set: expected SINK,WINDOW" in p.stderr


def test_missing_baseline_package_is_left_out_or_reported(monkeypatch, capsys):
    """Without hnswlib (as on the GPU machine), the default index list leaves it out with a note, and asking for it
    by name stops with what to install instead of an ImportError traceback."""
    import importlib.util

    import recall
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hnswlib" else real(name, *a))
    assert recall.index_names(None, "query_guided,hnswlib,faiss_ivf") == ["query_guided", "faiss_ivf"]
    assert "hnswlib needs the hnswlib package" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="pip install hnswlib"):
        recall.index_names("hnswlib,faiss_ivf", "query_guided")
    assert recall.index_names("faiss_ivf,query_guided", "hnswlib") == ["faiss_ivf", "query_guided"]
