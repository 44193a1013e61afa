#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite. CI calls exactly this.
#   bash tests/run.sh                 # everything that can run here (GPU tests skip without a GPU)
#   bash tests/run.sh -k checkpoint   # extra arguments go to pytest
#   TEST_WORKERS=0 bash tests/run.sh  # one pytest process (default 2: pytest-xdist, a whole file at a time)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=${TEST_WORKERS:-2}
case "$WORKERS" in
  [0-9]|[0-9][0-9]|[0-9][0-9][0-9]) WORKERS=$((10#$WORKERS)) ;;  # 08 is 8, not an octal error
  *) echo "error: TEST_WORKERS=$WORKERS is not a whole number from 0 to 999 (0: one pytest process)" >&2; exit 2 ;;
esac
bash launch/install.sh --test
PYTHON=${PYTHON:-python3}
"$PYTHON" -m ruff check .  # lint first (settings in pyproject.toml); any finding stops the run here
# Two test processes: the in-process tests run torch on one thread each (tests/conftest.py), so one process left
# the second core idle most of the time (16 min of pytest -> 10 min on 2 cores). A file goes whole to one
# process (--dist loadfile): its module fixtures are made once, and the SLURM tests share one slurmctld.
XDIST=()
[ "$WORKERS" -gt 0 ] && XDIST=(-n "$WORKERS" --dist loadfile)
exec "$PYTHON" -m pytest -q -ra --durations=15 "${XDIST[@]}" "$@"
