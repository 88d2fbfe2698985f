"""Reliability of every public entry point (issue 6): bad inputs raise a clear exception naming the argument and never
crash the process; index files are validated; saves are atomic; concurrent searches and adds are safe.

Bad-input cases run in child processes (one child per group, restarted after a crash), so a segfault or abort in C++
fails only its own case with the child's stderr instead of killing the test runner. The raw torch.ops are called
directly there (bypassing the Python wrappers' checks), so a C++ exception that fails to cross the op boundary shows up
as a crash of exactly that case.

Cases that expose known bugs are marked xfail(strict=True) with the reason; fixing the bug turns them into XPASS, which
fails, so the marker has to be removed together with the fix.
"""
from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import retrieval_attention as ra

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ------------------------------------------------------------------------------------------------------------------
# child-process runner

_CHILD = r'''
import json, os, struct, sys, traceback
import numpy as np
import torch
import retrieval_attention as ra
ops = torch.ops.retrieval_attention
torch.set_num_threads(2)
def _fnv(b):
    h = 1469598103934665603
    for x in b:
        h = ((h ^ x) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h
def refresh_checksum(b):  # index file: header 40 bytes | payload | u64 FNV-1a of everything before it
    b = bytearray(b)
    struct.pack_into("<q", b, 32, len(b) - 48)
    struct.pack_into("<Q", b, len(b) - 8, _fnv(bytes(b[:-8])))
    return bytes(b)
__SETUP__
for _name, _code in __CASES__:
    print("@@START " + _name, flush=True)
    try:
        exec(_code, dict(globals()))
        _res = [_name, ["OK"], ""]
    except BaseException as _e:
        _res = [_name, [c.__name__ for c in type(_e).__mro__], (str(_e) or repr(_e))[:800]]
    print("@@RESULT " + json.dumps(_res), flush=True)
'''


def run_cases(setup: str, cases: dict[str, str], timeout: float = 600) -> dict[str, tuple[list[str], str]]:
    """Run each case's code in a child process (after `setup`); returns name -> (exception MRO names or ["OK"], message).

    A case during which the child dies is recorded as (["CRASH"], exit status + stderr) and the child is restarted
    with the remaining cases."""
    results: dict[str, tuple[list[str], str]] = {}
    remaining = list(cases.items())
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONFAULTHANDLER="1")
    while remaining:
        script = _CHILD.replace("__SETUP__", textwrap.dedent(setup)).replace("__CASES__", repr(remaining))
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("@@START "):
                started = line[len("@@START "):]
            elif line.startswith("@@RESULT "):
                name, kinds, msg = json.loads(line[len("@@RESULT "):])
                results[name] = (kinds, msg)
                started = None
        if started is not None or proc.returncode != 0:
            victim = started if started is not None else next((n for n, _ in remaining if n not in results), None)
            if victim is None:
                break
            if started is None and not any(n in results for n, _ in remaining):  # died in setup: nothing can run
                for n, _ in remaining:
                    results[n] = (["CRASH"], f"setup failed, exit status {proc.returncode}\n{proc.stderr[-3000:]}")
                break
            results[victim] = (["CRASH"], f"exit status {proc.returncode} ({_signame(proc.returncode)})\n{proc.stderr[-3000:]}")
        remaining = [(n, c) for n, c in remaining if n not in results]
    return results


def _signame(rc: int) -> str:
    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            pass
    return "exit" if rc >= 0 else "signal"


CLEAN = ("ValueError", "TypeError", "RuntimeError")


def check_outcome(result, expect):
    """expect: "ok", "no_crash" (success or a clean exception) or (exception class names, regex the message must match)."""
    kinds, msg = result
    assert kinds != ["CRASH"], f"the process crashed:\n{msg}"
    if expect == "no_crash":
        assert kinds == ["OK"] or any(n in kinds for n in CLEAN), f"{kinds[0]}: {msg}"
        return
    if expect == "ok":
        assert kinds == ["OK"], f"expected success, got {kinds[0]}: {msg}"
        return
    names, pattern = expect
    names = (names,) if isinstance(names, str) else names
    assert kinds != ["OK"], f"bad input silently accepted (expected {'/'.join(names)} matching {pattern!r})"
    assert any(n in kinds for n in names), f"expected {'/'.join(names)}, got {kinds[0]}: {msg}"
    assert re.search(pattern, msg), f"{kinds[0]} message does not match {pattern!r}: {msg}"


class CaseGroup:
    """Cases of one child process; the child runs once per test session, on first use."""

    def __init__(self, setup: str):
        self.setup = setup
        self.cases: dict[str, tuple[str, object]] = {}
        self.xfail: dict[str, str] = {}
        self._results = None

    def add(self, name, code, expect, xfail: str | None = None):
        assert name not in self.cases, name
        self.cases[name] = (textwrap.dedent(code).strip(), expect)
        if xfail:
            self.xfail[name] = xfail

    def params(self):
        return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=self.xfail[n])) if n in self.xfail else n for n in self.cases]

    def check(self, name):
        if self._results is None:
            self._results = run_cases(self.setup, {n: c for n, (c, _) in self.cases.items()})
        check_outcome(self._results[name], self.cases[name][1])


# ------------------------------------------------------------------------------------------------------------------
# torch ops: the Python wrappers (ra.*) and the raw torch.ops.retrieval_attention.* with the same bad inputs

OPS = CaseGroup('''
g = torch.Generator().manual_seed(0)
def args():
    return (torch.randn(4, 1, 8, generator=g), torch.randn(2, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g),
            torch.randint(0, 10, (4, 1, 3), generator=g))
def call(fn_name, raw, *a):
    fn = getattr(ops, fn_name) if raw else getattr(ra, fn_name)
    return fn(*a)
''')

_SPARSE_BAD = {  # name: (expression of (q, k, v, ids, scale) from a = args(), expected types, message regex)
    "q_int": ("(a[0].int(), a[1], a[2], a[3], 0.5)", "TypeError", r"\bq\b.*(dtype|floating)"),
    "keys_int": ("(a[0], a[1].int(), a[2], a[3], 0.5)", "TypeError", r"keys.*(dtype|float32)"),
    "keys_bool": ("(a[0], a[1] > 0, a[2], a[3], 0.5)", "TypeError", r"keys.*(dtype|float32)"),
    "values_dtype_differs": ("(a[0], a[1], a[2].half(), a[3], 0.5)", "TypeError", r"values dtype"),
    "q_rank2": ("(a[0][0], a[1], a[2], a[3], 0.5)", "ValueError", r"q must have shape"),
    "keys_rank2": ("(a[0], a[1][0], a[2], a[3], 0.5)", "ValueError", r"keys must have shape"),
    "values_rank4": ("(a[0], a[1], a[2][None], a[3], 0.5)", "ValueError", r"values must have shape"),
    "head_dim_mismatch": ("(a[0], a[1][:, :, :4], a[2], a[3], 0.5)", "ValueError", r"head_dim"),
    "values_rows_mismatch": ("(a[0], a[1], a[2][:, :5], a[3], 0.5)", "ValueError", r"values shape"),
    "gqa_not_multiple": ("(torch.randn(3, 1, 8), a[1], a[2], torch.zeros(3, 1, 3, dtype=torch.long), 0.5)", "ValueError", r"multiple of kv_heads"),
    "zero_kv_heads": ("(torch.randn(0, 1, 8), torch.randn(0, 10, 8), torch.randn(0, 10, 8), torch.zeros(0, 1, 3, dtype=torch.long), 0.5)",
                      "ValueError", r"kv_heads"),
    "zero_head_dim": ("(torch.randn(4, 1, 0), torch.randn(2, 10, 0), torch.randn(2, 10, 0), a[3], 0.5)", "ValueError", r"head dims must be positive"),
    "ids_int32": ("(a[0], a[1], a[2], a[3].int(), 0.5)", "TypeError", r"ids must be int64"),
    "ids_float": ("(a[0], a[1], a[2], a[3].float(), 0.5)", "TypeError", r"ids must be int64"),
    "ids_rank2": ("(a[0], a[1], a[2], a[3][0], 0.5)", "ValueError", r"ids must have shape"),
    "ids_shape_mismatch": ("(a[0], a[1], a[2], torch.zeros(4, 2, 3, dtype=torch.long), 0.5)", "ValueError", r"ids shape"),
    "ids_equal_n": ("(a[0], a[1], a[2], torch.full((4, 1, 3), 10), 0.5)", "ValueError", r"ids: key id 10 is out of range"),
    "ids_minus_two": ("(a[0], a[1], a[2], torch.full((4, 1, 3), -2), 0.5)", "ValueError", r"ids: key id -2 is out of range"),
    "ids_huge": ("(a[0], a[1], a[2], torch.full((4, 1, 3), 2**62), 0.5)", "ValueError", r"out of range"),
    "ids_int64_min": ("(a[0], a[1], a[2], torch.full((4, 1, 3), -2**63), 0.5)", "ValueError", r"out of range"),
    "ids_one_bad_among_good": ("(a[0], a[1], a[2], torch.cat([a[3][:3], torch.tensor([[[0, 1, 11]]])]), 0.5)", "ValueError", r"out of range"),
        # the raw op's argument parser reports type mismatches as RuntimeError ("Expected a value of type 'Tensor' for argument 'q'")
    "q_not_a_tensor": ("([[0.0]], a[1], a[2], a[3], 0.5)", ("TypeError", "RuntimeError"), r"(\bq\b|Tensor)"),
    "scale_not_a_number": ("(a[0], a[1], a[2], a[3], 'x')", CLEAN, r"(scale|float|could not convert)"),
}
for _name, (_expr, _exc, _pat) in _SPARSE_BAD.items():
    for _raw in (False, True):
        OPS.add(f"sparse_attention/{'raw' if _raw else 'wrapper'}/{_name}", f"a = args(); call('sparse_attention', {_raw}, *{_expr})", (_exc, _pat))

_DENSE_BAD = {
    "causal_more_queries_than_keys": ("(torch.randn(4, 11, 8), a[1], a[2], 0.5, True)", "ValueError", r"causal"),
    "q_int": ("(a[0].int(), a[1], a[2], 0.5, False)", "TypeError", r"\bq\b.*(dtype|floating)"),
    "values_dtype_differs": ("(a[0], a[1].bfloat16(), a[2], 0.5, False)", "TypeError", r"values dtype"),
    "q_rank4": ("(a[0][None], a[1], a[2], 0.5, False)", "ValueError", r"q must have shape"),
    "gqa_not_multiple": ("(torch.randn(5, 1, 8), a[1], a[2], 0.5, False)", "ValueError", r"multiple of kv_heads"),
    "head_dim_mismatch": ("(torch.randn(4, 1, 7), a[1], a[2], 0.5, False)", "ValueError", r"head_dim"),
}
for _name, (_expr, _exc, _pat) in _DENSE_BAD.items():
    for _raw in (False, True):
        OPS.add(f"dense_attention/{'raw' if _raw else 'wrapper'}/{_name}", f"a = args(); call('dense_attention', {_raw}, *{_expr})", (_exc, _pat))

_MERGE_BAD = {
    "out_shape_mismatch": ("(o, l, o[..., :4], l)", "ValueError", r"same shape"),
    "lse_shape_mismatch": ("(o, l[:2], o, l)", "ValueError", r"lse_a"),
    "lse_b_shape_mismatch": ("(o, l, o, l[..., None])", "ValueError", r"lse"),
    "out_int": ("(o.int(), l, o, l)", "TypeError", r"(out_a|merge_attention inputs)"),
    "lse_int": ("(o, l, o, l.long())", "TypeError", r"(lse_b|merge_attention inputs)"),
    "zero_dim": ("(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0))", "ValueError", r"same shape"),
}
for _name, (_expr, _exc, _pat) in _MERGE_BAD.items():
    for _raw in (False, True):
        OPS.add(f"merge_attention/{'raw' if _raw else 'wrapper'}/{_name}",
                f"a = args(); o, l = ra.dense_attention(a[0], a[1], a[2], 0.5); call('merge_attention', {_raw}, *{_expr})", (_exc, _pat))
OPS.add("merge_attention/wrapper/out_b_none", "a = args(); o, l = ra.dense_attention(a[0], a[1], a[2], 0.5); ra.merge_attention(o, l, None, l)",
        ("TypeError", r"out_b must be a torch.Tensor"))
OPS.add("merge_attention/raw/out_b_none", "a = args(); o, l = ra.dense_attention(a[0], a[1], a[2], 0.5); ops.merge_attention(o, l, None, l)",
        (CLEAN, r""))
OPS.add("sparse_attention/wrapper/mixed_devices", "a = args(); ra.sparse_attention(a[0].to('meta'), a[1], a[2], a[3].to('meta'), 0.5)",
        ("ValueError", r"one device"))
OPS.add("merge_attention/wrapper/mixed_devices", "a = args(); o, l = ra.dense_attention(a[0], a[1], a[2], 0.5); ra.merge_attention(o, l, o.to('meta'), l)",
        ("ValueError", r"one device"))

# valid-but-unusual inputs: non-contiguous views, empty dimensions, NaN propagation (no crash, documented results)
for _raw in (False, True):
    _w = "raw" if _raw else "wrapper"
    OPS.add(f"sparse_attention/{_w}/non_contiguous_equals_contiguous", f"""
        q = torch.randn(8, 3, 4).permute(2, 1, 0)           # (4, 3, 8)
        k = torch.randn(8, 10, 2).permute(2, 1, 0)          # (2, 10, 8)
        v = torch.randn(2, 6, 10)[:, ::2].transpose(1, 2)   # (2, 10, 3)
        ids = torch.randint(-1, 10, (5, 3, 4)).permute(2, 1, 0)  # (4, 3, 5)
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or ids.is_contiguous())
        o1, l1 = call('sparse_attention', {_raw}, q, k, v, ids, 0.3)
        o2, l2 = call('sparse_attention', {_raw}, q.contiguous(), k.contiguous(), v.contiguous(), ids.contiguous(), 0.3)
        assert torch.equal(o1, o2) and torch.equal(l1, l2)
    """, "ok")
    OPS.add(f"dense_attention/{_w}/non_contiguous_equals_contiguous", f"""
        q = torch.randn(8, 3, 4).permute(2, 1, 0); k = torch.randn(8, 10, 2).permute(2, 1, 0); v = torch.randn(8, 10, 2).permute(2, 1, 0)
        o1, l1 = call('dense_attention', {_raw}, q, k, v, 0.3, True)
        o2, l2 = call('dense_attention', {_raw}, q.contiguous(), k.contiguous(), v.contiguous(), 0.3, True)
        assert torch.equal(o1, o2) and torch.equal(l1, l2)
    """, "ok")
    OPS.add(f"merge_attention/{_w}/non_contiguous_and_empty_halves", f"""
        o = torch.randn(5, 4, 3).transpose(0, 1); l = torch.randn(5, 4).t()
        ninf = torch.full((4, 5), float('-inf'))
        out, lse = call('merge_attention', {_raw}, o, l, torch.zeros(4, 5, 3), ninf)   # b contributes nothing
        assert torch.allclose(out, o) and torch.allclose(lse, l)
        out, lse = call('merge_attention', {_raw}, torch.zeros(4, 5, 3), ninf, torch.zeros(4, 5, 3), ninf)  # both empty
        assert (out == 0).all() and torch.isneginf(lse).all()
    """, "ok")
    OPS.add(f"sparse_attention/{_w}/empty_queries_keys_and_selections", f"""
        a = args()
        o, l = call('sparse_attention', {_raw}, torch.randn(4, 0, 8), a[1], a[2], torch.zeros(4, 0, 3, dtype=torch.long), 0.5)
        assert o.shape == (4, 0, 8) and l.shape == (4, 0)
        o, l = call('sparse_attention', {_raw}, a[0], a[1], a[2], torch.zeros(4, 1, 0, dtype=torch.long), 0.5)   # k = 0
        assert (o == 0).all() and torch.isneginf(l).all()
        o, l = call('sparse_attention', {_raw}, a[0], torch.randn(2, 0, 8), torch.randn(2, 0, 8), torch.full((4, 1, 3), -1), 0.5)  # n = 0
        assert (o == 0).all() and torch.isneginf(l).all()
    """, "ok")
    OPS.add(f"dense_attention/{_w}/no_keys", f"""
        o, l = call('dense_attention', {_raw}, torch.randn(4, 2, 8), torch.randn(2, 0, 8), torch.randn(2, 0, 8), 0.5, False)
        assert (o == 0).all() and torch.isneginf(l).all()
    """, "ok")
    OPS.add(f"sparse_attention/{_w}/nan_key_propagates", f"""
        a = args(); k = a[1].clone(); k[0, 4, 3] = float('nan')            # kv head 0 serves q heads 0 and 1
        ids = torch.arange(10).expand(4, 1, 10)                             # every query selects every key
        o, l = call('sparse_attention', {_raw}, a[0], k, a[2], ids, 0.5)
        assert torch.isnan(o[:2]).all() and torch.isnan(l[:2]).all() and torch.isfinite(o[2:]).all()
    """, "ok")
    for _op, _call in (("sparse_attention", "call('sparse_attention', {raw}, q, a[1], a[2], a[3], 0.5)"),
                       ("dense_attention", "call('dense_attention', {raw}, q, a[1], a[2], 0.5, False)")):
        OPS.add(f"{_op}/{_w}/nan_query_propagates", f"""
            a = args(); q = a[0].clone(); q[1, 0, 3] = float('nan')
            o, l = {_call.format(raw=_raw)}
            assert torch.isfinite(o[0]).all() and torch.isfinite(o[2:]).all()
            assert torch.isnan(o[1]).all() and torch.isnan(l[1]).all(), f"NaN query gave out={{o[1].tolist()}}, lse={{l[1].tolist()}}"
        """, "ok")


@pytest.mark.parametrize("case", OPS.params())
def test_ops_bad_and_edge_inputs(case):
    OPS.check(case)


# ------------------------------------------------------------------------------------------------------------------
# indexes: constructors, search, add

INDEX = CaseGroup('''
g = torch.Generator().manual_seed(0)
K = torch.randn(300, 8, generator=g)
Q = torch.randn(40, 8, generator=g)
IDX = {"flat": ra.FlatIndex(K), "qg": ra.QueryGuidedIndex(K, Q, degree=8, k_train=16, ef_build=32)}
def make(kind, keys, **kw):
    return ra.FlatIndex(keys) if kind == "flat" else ra.QueryGuidedIndex(keys, kw.pop("train", Q), **kw)
''')

_KEYS_BAD = {
    "rank1": ("torch.randn(10)", "ValueError", r"keys must have shape \(n, dim\)"),
    "rank3": ("torch.randn(2, 3, 8)", "ValueError", r"keys must have shape"),
    "empty_rows": ("torch.zeros(0, 8)", "ValueError", r"keys must not be empty"),
    "zero_dim": ("torch.zeros(5, 0)", "ValueError", r"keys must have a positive dimension"),
    "int": ("torch.ones(5, 8, dtype=torch.int32)", "TypeError", r"keys must have dtype"),
    "float64_tensor": ("torch.randn(5, 8, dtype=torch.float64)", "TypeError", r"keys must have dtype"),
    "bool": ("torch.ones(5, 8, dtype=torch.bool)", "TypeError", r"keys must have dtype"),
    "complex": ("torch.randn(5, 8, dtype=torch.complex64)", "TypeError", r"keys must have dtype"),
    "nan": ("torch.tensor([[0.0] * 7 + [float('nan')]] * 3)", "ValueError", r"keys contains NaN or Inf"),
    "inf": ("torch.tensor([[0.0] * 7 + [float('-inf')]] * 3)", "ValueError", r"keys contains NaN or Inf"),
    "half_inf": ("torch.full((3, 8), 70000.0).half()", "ValueError", r"keys contains NaN or Inf"),
    "list": ("[[1.0] * 8]", "TypeError", r"keys must be a torch.Tensor or numpy.ndarray"),
    "none": ("None", "TypeError", r"keys must be a torch.Tensor or numpy.ndarray"),
    "numpy_int": ("np.ones((5, 8), dtype=np.int64)", "TypeError", r"keys"),
    "numpy_object": ("np.array([[object()] * 8])", "TypeError", r"keys"),
    "meta_device": ("torch.randn(5, 8, device='meta')", CLEAN, r""),
}
for _kind in ("flat", "qg"):
    for _name, (_expr, _exc, _pat) in _KEYS_BAD.items():
        INDEX.add(f"{_kind}/keys/{_name}", f"make('{_kind}', {_expr})", (_exc, _pat))
    INDEX.add(f"{_kind}/keys/non_contiguous_equals_contiguous", f"""
        k = torch.randn(8, 300).t()
        assert not k.is_contiguous()
        a, b = make('{_kind}', k), make('{_kind}', k.contiguous())
        assert torch.equal(a.search(Q, k=5, ef=64)[0], b.search(Q, k=5, ef=64)[0])
    """, "ok")
    INDEX.add(f"{_kind}/keys/numpy_float64_is_converted", f"assert make('{_kind}', np.random.default_rng(0).standard_normal((50, 8))).dtype == torch.float32", "ok")

_QG_BAD = {
    "degree_1": ("degree=1", "ValueError", r"degree must be >= 2"),
    "degree_0": ("degree=0", "ValueError", r"degree"),
    "degree_1025": ("degree=1025", "ValueError", r"degree must be in \[2, 1024\]"),
    "degree_float": ("degree=2.5", "TypeError", r"degree must be an int"),
    "degree_bool": ("degree=True", "TypeError", r"degree must be an int"),
    "degree_str": ("degree='32'", "TypeError", r"degree must be an int"),
    "degree_2**70": ("degree=2**70", CLEAN + ("OverflowError",), r""),
    "k_train_0": ("k_train=0", "ValueError", r"k_train"),
    "k_train_100001": ("k_train=100001", "ValueError", r"k_train must be in"),
    "ef_build_0": ("ef_build=0", "ValueError", r"ef_build"),
    "ef_build_100001": ("ef_build=100001", "ValueError", r"ef_build must be in"),
    "train_none": ("train=None", "TypeError", r"train_queries must be a torch.Tensor"),
    "train_rank1": ("train=torch.randn(8)", "ValueError", r"train_queries must have shape"),
    "train_wrong_dim": ("train=torch.randn(10, 9)", "ValueError", r"train_queries have dim 9"),
    "train_nan": ("train=torch.tensor([[float('nan')] * 8])", "ValueError", r"train_queries contains NaN"),
    "train_inf": ("train=torch.tensor([[float('inf')] * 8])", "ValueError", r"train_queries contains NaN"),
    "train_int": ("train=torch.ones(4, 8, dtype=torch.int64)", "TypeError", r"train_queries must have dtype"),
}
for _name, (_kw, _exc, _pat) in _QG_BAD.items():
    INDEX.add(f"qg/params/{_name}", f"make('qg', K, {_kw})", (_exc, _pat))
INDEX.add("qg/params/no_training_queries_is_allowed", "i = make('qg', K, train=torch.zeros(0, 8)); assert i.search(Q, k=3)[0].shape == (40, 3)", "ok")
INDEX.add("qg/params/non_contiguous_training_queries", """
    t = torch.randn(8, 40).t()
    assert torch.equal(make('qg', K, train=t).search(Q, k=5)[0], make('qg', K, train=t.contiguous()).search(Q, k=5)[0])
""", "ok")

_SEARCH_BAD = {
    "k_0": ("Q, k=0", "ValueError", r"k must be >= 1"),
    "k_negative": ("Q, k=-3", "ValueError", r"k must be >= 1"),
    "k_above_n": ("Q, k=301", "ValueError", r"k=301 exceeds the number of indexed keys \(300\)"),
    "k_huge": ("Q, k=2**70", "ValueError", r"exceeds the number of indexed keys"),
    "k_float": ("Q, k=2.0", "TypeError", r"k must be an int"),
    "k_bool": ("Q, k=True", "TypeError", r"k must be an int"),
    "k_none": ("Q, k=None", "TypeError", r"k must be an int"),
    "ef_0": ("Q, k=3, ef=0", "ValueError", r"ef must be >= 1"),
    "ef_negative": ("Q, k=3, ef=-1", "ValueError", r"ef must be >= 1"),
    "ef_float": ("Q, k=3, ef=1.5", "TypeError", r"ef must be an int"),
    "queries_wrong_dim": ("torch.randn(3, 9), k=3", "ValueError", r"queries have dim 9, the index has dim 8"),
    "queries_rank3": ("torch.randn(2, 3, 8), k=3", "ValueError", r"queries must have shape"),
    "queries_nan": ("torch.tensor([[float('nan')] * 8]), k=3", "ValueError", r"queries contains NaN or Inf"),
    "queries_inf": ("torch.tensor([[float('inf')] + [0.0] * 7]), k=3", "ValueError", r"queries contains NaN or Inf"),
    "queries_int": ("torch.ones(2, 8, dtype=torch.int32), k=3", "TypeError", r"queries must have dtype"),
    "queries_list": ("[[0.0] * 8], k=3", "TypeError", r"queries must be a torch.Tensor"),
    "queries_meta": ("torch.randn(2, 8, device='meta'), k=3", CLEAN, r""),
}
_ADD_BAD = {
    "wrong_dim": ("torch.randn(3, 9)", "ValueError", r"new_keys have dim 9"),
    "wrong_dtype": ("torch.randn(3, 8).half()", "TypeError", r"new_keys dtype"),
    "nan": ("torch.tensor([[float('nan')] * 8])", "ValueError", r"new_keys contains NaN"),
    "empty": ("torch.zeros(0, 8)", "ValueError", r"new_keys must not be empty"),
    "rank1": ("torch.randn(8)", "ValueError", r"new_keys must have shape"),
    "list": ("[[0.0] * 8]", "TypeError", r"new_keys must be a torch.Tensor"),
    "int": ("torch.ones(3, 8, dtype=torch.int32)", "TypeError", r"new_keys must have dtype"),
}
for _kind in ("flat", "qg"):
    for _name, (_args, _exc, _pat) in _SEARCH_BAD.items():
        INDEX.add(f"{_kind}/search/{_name}", f"IDX['{_kind}'].search({_args})", (_exc, _pat))
    for _name, (_expr, _exc, _pat) in _ADD_BAD.items():
        INDEX.add(f"{_kind}/add/{_name}", f"IDX['{_kind}'].add({_expr})", (_exc, _pat))
    INDEX.add(f"{_kind}/add/failed_adds_change_nothing", f"assert IDX['{_kind}'].size == 300", "ok")
    INDEX.add(f"{_kind}/search/edge_cases", f"""
        idx = IDX['{_kind}']
        ids, sc = idx.search(torch.randn(0, 8), k=3)                 # no queries
        assert ids.shape == (0, 3) and sc.shape == (0, 3)
        assert idx.search(Q[0], k=2)[0].shape == (1, 2)                # one 1-D query
        ids, _ = idx.search(Q, k=300, ef=300)                          # k = n: every key exactly once
        assert (ids.sort(dim=1).values == torch.arange(300)).all()
        qn = torch.randn(8, 40).t()                                    # non-contiguous, float64, float16 queries
        assert torch.equal(idx.search(qn, k=5)[0], idx.search(qn.contiguous(), k=5)[0])
        assert torch.equal(idx.search(Q.double(), k=5)[0], idx.search(Q, k=5)[0])
        assert idx.search(Q.half(), k=5)[0].shape == (40, 5)
        assert idx.search(np.asarray(Q), k=5)[0].shape == (40, 5)
    """, "ok")
    INDEX.add(f"{_kind}/add/non_contiguous_and_numpy", f"""
        idx = make('{_kind}', K)
        new = torch.randn(8, 20).t() * 5
        idx.add(new); idx.add(new.contiguous().numpy())
        assert idx.size == 340
    """, "ok")
# ef far beyond the index size: the graph search reserves a beam of ef entries up front
INDEX.add("qg/search/ef_absurdly_large_is_clamped", "IDX['qg'].search(Q, k=3, ef=10**12)", "ok")
INDEX.add("flat/search/ef_absurdly_large_is_ignored", "IDX['flat'].search(Q, k=3, ef=10**12)", "ok")


@pytest.mark.parametrize("case", INDEX.params())
def test_index_bad_and_edge_inputs(case):
    INDEX.check(case)


# In a fresh process of its own: the beam overflow below corrupts the heap, and whether that faults depends on the heap's
# state (in a child that ran other cases first it may pass unnoticed).
OVERFLOW = CaseGroup("")
# finite keys whose squared norms / inner products overflow float32 (|x| ~ 1e20): scores become inf - inf = NaN in the graph
OVERFLOW.add("qg/keys/finite_but_overflowing", """
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2000, 16, generator=g); k[::7] *= 1e20
    i = ra.QueryGuidedIndex(k, torch.randn(100, 16, generator=g))
    i.add(torch.randn(500, 16, generator=g) * 1e20)
    i.search(torch.randn(64, 16, generator=g), k=10, ef=16)
""", "no_crash")


@pytest.mark.parametrize("case", OVERFLOW.params())
def test_index_overflowing_keys(case):
    OVERFLOW.check(case)


# ------------------------------------------------------------------------------------------------------------------
# index files: save paths, load paths, corrupt / foreign / crafted files

FILES = CaseGroup('''
import tempfile
D = tempfile.mkdtemp(prefix="ra-reliability-")
g = torch.Generator().manual_seed(0)
K = torch.randn(40, 4, generator=g)
Q = torch.randn(10, 4, generator=g)
FLAT, QG = ra.FlatIndex(K), ra.QueryGuidedIndex(K, Q, degree=4, k_train=8, ef_build=16)
FLAT.save(D + "/flat.raidx"); QG.save(D + "/qg.raidx")
GOOD = {"flat": open(D + "/flat.raidx", "rb").read(), "qg": open(D + "/qg.raidx", "rb").read()}
def write(name, data):
    p = os.path.join(D, name)
    with open(p, "wb") as f:
        f.write(data)
    return p
def leftovers():
    return sorted(n for n in os.listdir(D) if ".tmp-" in n)
''')

FILES.add("save/missing_directory", """
    try:
        FLAT.save(D + "/no/such/dir/x.raidx")
    finally:
        assert not os.path.exists(D + "/no") and leftovers() == []
""", ("RuntimeError", r"cannot open .*for writing"))
FILES.add("save/path_is_a_directory", """
    os.makedirs(D + "/adir", exist_ok=True)
    try:
        FLAT.save(D + "/adir")
    finally:
        assert os.path.isdir(D + "/adir") and leftovers() == []
""", ("RuntimeError", r"cannot move"))
FILES.add("save/parent_is_a_file", "FLAT.save(D + '/flat.raidx/x')", ("RuntimeError", r"cannot open"))
FILES.add("save/empty_path", "FLAT.save('')", ("ValueError", r"non-empty"))
FILES.add("save/path_not_a_string", "FLAT.save(12)", ("TypeError", r""))
FILES.add("save/path_none", "FLAT.save(None)", ("TypeError", r""))
FILES.add("save/path_with_nul_byte", """
    try:
        FLAT.save(D + "/victim\\0suffix.raidx")
    finally:
        assert not os.path.exists(D + "/victim"), "saved to the path truncated at the NUL byte"
""", ("ValueError", r"(null|NUL)"))
FILES.add("save/overwrite_keeps_a_loadable_file_and_no_temp_files", """
    p = D + "/ow.raidx"
    FLAT.save(p); QG.save(p)
    assert ra.load_index(p).index_type == "query_guided" and leftovers() == []
""", "ok")
FILES.add("load/missing", "ra.load_index(D + '/missing.raidx')", ("FileNotFoundError", r"no index file"))
FILES.add("load/directory", "ra.load_index(D)", (CLEAN + ("IsADirectoryError",), r""))
FILES.add("load/empty_file", "ra.load_index(write('empty', b''))", ("RuntimeError", r"index file .*file too short"))
FILES.add("load/path_none", "ra.load_index(None)", ("TypeError", r""))
for _kind in ("flat", "qg"):
    FILES.add(f"load/{_kind}/round_trip", f"""
        i = ra.load_index(write('rt', GOOD['{_kind}']))
        src = FLAT if '{_kind}' == 'flat' else QG
        assert type(i) is type(src) and torch.equal(i.search(Q, k=5)[0], src.search(Q, k=5)[0])
    """, "ok")
    FILES.add(f"load/{_kind}/every_truncation", f"""
        good = GOOD['{_kind}']
        for cut in range(len(good)):
            try:
                ra.load_index(write('cut', good[:cut]))
            except RuntimeError as e:
                assert 'index file' in str(e), str(e)
            else:
                raise AssertionError(f'truncated to {{cut}} of {{len(good)}} bytes and loaded')
    """, "ok")
    FILES.add(f"load/{_kind}/every_byte_flipped", f"""
        good = GOOD['{_kind}']
        for pos in range(len(good)):
            for bit in (pos % 8,):
                bad = bytearray(good); bad[pos] ^= 1 << bit
                try:
                    ra.load_index(write('flip', bytes(bad)))
                except RuntimeError as e:
                    assert 'index file' in str(e), str(e)
                else:
                    raise AssertionError(f'bit {{bit}} of byte {{pos}} flipped and the file loaded')
    """, "ok")
    FILES.add(f"load/{_kind}/appended_bytes", f"ra.load_index(write('ext', GOOD['{_kind}'] + b'\\0'))", ("RuntimeError", r"payload size mismatch"))
    FILES.add(f"load/{_kind}/other_format_version", f"""
        b = bytearray(GOOD['{_kind}']); struct.pack_into('<I', b, 8, 2)
        ra.load_index(write('ver', refresh_checksum(b)))
    """, ("RuntimeError", r"unsupported format version 2"))
    FILES.add(f"load/{_kind}/unknown_index_type", f"""
        b = bytearray(GOOD['{_kind}']); b[12:28] = b'hnsw'.ljust(16, b'\\0')
        ra.load_index(write('type', refresh_checksum(b)))
    """, ("RuntimeError", r"unknown index type 'hnsw'"))
    FILES.add(f"load/{_kind}/unknown_scalar_kind", f"""
        b = bytearray(GOOD['{_kind}']); struct.pack_into('<I', b, 28, 7)
        ra.load_index(write('kind', refresh_checksum(b)))
    """, ("RuntimeError", r"unknown scalar type"))
    FILES.add(f"load/{_kind}/other_scalar_kind", f"""
        b = bytearray(GOOD['{_kind}']); struct.pack_into('<I', b, 28, 1)   # float16: the row count no longer fits
        ra.load_index(write('kind1', refresh_checksum(b)))
    """, ("RuntimeError", r"corrupt index file"))
    for _field, _off in (("key_count", 40), ("dimension", 48)):
        for _val in (0, -1, 2**31, 2**62, 2**63 - 1):
            FILES.add(f"load/{_kind}/{_field}_{_val}", f"""
                b = bytearray(GOOD['{_kind}']); struct.pack_into('<q', b, {_off}, {_val})
                ra.load_index(write('f', refresh_checksum(b)))
            """, ("RuntimeError", r"corrupt index file"))
FILES.add("load/qg/neighbour_id_out_of_range", """
    b = bytearray(GOOD['qg'])
    adj = 40 + 16 + 40 * 4 * 4 + 4 + 8 * 9 + 8       # header | n, d | keys | u32 version, 9 int64 fields | adjacency length
    struct.pack_into('<I', b, adj + 4, 40)           # first neighbour of row 0 -> id 40 (n = 40)
    ra.load_index(write('nb', refresh_checksum(b)))
""", ("RuntimeError", r"neighbour id out of range"))
FILES.add("load/qg/neighbour_count_out_of_range", """
    b = bytearray(GOOD['qg'])
    adj = 40 + 16 + 40 * 4 * 4 + 4 + 8 * 9 + 8
    struct.pack_into('<I', b, adj, 10**6)
    ra.load_index(write('cnt', refresh_checksum(b)))
""", ("RuntimeError", r"neighbour count out of range"))
FILES.add("load/qg/entry_point_out_of_range", """
    b = bytearray(GOOD['qg'])
    struct.pack_into('<q', b, 40 + 16 + 40 * 4 * 4 + 4 + 8 * 7, 40)   # entry
    ra.load_index(write('entry', refresh_checksum(b)))
""", ("RuntimeError", r"entry point out of range"))
for _name, _data in (("png", b"\x89PNG\r\n\x1a\n" + bytes(200)), ("zip", b"PK\x03\x04" + bytes(100)), ("text", b"hello world\n" * 20),
                     ("random", bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8))), ("magic_only", b"RAIDX\0v1")):
    FILES.add(f"load/foreign/{_name}", f"ra.load_index(write('foreign', {_data!r}))", ("RuntimeError", r"(bad magic|file too short)"))
FILES.add("load/foreign/torch_save_file", "torch.save({'k': K}, D + '/t.pt'); ra.load_index(D + '/t.pt')", ("RuntimeError", r"bad magic"))
# A checksum-valid file whose key vectors hold NaN (NaN scores used to overflow the graph search's beam): rejected at load.
_NAN_FILE = """
    b = bytearray(GOOD['{kind}'])
    for row in range(0, 40, 3):
        struct.pack_into('<f', b, 40 + 16 + 16 * row, float('nan'))
    i = ra.load_index(write('nan', refresh_checksum(b)))
    for _ in range(20):
        i.search(torch.randn(16, 4), k=3, ef=4)
"""
FILES.add("load/flat/nan_keys_in_a_valid_file", _NAN_FILE.format(kind="flat"), ("RuntimeError", r"non-finite key values"))
FILES.add("load/qg/nan_keys_in_a_valid_file", _NAN_FILE.format(kind="qg"), ("RuntimeError", r"non-finite key values"))


@pytest.mark.parametrize("case", FILES.params())
def test_index_files(case):
    FILES.check(case)


def test_save_killed_midway_leaves_the_old_or_the_new_file(tmp_path):
    """SIGKILL processes while they save over an existing index: the path always holds one complete index."""
    child = textwrap.dedent("""
        import sys, torch, retrieval_attention as ra
        torch.set_num_threads(1)
        a, b = ra.FlatIndex(torch.randn(100_000, 64)), ra.FlatIndex(torch.randn(100_001, 64))
        print("ready", flush=True)
        while True:
            a.save(sys.argv[1]); b.save(sys.argv[1])
    """)
    delays = (0.02, 0.13, 0.29)
    paths = [tmp_path / f"big{i}.raidx" for i in range(len(delays))]
    for p in paths:
        ra.FlatIndex(torch.randn(10, 64)).save(p)
    procs = [subprocess.Popen([sys.executable, "-c", child, str(p)], stdout=subprocess.PIPE, text=True, cwd=ROOT) for p in paths]
    try:
        for proc, delay in zip(procs, delays):
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(delay)
            proc.kill()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for p in paths:
        idx = ra.load_index(p)  # never a half-written file
        assert idx.size in (10, 100_000, 100_001) and idx.dim == 64
    for p in tmp_path.iterdir():  # temp files of killed saves may remain (SIGKILL), never under a target name
        assert p in paths or ".tmp-" in p.name


# ------------------------------------------------------------------------------------------------------------------
# RetrievalConfig, RetrievalCache, enable

HF = CaseGroup('''
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
def tiny(seed=0, **over):
    torch.manual_seed(seed)
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=2048)
    kw.update(over)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()
MODEL = tiny()
ra.enable(MODEL, ra.RetrievalConfig(index="flat"))
IDS = torch.randint(1, 97, (1, 120), generator=torch.Generator().manual_seed(1))
def gen(model, cfg, ids=IDS, n=4):
    cache = ra.RetrievalCache(model.config, cfg)
    return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n, do_sample=False, pad_token_id=0)
''')

_CFG_BAD = {
    "n_sink_negative": ("n_sink=-1", r"RetrievalConfig.n_sink"),
    "n_sink_str": ("n_sink='4'", r"RetrievalConfig.n_sink"),
    "n_sink_float": ("n_sink=4.0", r"RetrievalConfig.n_sink"),
    "n_sink_bool": ("n_sink=True", r"RetrievalConfig.n_sink"),
    "n_sink_none": ("n_sink=None", r"RetrievalConfig.n_sink"),
    "n_window_negative": ("n_window=-5", r"RetrievalConfig.n_window"),
    "static_set_empty": ("n_sink=0, n_window=0", r"n_sink \+ n_window"),
    "top_k_0": ("top_k=0", r"RetrievalConfig.top_k"),
    "top_k_float": ("top_k=1.5", r"RetrievalConfig.top_k"),
    "top_k_bool": ("top_k=True", r"RetrievalConfig.top_k"),
    "ef_0": ("ef=0", r"RetrievalConfig.ef"),
    "ef_negative": ("ef=-1", r"RetrievalConfig.ef"),
    "ef_float": ("ef=64.0", r"RetrievalConfig.ef"),
    "ef_str": ("ef='auto'", r"RetrievalConfig.ef"),
    "index_unknown": ("index='hnsw'", r"RetrievalConfig.index"),
    "index_none": ("index=None", r"RetrievalConfig.index"),
    "index_params_list": ("index_params=[1]", r"RetrievalConfig.index_params"),
    "max_train_queries_0": ("max_train_queries=0", r"RetrievalConfig.max_train_queries"),
    "max_train_queries_float": ("max_train_queries=2.5", r"RetrievalConfig.max_train_queries"),
    "cpu_dtype_int8": ("cpu_dtype=torch.int8", r"RetrievalConfig.cpu_dtype"),
    "cpu_dtype_float64": ("cpu_dtype=torch.float64", r"RetrievalConfig.cpu_dtype"),
    "cpu_dtype_str": ("cpu_dtype='float16'", r"RetrievalConfig.cpu_dtype"),
}
for _name, (_kw, _pat) in _CFG_BAD.items():
    HF.add(f"config/{_name}", f"ra.RetrievalConfig({_kw})", (("ValueError", "TypeError"), _pat))
HF.add("config/max_train_queries_bool", "ra.RetrievalConfig(max_train_queries=True)", (("ValueError", "TypeError"), r"max_train_queries"))
# index_params are checked by RetrievalConfig itself (through the C++ build's parameter check), not at the first prompt
HF.add("config/index_params_unknown_key", "ra.RetrievalConfig(n_sink=2, n_window=4, index='flat', index_params={'bogus': 1})",
       ("ValueError", r"RetrievalConfig.index_params: unknown parameter 'bogus'"))
HF.add("config/warm_start_not_bool", "ra.RetrievalConfig(warm_start=1)", ("TypeError", r"warm_start must be a bool"))
HF.add("config/index_params_degree_0", "ra.RetrievalConfig(index='query_guided', index_params={'degree': 0})", ("ValueError", r"degree"))
HF.add("config/index_params_degree_2_70", "ra.RetrievalConfig(index='query_guided', index_params={'degree': 2**70})",
       ("ValueError", r"'degree' is out of range"))
HF.add("config/index_params_k_train_str", "ra.RetrievalConfig(index='query_guided', index_params={'k_train': 'many'})",
       ("TypeError", r"'k_train' must be an int"))
HF.add("config/index_params_k_train_bool", "ra.RetrievalConfig(index='query_guided', index_params={'k_train': True})",
       ("TypeError", r"'k_train' must be an int"))
HF.add("cache/config_not_a_retrieval_config", "ra.RetrievalCache(MODEL.config, {'top_k': 5})", ("TypeError", r"RetrievalConfig"))
HF.add("cache/not_a_model_config", "ra.RetrievalCache(object())", ("TypeError", r"decoder model config"))
HF.add("cache/layer_class_not_a_class", "ra.RetrievalCache(MODEL.config, layer_class=3)", ("TypeError", r"layer_class"))
HF.add("cache/layer_class_wrong_class", "ra.RetrievalCache(MODEL.config, layer_class=dict)", ("TypeError", r"layer_class"))
HF.add("cache/used_with_another_model", """
    other = tiny(num_attention_heads=2, num_key_value_heads=2)     # head_dim 32 instead of 16
    ra.enable(other, ra.RetrievalConfig(index='flat'))
    cache = ra.RetrievalCache(MODEL.config, ra.RetrievalConfig(index='flat'))
    with torch.no_grad():
        other(IDS, past_key_values=cache)
""", ("ValueError", r"do not match the cache"))
HF.add("cache/batch_size_changes", """
    cache = ra.RetrievalCache(MODEL.config, ra.RetrievalConfig(n_sink=2, n_window=4, index='flat'))
    with torch.no_grad():
        MODEL(IDS, past_key_values=cache)
        MODEL(torch.randint(1, 97, (2, 1)), past_key_values=cache)
""", ("ValueError", r"batch size changed"))
HF.add("cache/left_padded_batch_runs", """
    ids = IDS.repeat(2, 1); mask = torch.ones_like(ids); mask[0, :3] = 0
    out = MODEL.generate(ids, attention_mask=mask, past_key_values=ra.RetrievalCache(MODEL.config, ra.RetrievalConfig(n_sink=2, n_window=8, index='query_guided')),
                         max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 123)
""", "ok")
HF.add("enable/not_a_model", "ra.enable(torch.nn.Linear(2, 2))", ("TypeError", r"generative model"))
HF.add("enable/config_not_a_retrieval_config", "ra.enable(MODEL, {'top_k': 1})", ("TypeError", r"RetrievalConfig"))
HF.add("enable/ok_and_tiny_window", "assert gen(MODEL, ra.RetrievalConfig(n_sink=0, n_window=1, top_k=1, index='flat')).shape == (1, 124)", "ok")
# A layer whose keys overflow to NaN (as fp16 activations can) while its queries stay finite.
_NAN_MODEL = """
    m = tiny(attention_bias=True)
    with torch.no_grad():
        m.model.layers[0].self_attn.k_proj.bias[0] = float('nan')     # kv head 0: every key has a NaN component
    ra.enable(m, ra.RetrievalConfig(index='flat'))
    gen(m, ra.RetrievalConfig(n_sink=4, n_window=16, top_k=8, ef=8, index='{index}'), n=3)
"""
HF.add("cache/nan_keys_flat_index", _NAN_MODEL.format(index="flat"), ("ValueError", r"NaN or Inf"))
HF.add("cache/nan_keys_query_guided_index", _NAN_MODEL.format(index="query_guided"), ("ValueError", r"NaN or Inf"))


@pytest.mark.parametrize("case", HF.params())
def test_config_cache_enable_bad_inputs(case):
    HF.check(case)


# ------------------------------------------------------------------------------------------------------------------
# concurrency


def test_many_threads_searching_one_query_guided_index_equal_sequential():
    g = torch.Generator().manual_seed(11)
    keys = torch.randn(6000, 32, generator=g)
    idx = ra.QueryGuidedIndex(keys, torch.randn(300, 32, generator=g) + 0.5, degree=16, k_train=32, ef_build=48)
    # per thread: its own queries, k and ef; two threads share their queries to hit the same graph regions at once
    jobs = []
    for t in range(8):
        q = torch.randn(128, 32, generator=g) if t % 4 else torch.randn(128, 32, generator=torch.Generator().manual_seed(99))
        jobs.append((q, 5 + 3 * t, 16 + 8 * t))
    expected = [idx.search(q, k=k, ef=ef) for q, k, ef in jobs]
    results: list = [[] for _ in jobs]
    errors: list = []
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        try:
            q, k, ef = jobs[i]
            barrier.wait()
            for _ in range(10):
                results[i].append(idx.search(q, k=k, ef=ef))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for (ids_e, sc_e), rs in zip(expected, results):
        assert len(rs) == 10
        for ids, sc in rs:
            assert torch.equal(ids, ids_e) and torch.equal(sc, sc_e)


def test_add_while_searching_flat_index_sees_whole_snapshots():
    """Searches racing with adds see the index before or after each add, never half of one (exact index: each result
    equals the exact top-k of one prefix of the key sequence)."""
    g = torch.Generator().manual_seed(12)
    base, chunks = torch.randn(1500, 16, generator=g), [torch.randn(40, 16, generator=g) * 2 for _ in range(12)]
    queries = torch.randn(32, 16, generator=g)
    snapshots, acc = [], base
    for c in [None] + chunks:
        acc = acc if c is None else torch.cat([acc, c])
        snapshots.append(ra.FlatIndex(acc).search(queries, k=10)[0])
    idx = ra.FlatIndex(base)
    seen, errors, stop = [], [], threading.Event()

    def searcher():
        try:
            while not stop.is_set():
                ids, _ = idx.search(queries, k=10)
                match = [i for i, s in enumerate(snapshots) if torch.equal(ids, s)]
                assert match, "a search saw a state that is no snapshot of the adds"
                seen.append(match[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for th in threads:
        th.start()
    for c in chunks:
        idx.add(c)
        time.sleep(0.002)
    stop.set()
    for th in threads:
        th.join()
    assert not errors, errors
    assert idx.size == 1500 + 12 * 40 and torch.equal(idx.search(queries, k=10)[0], snapshots[-1])
    assert len(seen) > 0


def test_add_while_searching_query_guided_index_is_safe_and_leaves_the_same_graph():
    g = torch.Generator().manual_seed(13)
    keys, train = torch.randn(3000, 16, generator=g), torch.randn(200, 16, generator=g)
    chunks = [torch.randn(50, 16, generator=g) for _ in range(10)]
    queries = torch.randn(64, 16, generator=g)
    racing, calm = ra.QueryGuidedIndex(keys, train, degree=12, k_train=24), ra.QueryGuidedIndex(keys, train, degree=12, k_train=24)
    errors, stop = [], threading.Event()

    def searcher():
        try:
            while not stop.is_set():
                ids, sc = racing.search(queries, k=8, ef=32)
                assert ((ids >= 0) & (ids < 3000 + 500)).all()
                assert (sc[:, :-1] >= sc[:, 1:]).all()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for th in threads:
        th.start()
    for c in chunks:
        racing.add(c)
    stop.set()
    for th in threads:
        th.join()
    for c in chunks:
        calm.add(c)
    assert not errors, errors
    assert racing.size == calm.size == 3500
    # searches do not perturb inserts: the graph built under concurrent searches answers exactly like the calm one
    assert torch.equal(racing.search(queries, k=8, ef=32)[0], calm.search(queries, k=8, ef=32)[0])


def test_save_while_adding_writes_a_consistent_snapshot(tmp_path):
    g = torch.Generator().manual_seed(14)
    idx = ra.FlatIndex(torch.randn(1000, 8, generator=g))
    sizes, errors = set(), []

    def saver():
        try:
            for i in range(15):
                p = tmp_path / f"s{i}.raidx"
                idx.save(p)
                sizes.add(ra.load_index(p).size)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    th = threading.Thread(target=saver)
    th.start()
    for _ in range(30):
        idx.add(torch.randn(10, 8, generator=g))
    th.join()
    assert not errors, errors
    assert sizes and all((s - 1000) % 10 == 0 and 1000 <= s <= 1300 for s in sizes)
