#!/usr/bin/env bash
# One-shot GPU check, written to be run blind by whoever gets a GPU for a few minutes (about 8 on one GPU):
#
#   bash launch/gpu_check.sh              # GPU: install what is missing, tests/test_gpu.py, peer + kl-f8 benchmarks
#   bash launch/gpu_check.sh --cpu        # the same script on CPU, tiny sizes, GPU parts skipped (< 120 s): CI
#   OUT=my-folder BUDGET_S=600 WHEELS=wheels/ bash launch/gpu_check.sh
#   BUNDLE=$OUT OUT=/tmp/gc WHEELS=.whl bash launch/gpu_check.sh   # on the lent GPU machine (offline): see README
#
# Parts, each under `timeout` and inside the total budget (a part that would not fit is skipped, never started):
#   install   offline (the lent GPU machines): WHEELS=<folder from launch/gpu_wheels.sh>, pip --no-index of what
#             the image lacks; online: imports checked, if missing launch/install.sh --test, then diffusers;
#             env.json: device name, torch / CUDA / cuDNN versions, bf16 peak from the table in launch/benchmark.py
#   gpu_tests pytest tests/test_gpu.py (fp16 loss scaling + overflow recovery, bf16, ZeRO-2 fp16, fp16 attention,
#             the discriminator's two loss scalers (plain and fused AdamW), TF32 flags, a fused bf16 step
#             with no device reads, with and without a discriminator)
#   peer_bf16 / peer_fp16  ours vs diffusers.AutoencoderKL, kl-f8 at 256 px, autocast (fp16 with GradScaler)
#   klf8_step our kl-f8 step at 256 px: images/s and model TFLOP/s (torch.utils.flop_counter) against bf16 peak
#   step_host / step_fused  the harness's whole train_step vs a plain loop, small kl-f8 images in bf16: as it is,
#             and with optim.fused=true (no host sync in the step): what the host's waits cost
#   compile   torch.compile of our kl-f8 step: compile seconds and the step ratio
# Writes $OUT/gpu_check.json (everything), $OUT/summary.txt (a short table) and one log per part.
# Exit status 0 when every part that ran passed, 1 otherwise (the JSON is written either way).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  "") ;;
  *) echo "error: unknown argument ${1} (usage: bash launch/gpu_check.sh [--cpu])" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}
if [ "$MODE" = cpu ]; then BUDGET_S=${BUDGET_S:-120}; else BUDGET_S=${BUDGET_S:-480}; fi
BATCH=${BATCH:-8}               # peer batch at 256 px
STEP_BATCH=${STEP_BATCH:-32}    # kl-f8 throughput batch
mkdir -p "$OUT" || { echo "error: cannot create $OUT" >&2; exit 2; }
START=$(date +%s)
: > "$OUT/parts.tsv"
echo "[gpu_check] mode $MODE, budget ${BUDGET_S}s, writing $OUT/"

# run_part NAME LIMIT_S CMD...: runs CMD under timeout (capped by what is left of the budget), log in $OUT/NAME.log
run_part() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    printf '%s\tskipped\t0\tbudget spent\n' "$name" >> "$OUT/parts.tsv"; echo "[gpu_check] $name: skipped (budget)"; return
  fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? status=ok
  [ $rc -ne 0 ] && status=failed
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
  printf '%s\t%s\t%s\trc %s, limit %ss\n' "$name" "$status" "$(($(date +%s) - t0))" "$rc" "$limit" >> "$OUT/parts.tsv"
  echo "[gpu_check] $name: $status ($(($(date +%s) - t0)) s)"
}
skip_part() { printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$OUT/parts.tsv"; echo "[gpu_check] $1: skipped ($2)"; }

# Installs only what is missing, then env.json. The GPU machines lent to this project reach no package index:
# there WHEELS=<folder> (made beforehand by launch/gpu_wheels.sh on a machine that can) is what pip installs
# from, with --no-index: webdataset, deepspeed, diffusers and whatever they need that the image lacks (the
# image's own torch, numpy, ... stay). With network and no WHEELS: launch/install.sh --test, then diffusers.
install_deps() {
  local ok=0  # env.json is written even when this fails: it tells what the machine is and what it lacks
  if [ -n "${WHEELS:-}" ] && [ ! -d "$WHEELS" ]; then
    echo "error: WHEELS=$WHEELS is not a folder (make it with launch/gpu_wheels.sh)"
    ok=1
  elif [ -n "${WHEELS:-}" ]; then
    # The three the harness adds, with what they need from the folder: pip checks every requirement against
    # the image (a too old package there fails here, loudly) and installs nothing the image already has.
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" webdataset deepspeed diffusers || ok=1
    "$PYTHON" -m pip check || echo "[install] pip check found the conflicts above (some may be the image's own)"
  elif ! "$PYTHON" -c "import torch, accelerate, webdataset, einops, pytest" 2>/dev/null; then
    bash launch/install.sh --test || ok=1
  fi
  if [ -z "${WHEELS:-}" ] && ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    "$PYTHON" -m pip install -q "diffusers>=0.30" || true
  fi
  "$PYTHON" -c "import torch, accelerate, webdataset, einops, pytest, harness" || ok=1
  if [ -n "${WHEELS:-}" ]; then  # what the wheels were for must import, not just be there
    "$PYTHON" -c "import deepspeed, diffusers" || ok=1
  fi
  "$PYTHON" - "$OUT/env.json" <<'PY' || ok=1
import importlib, json, platform, sys
import torch


def imports(name):  # installed is not enough: a missing dependency fails only at import
    try:
        importlib.import_module(name)
        return True
    except Exception as exn:  # noqa: BLE001 - any import failure means the part cannot use it
        print(f"[install] {name} does not import: {type(exn).__name__}: {exn}")
        return False


sys.path.insert(0, "launch")
try:
    from benchmark import bf16_peak
except ImportError as exn:
    print(f"error: launch/benchmark.py does not import: {exn}")
    bf16_peak = lambda name: None  # noqa: E731
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "cpu"
env = {"device": name, "cuda_available": cuda, "device_count": torch.cuda.device_count(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
       "python": platform.python_version(), "bf16_peak_tflops": bf16_peak(name) if cuda else None,
       "diffusers": imports("diffusers"), "deepspeed": imports("deepspeed")}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(env)
PY
  return $ok
}
export -f install_deps
# The harness is used from this checkout (no install needed, also offline); the tests' subprocesses too.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHON OUT WHEELS
run_part install 120 bash -c install_deps

NO_CUDA=0
if [ "$MODE" = gpu ] && ! grep -q '"cuda_available": true' "$OUT/env.json" 2>/dev/null; then
  echo "error: no CUDA device visible (torch.cuda.is_available() is False); use --cpu for the dry run" >&2
  printf 'cuda\tfailed\t0\tno CUDA device visible\n' >> "$OUT/parts.tsv"
  NO_CUDA=1
fi
SIDES=ours,diffusers
grep -q '"diffusers": true' "$OUT/env.json" 2>/dev/null || SIDES=ours  # no diffusers (offline, no wheels): ours alone

# The GPU tests skip themselves without a GPU: on CPU this checks that they still collect and import.
run_part gpu_tests 210 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py

BENCH=("$PYTHON" launch/benchmark.py peer)
if [ "$MODE" = cpu ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a CI machine is shared: one thread is not oversubscribed
  SIZE=(--ch 32 --ch-mult 1,2 --layers 1 --image-size 16 --batch-size 1 --rounds 1 --warmup 0 --device cpu)
  run_part peer_bf16 60 "${BENCH[@]}" "${SIZE[@]}" --dtype bf16 --sides "$SIDES" --flops --json "$OUT/peer_bf16.jsonl"
  run_part peer_fp16 60 "${BENCH[@]}" "${SIZE[@]}" --dtype fp16 --sides "$SIDES" --json "$OUT/peer_fp16.jsonl"
  skip_part klf8_step "cpu mode"
  STEP=("$PYTHON" launch/benchmark.py step --config tests/configs/tiny.yaml --image-size 32 --batch-size 4 --steps 2
        --warmup 1 --rounds 1)
  run_part step_host 60 "${STEP[@]}" --json "$OUT/step_host.jsonl"
  run_part step_fused 60 "${STEP[@]}" --json "$OUT/step_fused.jsonl" optim.fused=true
  skip_part compile "cpu mode"
elif [ "$NO_CUDA" = 1 ]; then  # kl-f8 at 256 px on a CPU would only burn the budget
  for part in peer_bf16 klf8_step peer_fp16 step_host step_fused compile; do skip_part $part "no CUDA device"; done
else
  # Most telling first: when the budget runs short, compile (the slowest to learn anything from) is skipped.
  run_part peer_bf16 75 "${BENCH[@]}" --preset kl-f8 --batch-size "$BATCH" --dtype bf16 --rounds 5 --steps 3 \
    --sides "$SIDES,ours+channels_last" --flops --json "$OUT/peer_bf16.jsonl"
  run_part klf8_step 60 "${BENCH[@]}" --preset kl-f8 --batch-size "$STEP_BATCH" --dtype bf16 --rounds 5 --steps 3 \
    --sides ours,ours+channels_last --flops --json "$OUT/klf8_step.jsonl"
  run_part peer_fp16 60 "${BENCH[@]}" --preset kl-f8 --batch-size "$BATCH" --dtype fp16 --rounds 5 --steps 3 \
    --sides "$SIDES" --flops --json "$OUT/peer_fp16.jsonl"
  # The harness's own step against a plain loop (which never reads the device): host-decided (reads the
  # gradient norm each step) vs optim.fused (no host sync). Small images, so the host's waits show.
  STEP=("$PYTHON" launch/benchmark.py step --config launch/configs/kl_f8.yaml --image-size 64 --batch-size 8
        --steps 20 --rounds 3)
  run_part step_host 45 "${STEP[@]}" --json "$OUT/step_host.jsonl" train.mixed_precision=bf16
  run_part step_fused 45 "${STEP[@]}" --json "$OUT/step_fused.jsonl" train.mixed_precision=bf16 optim.fused=true
  run_part compile 120 "${BENCH[@]}" --preset kl-f8 --batch-size "$BATCH" --dtype bf16 --rounds 3 --steps 3 \
    --sides ours,ours+compile --json "$OUT/compile.jsonl"
fi

# One JSON and a short table from what the parts left behind.
"$PYTHON" - "$OUT" "$MODE" "$BUDGET_S" "$(($(date +%s) - START))" <<'EOF'
import json, re, sys
from pathlib import Path
out, mode, budget, elapsed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
parts = {}
for line in (out / "parts.tsv").read_text().splitlines():
    name, status, seconds, note = line.split("\t")
    parts[name] = {"status": status, "seconds": int(seconds), "note": note, "log": f"{name}.log"}
res = {"mode": mode, "budget_s": budget, "elapsed_s": elapsed, "parts": parts,
       "env": json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else None}
log = out / "gpu_tests.log"
if log.exists():
    tail = log.read_text().strip().splitlines()[-1:] or [""]
    res["gpu_tests"] = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail[0])}
for name in ("peer_bf16", "peer_fp16", "klf8_step", "step_host", "step_fused", "compile"):
    f = out / f"{name}.jsonl"
    if f.exists() and f.read_text().strip():
        res[name] = json.loads(f.read_text().strip().splitlines()[-1])
res["ok"] = all(p["status"] in ("ok", "skipped") for p in parts.values())
(out / "gpu_check.json").write_text(json.dumps(res, indent=1))
lines = [f"gpu_check ({mode}) on {(res['env'] or {}).get('device', '?')}, {elapsed} s of {budget} s"]
lines += [f"  {n:<10} {p['status']:<8} {p['seconds']:>4} s  {p['note']}" for n, p in parts.items()]
if "gpu_tests" in res:
    lines.append(f"  tests/test_gpu.py: {res['gpu_tests']}")
for name in ("step_host", "step_fused"):
    if name in res:
        r = res[name]
        lines.append(f"  {name}: {r['device']}, batch {r['batch_size']}, {r['image_size']} px: harness "
                     f"{r['harness_ms']:.1f} ms vs plain loop {r['plain_ms']:.1f} ms ({r['overhead_pct']:+.1f}%)")
for name in ("peer_bf16", "peer_fp16", "klf8_step", "compile"):
    if name in res:
        r = res[name]
        lines.append(f"  {name}: {r['dtype']}, batch {r['batch_size']}, {r['image_size']} px")
        for row in r["rows"]:
            extra = (f", {row['tflops']:.1f} TFLOP/s" if row.get("tflops") is not None else "") + (
                f" = {100 * row['peak_fraction']:.0f}% of bf16 peak" if row.get("peak_fraction") else "") + (
                f", compile {row['compile_s']:.0f} s" if "compile_s" in row else "")
            lines.append(f"    {row['side']:<28} {row['ms']:>9.1f} ms {row['img_s']:>8.1f} img/s  ratio {row['ratio']:.2f}{extra}")
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if res["ok"] else 1)
EOF
status=$?
# BUNDLE=<folder>: three files there (summary.txt, gpu_check.json, everything as gpu_check.tgz), for a machine
# that hands back only a few files (the device tool: BUNDLE=$OUT OUT=/tmp/gc, in that order: the device tool sets OUT).
if [ -n "${BUNDLE:-}" ]; then
  mkdir -p "$BUNDLE" && cp "$OUT/summary.txt" "$OUT/gpu_check.json" "$BUNDLE/" 2>/dev/null
  tar czf "$BUNDLE/gpu_check.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")" || status=1
fi
exit $status
