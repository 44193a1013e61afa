#!/usr/bin/env bash
# From a fresh checkout to a trained demo autoencoder, on CPU, in a few minutes:
#   1. install (torch only if missing, see launch/install.sh),
#   2. build the generated demo shards (coloured shapes, 10 classes) into data/demo,
#   3. train a small KL autoencoder with 2 processes through `accelerate launch` (gloo on CPU),
#   4. print where the TensorBoard logs, image grids and checkpoints are.
# Variables: NPROC (processes, default 2), STEPS (default 300), RUN_DIR (default runs/demo),
# PORT (rendezvous port, default 0 = any free one).
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-2}
STEPS=${STEPS:-300}
RUN_DIR=${RUN_DIR:-runs/demo}
PYTHON=${PYTHON:-python3}

bash launch/install.sh

if [ ! -f data/demo/index.json ]; then
  "$PYTHON" -m shards demo data/demo --num-samples 2000 --image-size 32 --shard-size 250
fi

RESUME=()
[ -f "$RUN_DIR/latest" ] && RESUME=(--resume latest)  # running it again continues the same run

# One thread per process: NPROC processes share the cores. ACCELERATE_USE_CPU=1 + --multi_gpu is
# how accelerate starts several CPU processes (gloo); on GPUs drop ACCELERATE_USE_CPU.
ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 "$PYTHON" -m accelerate.commands.launch \
  --multi_gpu --num_processes "$NPROC" --num_machines 1 --mixed_precision no --dynamo_backend no \
  --main_process_port "${PORT:-0}" \
  launch/train.py --config launch/configs/demo.yaml run.dir="$RUN_DIR" train.max_steps="$STEPS" ${RESUME[@]+"${RESUME[@]}"}

# Absolute paths: RUN_DIR is relative to the repository (the cd above), not to where the user is.
RUN=$(CDPATH="" cd -- "$RUN_DIR" && pwd)
printf -v RUN_Q %q "$RUN"  # pastes into a shell as one word, spaces included
echo
echo "Run folder: $RUN"
echo "  checkpoints: $RUN/checkpoints/ ($(cd "$RUN/checkpoints" && ls -d step_* | tr '\n' ' ' | sed 's/ $//'))"
echo "  latest:      $(cat "$RUN/latest")"
echo "  image grids: $RUN/samples/ ($(ls "$RUN"/samples | wc -l) PNGs)"
echo "  text log:    $RUN/train.log"
echo "Watch it:      tensorboard --logdir $RUN_Q/tb"
