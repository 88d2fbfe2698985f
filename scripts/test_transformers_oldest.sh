#!/usr/bin/env bash
# The HF integration, ops and index tests under the oldest supported transformers (4.56), in their own virtualenv
# (.venv-tf-oldest). Reuses the extension built by scripts/bootstrap.sh (same torch), so run that first.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-tf-oldest
OLDEST=${RA_TRANSFORMERS_OLDEST:-4.56.2}
TORCH_SPEC=$(.venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])")
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$OLDEST')" 2>/dev/null; then
  echo "[oldest] creating $VENV with transformers==$OLDEST and $TORCH_SPEC" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" "transformers==$OLDEST" numpy packaging safetensors tqdm pytest 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "== Python tests under transformers $OLDEST (pytest) =="
PYTHONPATH=$PWD/python "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/python/test_hf_exactness.py tests/python/test_ops.py tests/python/test_index.py \
  tests/python/test_ecosystem.py tests/python/test_rope_shift.py
