#!/usr/bin/env bash
# Every test: install what is needed, then the C++ core tests (ctest; again under ASan + UBSan with the fuzz loop),
# the CUDA compile check (nvcc, no GPU needed), the HF tests under the oldest supported transformers, and the Python
# tests (pytest; GPU tests run only where there is a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh || exit 1
status=0
# each stage prints the seconds since the start, so that CI logs show where the time goes
stage() { echo "== [$(date -u +%T), ${SECONDS} s] $* =="; }

stage "C++ core tests (ctest)"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DRA_FUZZ_SECONDS=5 >/dev/null && cmake --build build -j 2 >/dev/null && (cd build && ctest --output-on-failure -j 2) || status=1

stage "C++ core tests + fuzz loop under AddressSanitizer + UndefinedBehaviorSanitizer (ctest, build-asan)"
# A separate build of the same tests with -fsanitize=address,undefined (any report aborts the test), plus the seeded
# fuzz loop over build/search/insert/load (tests/cpp/fuzz_index.cpp) for RA_FUZZ_SECONDS (default 20 s).
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DRA_SANITIZE=ON -DRA_FUZZ_SECONDS="${RA_FUZZ_SECONDS:-20}" >/dev/null \
  && { cmake --build build-asan -j 2 >build-asan/build.log 2>&1 || { tail -n 60 build-asan/build.log; false; }; } \
  && (cd build-asan && ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:strict_string_checks=1}" UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}" \
      ctest --output-on-failure -j 2) || status=1

if [ "${RA_SKIP_CUDA_COMPILE:-0}" != 1 ]; then
  stage "CUDA sources compile check (nvcc)"
  if command -v nvcc >/dev/null || [ -x /usr/local/bin/nvcc ]; then
    bash scripts/compile_cuda.sh || status=1
  else
    echo "nvcc not found: CUDA compile check not run"
  fi
fi

if [ "${RA_SKIP_OLDEST_TRANSFORMERS:-0}" != 1 ]; then
  # the HF integration under the oldest supported transformers, in its own virtualenv (the newest runs below)
  stage "oldest supported transformers"
  bash scripts/test_transformers_oldest.sh || status=1
fi

stage "Python tests (pytest, newest transformers)"
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=10 "$@" tests/python || status=1
stage "done, exit status $status"
exit $status
