#!/usr/bin/env bash
# The main job: install, bring the suite up on the embedded model, send a story request through
# gateway -> worker over gRPC, score it with the judge, print both, stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
exec .venv/bin/tokenmill up --demo "$@"
