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


def test_chat_long_document_quick():
    out = run("examples/chat_long_document.py", "--quick", "--device", "cpu")
    assert "full attention" in out and "retrieval attention" in out
    for name in ("pass key", "key-", "magic number for"):
        assert name in out  # one question of each of the model's three formats
    # a 1,500-token document with three facts in the CPU part: both methods answer every question
    assert "full attention: 3/3 correct; retrieval attention: 3/3 correct" in out
    assert "keys scanned per query" in out


def test_long_document_qa_quick():
    out = run("examples/long_document_qa.py", "--quick", "--device", "cpu")
    assert "saved to" in out and "prefill + index build" in out
    # a 1,500-token document prefilled once; every question answered from a freshly loaded copy of its cache
    assert "3/3 answers correct from the saved cache" in out
    assert "same answer as re-reading the document: True" in out
    assert "time saved vs rebuilding" in out
