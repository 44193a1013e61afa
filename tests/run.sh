#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite. CI calls exactly this.
#   bash tests/run.sh                 # everything that can run here (GPU tests skip without a GPU)
#   bash tests/run.sh -k checkpoint   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh --test
PYTHON=${PYTHON:-python3}
"$PYTHON" -m ruff check .  # lint first (settings in pyproject.toml); any finding stops the run here
exec "$PYTHON" -m pytest -q -ra --durations=15 "$@"
