#!/usr/bin/env bash
# Every test: install what is needed, then the C++ core tests (ctest), the CUDA compile check (nvcc, no GPU
# needed) and the Python tests (pytest; GPU tests run only where there is a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh || exit 1
status=0

echo "== C++ core tests (ctest) =="
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j 2 >/dev/null && (cd build && ctest --output-on-failure -j 2) || status=1

if [ "${RA_SKIP_CUDA_COMPILE:-0}" != 1 ]; then
  echo "== CUDA sources compile check (nvcc) =="
  if command -v nvcc >/dev/null || [ -x /usr/local/bin/nvcc ]; then
    bash scripts/compile_cuda.sh || status=1
  else
    echo "nvcc not found: CUDA compile check not run"
  fi
fi

echo "== Python tests (pytest) =="
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests/python || status=1
exit $status
