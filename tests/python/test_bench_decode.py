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
