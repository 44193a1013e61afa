#!/usr/bin/env bash
# Install vae-harness into the current Python environment (activate a venv first if you want one).
#
#   bash launch/install.sh            # harness + DeepSpeed extras
#   bash launch/install.sh --test     # ... plus the test extras
#
# torch is installed only when it is missing, as TORCH_SPEC (default: the pinned CPU-capable
# release). An existing torch (your CUDA build, say) is left alone: setup.cfg asks for torch>=2.3.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=deepspeed
[ "${1:-}" = "--test" ] && EXTRAS=deepspeed,test

pip() { "$PYTHON" -m pip "$@"; }

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "[install] torch missing: installing $TORCH_SPEC"
  pip install -q "$TORCH_SPEC"
fi
# DS_BUILD_OPS=0: DeepSpeed compiles its ops on first use, never at install (no CUDA toolkit needed).
echo "[install] vae-harness[$EXTRAS]"
DS_BUILD_OPS=0 pip install -q -e ".[$EXTRAS]"
"$PYTHON" -c "import torch, accelerate, webdataset, einops; print(f'[install] torch {torch.__version__}, accelerate {accelerate.__version__}, webdataset {webdataset.__version__}')"
