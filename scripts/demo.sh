#!/usr/bin/env bash
# The main job: install what is needed, then the passkey demo on the bundled model (GPU when there is one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python examples/passkey_demo.py "$@"
