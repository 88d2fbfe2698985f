#!/usr/bin/env bash
# scripts/compile_cuda.sh -- compile the CUDA sources with nvcc on a machine without a GPU.
#
#   1. tests/cuda/compile_check.cu (torch-free; instantiates every kernel template) for sm_90 and sm_80,
#      with torch's half/bf16 "no implicit conversion" macros, ptxas spill warnings, warnings as errors.
#   2. csrc/cuda/ops_cuda.cu (the torch launchers) for sm_90 against the torch headers of the installed
#      torch, with the nvcc flags setup.py gives (-O3 --use_fast_math -DRA_WITH_CUDA) plus torch's (its -std). A CPU-only torch wheel ships ATen/cuda and c10/cuda headers but not the generated
#      c10/cuda/impl/cuda_cmake_macros.h; when it is missing, a one-line shim (the value a shared-library
#      CUDA build of torch generates) is put on the include path of this check only. If torch is not
#      importable the step is skipped (reported as SKIP, not OK).
#
# Usage: scripts/compile_cuda.sh [--verbose]     env: NVCC (default nvcc on PATH or /usr/local/bin/nvcc),
#        PYTHON (default .venv/bin/python, then python3), CUDA_CHECK_ARCHS (default "90 80" for step 1).
# Prints one OK / FAIL / SKIP line per step and a final verdict; exits non-zero if any step failed.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VERBOSE=0
[ "${1:-}" = "--verbose" ] && VERBOSE=1

NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/bin/nvcc)}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
ARCHS=${CUDA_CHECK_ARCHS:-"90 80"}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if ! "$NVCC" --version >/dev/null 2>&1; then
  echo "FAIL: nvcc not found (NVCC=$NVCC)"
  exit 2
fi
echo "nvcc: $("$NVCC" --version | tail -1)"

# Same macros torch.utils.cpp_extension passes to nvcc (COMMON_NVCC_FLAGS).
TORCH_NVCC_FLAGS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
                  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
FAILED=0

# The steps run at once (each nvcc is one process; the two together take the longer one's time instead of the sum).
STEP_NAMES=(); STEP_LOGS=(); STEP_PIDS=()
start_step() {  # name, log file, command...: runs the command in the background, its exit status and seconds to log.rc
  local name=$1 log=$2
  shift 2
  ( t0=$SECONDS; "$@" >"$log" 2>&1; rc=$?; echo "$rc $((SECONDS - t0))" >"$log.rc" ) &
  STEP_NAMES+=("$name"); STEP_LOGS+=("$log"); STEP_PIDS+=($!)
}
finish_steps() {  # waits for every started step and prints OK / FAIL (with its log) in the order they were started
  local i rc secs
  for i in "${!STEP_PIDS[@]}"; do
    wait "${STEP_PIDS[$i]}"
    read -r rc secs <"${STEP_LOGS[$i]}.rc" 2>/dev/null || { rc=1; secs=?; }
    if [ "$rc" = 0 ]; then
      echo "OK   ${STEP_NAMES[$i]} ($secs s)"
      [ $VERBOSE = 1 ] && cat "${STEP_LOGS[$i]}"
      if [ "${STEP_LOGS[$i]}" = "$TMP/kernels.log" ] && [ $VERBOSE = 0 ]; then
        # ptxas summary: register counts per kernel (spills are errors).
        regs=$(grep -o "Used [0-9]* registers" "$TMP/kernels.log" | awk '{print $2}' | sort -n | tail -1)
        [ -n "$regs" ] && echo "     max registers per thread over all kernels: $regs (no spills, no local memory)"
      fi
    else
      echo "FAIL ${STEP_NAMES[$i]}"
      cat "${STEP_LOGS[$i]}"
      FAILED=1
    fi
  done
}

# ---- 1. torch-free kernels ----------------------------------------------------------------------
GENCODE=()
for a in $ARCHS; do GENCODE+=("-gencode=arch=compute_${a},code=sm_${a}"); done
start_step "kernels: tests/cuda/compile_check.cu (sm: $ARCHS, -std=c++17, -Werror all-warnings)" "$TMP/kernels.log" \
  "$NVCC" -std=c++17 -O3 -I"$ROOT/include" "${TORCH_NVCC_FLAGS[@]}" "${GENCODE[@]}" \
  -Xptxas -v,-warn-spills,-warn-lmem-usage -Werror all-warnings \
  -c "$ROOT/tests/cuda/compile_check.cu" -o "$TMP/compile_check.o"

# ---- 2. torch launchers --------------------------------------------------------------------------
if TORCH_INFO=$("$PYTHON" - <<'PY' 2>/dev/null
import sysconfig, torch, torch.utils.cpp_extension as c
print(torch.__version__)
print(torch.version.cuda)
print(sysconfig.get_paths()["include"])
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
import inspect  # the C++ standard torch compiles extensions with (c++20 from torch 2.10 on); ours must match its headers
print("c++20" if "-std=c++20" in inspect.getsource(c) else "c++17")
for p in c.include_paths(): print(p)
PY
); then
  mapfile -t INFO <<<"$TORCH_INFO"
  TV=${INFO[0]}; TCUDA=${INFO[1]}; PYINC=${INFO[2]}; ABI=${INFO[3]}; TSTD=${INFO[4]}
  INCS=()
  for p in "${INFO[@]:5}"; do INCS+=("-I$p"); done
  SHIM_NOTE=""
  if [ ! -f "${INFO[5]}/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    mkdir -p "$TMP/shim/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$TMP/shim/c10/cuda/impl/cuda_cmake_macros.h"
    INCS+=("-I$TMP/shim")
    SHIM_NOTE=", with the cuda_cmake_macros.h shim"
  fi
  start_step "launchers: csrc/cuda/ops_cuda.cu against torch $TV (torch.version.cuda=$TCUDA$SHIM_NOTE; torch's -std=$TSTD, setup.py's nvcc flags, sm_90)" "$TMP/launchers.log" \
    "$NVCC" -std=$TSTD -O3 --use_fast_math -DRA_WITH_CUDA -I"$ROOT/include" "${INCS[@]}" -isystem "$PYINC" "${TORCH_NVCC_FLAGS[@]}" \
    -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI="$ABI" --compiler-options -fPIC \
    -gencode=arch=compute_90,code=sm_90 -Xcompiler -Wall -Xcompiler -Werror=return-type \
    -c "$ROOT/csrc/cuda/ops_cuda.cu" -o "$TMP/ops_cuda.o"
else
  echo "SKIP launchers: csrc/cuda/ops_cuda.cu (torch not importable with $PYTHON)"
fi

finish_steps
if [ $FAILED = 0 ]; then
  echo "compile_cuda: OK"
  exit 0
fi
echo "compile_cuda: FAIL"
exit 1
