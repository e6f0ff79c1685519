#!/usr/bin/env bash
# Install, lint, run the whole test suite (real servers on 127.0.0.1, the embedded model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
.venv/bin/ruff check .
exec .venv/bin/pytest -q "$@"
