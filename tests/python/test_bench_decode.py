"""Smoke test of benchmarks/decode_latency.py: the --quick code path (CPU device) on tiny shapes, the JSON fields of
DESIGN.md section 6 plus the breakdown, and sanity relations between the methods. Well under 20 s on 2 cores."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks", "decode_latency.py")

REQUIRED = {"bench": str, "context": int, "method": str, "ms_per_token": float, "gpu_kv_bytes": int, "cpu_kv_bytes": int,
            "recall": float, "device": str, "build_s": float, "layers_measured": int, "layers_reported": int}
BREAKDOWN = ("gpu_static_ms", "cpu_search_ms", "cpu_attention_ms", "transfer_ms", "merge_ms", "update_ms_per_token",
             "floor_ms", "cpu_bytes_read_per_token", "scanned_frac", "mass_frac_topk")


def _has_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [x for x in (os.environ.get("PYTHONPATH", ""), os.path.join(REPO, "python")) if x]))
    args = ["--quick", "--json", "--device", "cpu", "--contexts", "1536", "--q-heads", "4", "--kv-heads", "2",
            "--head-dim", "64", "--steps", "2", "--warmup", "1", "--probe-queries", "4", "--flush-mb", "0",
            "--max-train-queries", "512", "--ef-sweep", "32,128", "--out", str(out), "--no-plot"]
    p = subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    res = [json.loads(x) for x in p.stdout.splitlines() if x.strip()]
    assert (out / "decode_latency_quick.jsonl").exists()
    return res


def test_fields_and_methods(lines):
    rows = {r["method"]: r for r in lines if r["bench"] == "decode"}
    expected = {"full", "ours", "flat", "static"} | ({"ivf"} if _has_faiss() else set())
    assert set(rows) == expected
    for m, r in rows.items():
        for k, t in REQUIRED.items():
            assert isinstance(r[k], t) or (t is float and isinstance(r[k], int)), (m, k, r[k])
        assert r["context"] == 1536 and r["layers_reported"] == 32 and r["layers_measured"] == 1
        assert r["ms_per_token"] > 0
        if m != "full":
            for k in BREAKDOWN:
                assert k in r, (m, k)
    assert lines[-1]["bench"] == "decode_env"


def test_sanity_relations(lines):
    rows = {r["method"]: r for r in lines if r["bench"] == "decode"}
    # static set on the device: 128 sink + 512 window tokens (+ the decode tokens) vs all of the context for full
    assert rows["ours"]["gpu_kv_bytes"] < rows["full"]["gpu_kv_bytes"]
    assert rows["ours"]["gpu_kv_bytes"] == rows["flat"]["gpu_kv_bytes"] == rows["static"]["gpu_kv_bytes"]
    assert rows["full"]["recall"] == 1.0
    # exact flat search retrieves the exact top-k: recall 1 and the top-k's whole softmax mass
    assert rows["flat"]["recall"] == pytest.approx(1.0)
    assert rows["flat"]["mass_frac_topk"] == pytest.approx(1.0, abs=1e-3)
    assert rows["flat"]["scanned_frac"] == pytest.approx(1.0)
    assert rows["static"]["recall"] == 0.0 and rows["static"]["cpu_bytes_read_per_token"] == 0
    assert 0.0 < rows["ours"]["recall"] <= 1.0
    assert 0.0 < rows["ours"]["scanned_frac"] <= 1.0
    assert [e for e, _, _ in rows["ours"]["ef_sweep"]] == [32, 128]
    for m in ("ours", "flat"):  # the fused call's time split by its thread time, which both phases take
        assert rows[m]["cpu_split"] == "thread_time"
        assert rows[m]["cpu_search_thread_ms"] > 0 and rows[m]["cpu_attention_thread_ms"] > 0
        assert rows[m]["cpu_search_ms"] + rows[m]["cpu_attention_ms"] == pytest.approx(rows[m]["cpu_retrieve_attend_ms"], rel=1e-3)
    if "ivf" in rows:
        assert rows["ivf"]["ivf_nprobe"] >= 1 and rows["ivf"]["cpu_search_ms_measured"] is True


def test_ours_hook_retrieves_what_ours_retrieves(tmp_path):
    """--methods ours,ours_hook: the hook-path variant is built and searched like ours (same index, sharing, beam), so
    the side-by-side timing compares the two decode paths and nothing else."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [x for x in (os.environ.get("PYTHONPATH", ""), os.path.join(REPO, "python")) if x]))
    args = ["--quick", "--json", "--device", "cpu", "--contexts", "1536", "--q-heads", "4", "--kv-heads", "2", "--head-dim", "64",
            "--steps", "2", "--warmup", "1", "--probe-queries", "4", "--flush-mb", "0", "--max-train-queries", "512",
            "--ef-sweep", "", "--methods", "ours,ours_hook", "--no-plot"]
    p = subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["method"]: r for r in map(json.loads, p.stdout.splitlines()) if r["bench"] == "decode"}
    assert set(rows) == {"ours", "ours_hook"}
    for key in ("recall", "scanned_frac", "mass_frac_topk", "gpu_kv_bytes"):
        assert rows["ours"][key] == rows["ours_hook"][key], key


def test_model_data_keeps_the_models_scores():
    """--data model: the bundled model's own vectors fill the first 64 of the benchmark's dims, so every score (after the
    query's sqrt(d / 64) scale) is the model's q.k / 8, the extra dims are zeros, and benchmark kv heads map to distinct
    model heads layer-major."""
    import math

    import torch

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import decode_latency as dl

    args = dl.parse_args(["--quick", "--data", "model", "--q-heads", "8", "--kv-heads", "2", "--head-dim", "128",
                          "--probe-queries", "3"])
    T, S = 400, 2
    rec = dl.record_model_inputs(args, T, S, torch.device("cpu"))
    assert rec["k"][0].shape == (2, T + S + 3, 64) and rec["q"][0].shape == (6, T + S + 3, 64)
    assert rec["rope_inv_freq"] is not None and rec["rope_inv_freq"].numel() == 32
    d0 = dl.ModelLayerData(args, T, S, 0, torch.device("cpu"), rec)
    d1 = dl.ModelLayerData(args, T, S, 1, torch.device("cpu"), rec)
    assert d0.keys.shape == (1, 2, T + S, 128) and d0.train_q.shape == (1, 8, T, 128)
    assert not d0.keys[..., 64:].any() and not d0.train_q[..., 64:].any() and not d0.values[..., 64:].any()
    # benchmark layer 1's kv head 0 is model kv head 2: model layer 1, kv head 0
    assert torch.equal(d1.keys[0, 0, :, :64], rec["k"][1][0, : T + S].bfloat16())
    assert not torch.equal(d0.keys[0, 0], d1.keys[0, 0])
    # query head 5 = group 1, slot 1 -> model query head 1 * 3 + 1 of layer 0; its probe queries are positions T+S..
    q_model = rec["q"][0][4, T + S :].float()
    k_model = rec["k"][0][1, :T].float()
    want = q_model @ k_model.T / 8.0
    got = d0.probe_q[5, S:] @ d0.keys[0, 1, :T].float().T / math.sqrt(128)
    assert torch.allclose(got, want, atol=0.05 * float(want.abs().max()))
    # the group's fourth query head repeats the first (the model has three per kv head)
    assert torch.equal(d0.train_q[0, 3], d0.train_q[0, 0])


def test_model_data_run():
    """The whole --data model path on the CPU: lines say data=model_qk, flat is exact, ours moves half of its training
    queries by the model's RoPE."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [x for x in (os.environ.get("PYTHONPATH", ""), os.path.join(REPO, "python")) if x]))
    args = ["--quick", "--json", "--device", "cpu", "--data", "model", "--contexts", "1536", "--q-heads", "4", "--kv-heads", "2",
            "--head-dim", "64", "--steps", "2", "--warmup", "1", "--probe-queries", "4", "--flush-mb", "0",
            "--max-train-queries", "512", "--ef-sweep", "", "--methods", "flat,ours", "--no-plot"]
    p = subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["method"]: r for r in map(json.loads, p.stdout.splitlines()) if r["bench"] == "decode"}
    assert set(rows) == {"flat", "ours"}
    assert all(r["data"] == "model_qk" and r["train_queries"] == 512 for r in rows.values())
    assert rows["flat"]["recall"] == pytest.approx(1.0)
    assert rows["ours"]["train_queries_shifted"] == 0.5 and 0.0 < rows["ours"]["recall"] <= 1.0
