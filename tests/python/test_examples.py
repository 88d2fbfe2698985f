"""The examples run as a user would run them (small settings) and print what they promise."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run(*args, timeout=300):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_index_search_example():
    out = run("examples/index_search.py", "--k", "10", "--ef", "64")
    assert "recall@10" in out and "same results: True" in out


def test_passkey_demo_small():
    out = run("examples/passkey_demo.py", "--context", "1500", "--new-tokens", "4", "--device", "cpu")
    assert "full attention" in out and "retrieval attention" in out
    assert "answers match" in out  # both methods give the same answer on this input
