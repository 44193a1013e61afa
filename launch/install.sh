#!/usr/bin/env bash
# Install vae-harness into the current Python environment (activate a venv first if you want one).
#
#   bash launch/install.sh            # harness + DeepSpeed extras
#   bash launch/install.sh --test     # ... plus the test extras
#   bash launch/install.sh --help
#
# torch is installed only when it is missing, as TORCH_SPEC (default: the pinned CPU-capable
# release). An existing torch (your CUDA build, say) is left alone: setup.cfg asks for torch>=2.3.
# One that is installed but fails to import is reported, never installed over.
# Variables: PYTHON (default python3), TORCH_SPEC.
set -euo pipefail
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

USAGE="usage: bash launch/install.sh [--test]"
EXTRAS=deepspeed
for arg in "$@"; do
  case $arg in
    --test) EXTRAS=deepspeed,test ;;
    -h|--help)
      echo "$USAGE"
      echo "  --test      also the test extras (pytest, ruff, diffusers)"
      echo "Environment: PYTHON (now $PYTHON), TORCH_SPEC (installed only when torch is missing; now $TORCH_SPEC)"
      exit 0 ;;
    *) echo "error: install.sh: unknown argument '$arg' ($USAGE)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."

pip() { "$PYTHON" -m pip "$@"; }

# Installed is not the same as importable: a CUDA build whose libraries are not loaded (a module
# not loaded, a driver missing) fails to import, and installing TORCH_SPEC over it would replace
# the user's build and hide the real error.
TORCH_FOUND=$("$PYTHON" -c "import importlib.util; print(importlib.util.find_spec('torch') is not None)")
if [ "$TORCH_FOUND" = False ]; then
  echo "[install] torch missing: installing $TORCH_SPEC"
  pip install -q "$TORCH_SPEC"
elif ! TORCH_ERR=$("$PYTHON" -c "import torch" 2>&1); then
  echo "error: install.sh: torch is installed but 'import torch' fails ($(tail -n 1 <<<"$TORCH_ERR")): fix that environment (a CUDA module not loaded?) or uninstall torch to let install.sh install $TORCH_SPEC" >&2
  exit 1
fi
# DS_BUILD_OPS=0: DeepSpeed compiles its ops on first use, never at install (no CUDA toolkit needed).
echo "[install] vae-harness[$EXTRAS]"
DS_BUILD_OPS=0 pip install -q -e ".[$EXTRAS]"
"$PYTHON" -c "import torch, accelerate, webdataset, einops; print(f'[install] torch {torch.__version__}, accelerate {accelerate.__version__}, webdataset {webdataset.__version__}')"
