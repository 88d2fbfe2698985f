#!/usr/bin/env bash
# Device probe: why does a C++ exception thrown inside one of our torch.ops kernels segfault on the GPU machine (torch 2.11,
# Ubuntu python3.12, /opt/gcc g++ 13.3)? Seen there (2026-11-29): our _C segfaults on any TORCH_CHECK failing inside a raw
# torch.ops kernel (CPU and CUDA kernels, CPU-only and CUDA builds, with or without -Wl,-Bsymbolic-functions; torch 2.11
# compiles extensions with -std=c++17 itself), while the minimal extension below, JIT-built by torch, raises fine through
# both pybind and torch.ops. Not yet tried there: the minimal op with -fopenmp / -O3 (our flags), and with
# `import retrieval_attention` first (its Python registrations), and our own sources JIT-built by torch. Not reproduced on
# the CPU machine with torch 2.11.0+cu130 (PyPI), pyenv python 3.12.1, g++ 12.2 and our flags: there it raises ValueError.
# usage on the device: bash scripts/dev/exc_probe.sh
set -u
export PYTHONPATH=$PWD/python
file /opt/gcc/bin/g++ 2>/dev/null; head -c 1500 /opt/gcc/bin/g++ 2>/dev/null | strings | head -20  # a wrapper ("g++-real")? what it adds
for c in g++ /opt/gcc/bin/g++ /usr/bin/g++ c++; do echo "== $c: $(command -v $c) $($c --version 2>/dev/null | head -1)"; done
echo "CXX=${CXX:-} CC=${CC:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
command -v gdb; python3 -c "import torch; print(torch.__config__.show())" | grep -i -E "gcc|compiler|abi" | head
python3 - <<'PY'
import torch, retrieval_attention as ra, os
print("cxx11abi", torch._C._GLIBCXX_USE_CXX11_ABI)
for l in open("/proc/self/maps"):
    if any(s in l for s in ("libstdc++", "libgcc_s", "libgomp", "libiomp")): print(l.split()[-1])
PY
ldd python/retrieval_attention/_C*.so | grep -E "stdc|gcc|gomp|torch"
cat > /tmp/t.py <<'PY'
import sys, torch, retrieval_attention as ra
q = torch.randn(4, 3, 8); k = torch.randn(2, 10, 8); v = torch.randn(2, 10, 8)
try:
    torch.ops.retrieval_attention.dense_attention(q, k[:, :, :4].contiguous(), v, 1.0, False)
except Exception as e:
    print("CAUGHT", type(e).__name__, str(e)[:80])
PY
python3 -X faulthandler /tmp/t.py 2>&1 | tail -5; echo "rc=$?"
if command -v gdb >/dev/null; then gdb -q -batch -ex run -ex bt --args python3 /tmp/t.py 2>&1 | grep -E "^#|SIG" | head -30; fi
# a minimal op extension with no library code, default compiler and system g++
mkdir -p /tmp/mini && cat > /tmp/mini/m.cpp <<'CPP'
#include <torch/extension.h>
at::Tensor boom(const at::Tensor& x) { TORCH_CHECK_VALUE(x.dim() == 99, "x must have 99 dims"); return x; }
TORCH_LIBRARY(mini_probe, m) { m.def("boom(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(mini_probe, CPU, m) { m.impl("boom", &boom); }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("boom_py", &boom); }
CPP
for variant in plain openmp import_ra; do
  python3 - "$variant" <<'PY' 2>&1 | tail -4
import os, sys, torch
from torch.utils.cpp_extension import load
v = sys.argv[1]
if v == "import_ra":
    import retrieval_attention  # noqa: F401  (our registrations loaded before the failing call)
flags = ["-O3", "-fopenmp", "-DNDEBUG"] if v == "openmp" else ["-O2"]
m = load("mini_probe_" + v, ["/tmp/mini/m.cpp"], verbose=False, extra_cflags=flags, extra_ldflags=["-fopenmp"] if v == "openmp" else [])
try: m.boom_py(torch.zeros(2))
except Exception as e: print(v, "pybind CAUGHT", type(e).__name__)
try: getattr(torch.ops, "mini_probe").boom(torch.zeros(2))
except Exception as e: print(v, "torch.ops CAUGHT", type(e).__name__)
PY
  echo "mini $variant rc=$?"
done
# our own sources JIT-built by torch (its compiler invocation, not setup.py's sysconfig flags): if this raises while the
# setup.py build segfaults, the difference is in how setup.py compiles/links on that machine
python3 - <<'PY' 2>&1 | tail -3
import glob, os, torch
from torch.utils.cpp_extension import load
root = os.getcwd()
m = load("ra_jit_probe", sorted(glob.glob(f"{root}/csrc/*.cpp")), verbose=False,
         extra_include_paths=[f"{root}/include", f"{root}/csrc", os.environ.get("EIGEN_INCLUDE_DIR", f"{root}/.deps/eigen3")],
         extra_cflags=["-O3", "-fopenmp", "-DNDEBUG"], extra_ldflags=["-fopenmp"])
try:
    torch.ops.retrieval_attention.dense_attention(torch.randn(4, 3, 8), torch.randn(2, 10, 4), torch.randn(2, 10, 8), 1.0, False)
except Exception as e:
    print("ours JIT-built: torch.ops CAUGHT", type(e).__name__)
PY
echo "ours_jit rc=$?"
