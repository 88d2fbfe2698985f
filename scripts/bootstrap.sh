#!/usr/bin/env bash
# scripts/bootstrap.sh -- make this checkout ready on a fresh Debian machine: system packages, a virtualenv
# (.venv), Python dependencies and the editable build of the package. Safe to run again; it skips what is done.
#   env: RA_VENV (default .venv), RA_TORCH (default "torch==2.13.0"), PYTHON (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RA_VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=()
[ -f /usr/include/eigen3/Eigen/Core ] || need_apt+=(libeigen3-dev)
[ -f /usr/lib/cmake/Catch2/Catch2Config.cmake ] || [ -f /usr/lib/x86_64-linux-gnu/cmake/Catch2/Catch2Config.cmake ] || need_apt+=(catch2)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v ninja >/dev/null || need_apt+=(ninja-build)
command -v g++ >/dev/null || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[bootstrap] apt-get install ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtualenv $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[bootstrap] pip install ${RA_TORCH:-torch==2.13.0}" >&2
  "$PY" -m pip install -q "${RA_TORCH:-torch==2.13.0}"
fi
echo "[bootstrap] pip install -r requirements-dev.txt" >&2
"$PY" -m pip install -q -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true

# Rebuild the extension when any C++ source is newer than the built module.
so=$(ls python/retrieval_attention/_C*.so 2>/dev/null | head -1 || true)
if [ -z "$so" ] || [ -n "$(find include csrc setup.py -newer "$so" -type f 2>/dev/null | head -1)" ]; then
  echo "[bootstrap] building the extension (pip install -e . --no-build-isolation)" >&2
  MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
fi
"$PY" -c "import retrieval_attention as ra; print('[bootstrap] retrieval_attention', ra.__version__, 'ready', flush=True)" >&2
