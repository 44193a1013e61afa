#!/usr/bin/env bash
# One-shot GPU check, written to be run blind by whoever gets a GPU for a few minutes (under 6 on one GPU):
#
#   bash launch/gpu_check.sh              # GPU: install what is missing, tests/test_gpu.py, peer + kl-f8 benchmarks
#   bash launch/gpu_check.sh --cpu        # the same script on CPU, tiny sizes, GPU parts skipped (< 120 s): CI
#   PARTS=install,gpu_tests BUDGET_S=200 bash launch/gpu_check.sh   # a rerun of some parts
#   PARTS=install,compile bash launch/gpu_check.sh                   # the opt-in part
#   OUT=my-folder BUDGET_S=600 WHEELS=wheels/ bash launch/gpu_check.sh
#   BUNDLE=$OUT OUT=/tmp/gc WHEELS=.whl bash launch/gpu_check.sh   # on the lent GPU machine (offline): see README
#
# Parts, in this order, each under `timeout` and inside the total budget BUDGET_S (a part that would not fit is
# skipped, never started). PARTS: a comma list of part names; `default` (the default) is every part but the
# opt-in ones (compile), `all` every part.
#   install   offline (the lent GPU machines): WHEELS=<folder from launch/gpu_wheels.sh>, pip --no-index of what
#             the image lacks, one package at a time, into a folder on PYTHONPATH if pip cannot install into the
#             image's environment; online: imports checked, if missing launch/install.sh --test, then diffusers;
#             env.json: device name, torch / CUDA / cuDNN versions, bf16 peak from the data sheet (table in
#             launch/benchmark.py) and as measured (an 8192^3 bf16 matmul). Without install in PARTS only env.json.
#   gpu_tests pytest -v tests/test_gpu.py (fp16 loss scaling + overflow recovery, bf16, ZeRO-2 fp16, fp16 attention,
#             the discriminator's two loss scalers (plain and fused AdamW), TF32 flags, a fused bf16 step
#             with no device reads, with and without a discriminator); each test's outcome reaches the JSON, also
#             when the part is stopped. GPU_TESTS_K=<expr>: only those tests (pytest -k)
#   peer_bf16 / peer_fp16  ours vs diffusers.AutoencoderKL, kl-f8 at 256 px, autocast (fp16 with GradScaler)
#   klf8_step our kl-f8 step at 256 px: images/s and model TFLOP/s (torch.utils.flop_counter) against bf16 peak
#             (these three: fused AdamW and cudnn.benchmark on every side)
#   step_host / step_fused  the harness's whole train_step vs a plain loop in the same precision with the same
#             AdamW, small kl-f8 images in bf16: as it is, and with optim.fused=true (no host sync in the step)
#   encode    launch/encode.py (latent shards) vs a plain decode-encode-save loop, kl-f8 at 256 px on 512 demo
#             images, 4 loader workers: images/s and the ratio (launch/benchmark.py encode)
#   compile   (opt-in) torch.compile of our kl-f8 step: compile seconds and the step ratio
# Writes $OUT/gpu_check.json (everything), $OUT/summary.txt (a short table) and one log per part.
# Exit status 0 when every part that ran passed, 1 otherwise (the JSON is written either way); 2: bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  "") ;;
  *) echo "error: unknown argument ${1} (usage: bash launch/gpu_check.sh [--cpu])" >&2; exit 2 ;;
esac
ALL_PARTS=(install gpu_tests peer_bf16 klf8_step peer_fp16 step_host step_fused encode compile)
OPT_IN=" compile "
SELECTED=" "
IFS=, read -ra wanted <<< "${PARTS:-default}"
for p in "${wanted[@]}"; do
  p=${p// /}
  case " ${ALL_PARTS[*]} default all " in
    *" $p "*) ;;
    *) echo "error: PARTS: unknown part '$p' (parts: ${ALL_PARTS[*]}; default: all but${OPT_IN}; all)" >&2; exit 2 ;;
  esac
  if [ "$p" = default ] || [ "$p" = all ]; then
    for q in "${ALL_PARTS[@]}"; do
      if [ "$p" = all ] || [[ "$OPT_IN" != *" $q "* ]]; then SELECTED+="$q "; fi
    done
  else
    SELECTED+="$p "
  fi
done
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}
# GPU: about 6 min of a 15-min device lease with the machine's start (1-2 min): room for a rerun of a part.
if [ "$MODE" = cpu ]; then BUDGET_S=${BUDGET_S:-120}; else BUDGET_S=${BUDGET_S:-350}; fi
BATCH=${BATCH:-8}               # peer batch at 256 px
STEP_BATCH=${STEP_BATCH:-32}    # kl-f8 throughput batch
SITE=${SITE:-/tmp/site}         # where install puts packages when the image's environment takes none
mkdir -p "$OUT" || { echo "error: cannot create $OUT" >&2; exit 2; }
START=$(date +%s)
: > "$OUT/parts.tsv"
echo "[gpu_check] mode $MODE, budget ${BUDGET_S}s, parts:${SELECTED% }, writing $OUT/"

# run_part NAME LIMIT_S CMD...: runs CMD under timeout (capped by what is left of the budget), log in $OUT/NAME.log
run_part() {
  local name=$1 limit=$2; shift 2
  if [[ " ${ALL_PARTS[*]} " == *" $name "* && "$SELECTED" != *" $name "* ]]; then
    skip_part "$name" "not in PARTS$([[ "$OPT_IN" == *" $name "* ]] && echo " (opt-in)")"; return
  fi
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

# $SITE on PYTHONPATH once install's fallback has filled it (its mark): for every part after it, and for a later
# run on the same machine (a warm rerun), which need not install again. The install part runs in a child
# process, so this runs in the parent before and after it, and in the child right after the fallback.
use_site() {
  if [ -f "$SITE/.gpu_check_site" ] && [[ ":$PYTHONPATH:" != *":$SITE:"* ]]; then
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH#"$PWD"}"  # right after the checkout, which comes first
  fi
}

# pip_group NAME: installs NAME and what it needs that the image lacks from $WHEELS (--no-index). pip checks every
# requirement against the image (a version there that satisfies stays) and installs nothing at all when one is
# unmet, so each of the three is its own call. If pip cannot install into the image's environment (read-only,
# a conflict), the fallback puts NAME and the folder's packages the image lacks into $SITE (--no-deps: what the
# image has is used as it is; the imports checked after say whether that was enough).
pip_group() {
  local name=$1
  "$PYTHON" -m pip install -q --no-index --no-compile --find-links "$WHEELS" "$name" && return 0
  echo "[install] pip could not install $name into $("$PYTHON" -c 'import sys; print(sys.prefix)'): falling back to" \
       "--target $SITE (on PYTHONPATH for the rest of the check)"
  local names
  mapfile -t names < <("$PYTHON" - "$WHEELS" "$name" <<'PY'
import importlib.metadata as m, pathlib, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
names = {norm(sys.argv[2]): sys.argv[2]}
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist = wheel.name.split("-")[0]
    try:
        m.distribution(dist)
    except m.PackageNotFoundError:  # the image lacks it
        names.setdefault(norm(dist), dist)
print("\n".join(names.values()))
PY
)
  echo "[install] into $SITE: ${names[*]}"
  mkdir -p "$SITE" && "$PYTHON" -m pip install -q --no-index --no-compile --find-links "$WHEELS" --no-deps \
    --upgrade --target "$SITE" "${names[@]}" || return 1
  touch "$SITE/.gpu_check_site" && use_site
}

# Installs only what is missing. The GPU machines lent to this project reach no package index: there
# WHEELS=<folder> (made beforehand by launch/gpu_wheels.sh on a machine that can) is what pip installs from, with
# --no-index: webdataset (which every part imports) first, then deepspeed, then diffusers, each with whatever it
# needs that the image lacks (the image's own torch, numpy, ... stay). With network and no WHEELS:
# launch/install.sh --test, then diffusers.
install_deps() {
  local ok=0
  if [ -n "${WHEELS:-}" ] && [ ! -d "$WHEELS" ]; then
    echo "error: WHEELS=$WHEELS is not a folder (make it with launch/gpu_wheels.sh)"
    ok=1
  elif [ -n "${WHEELS:-}" ]; then
    for name in webdataset deepspeed diffusers; do pip_group "$name" || ok=1; done
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
  return $ok
}

# env.json: what the machine is and what it lacks (written also when an install failed), and the bf16 ceiling
# twice: the data sheet's dense peak and what a large bf16 matmul reaches here (a small one on CPU: --cpu checks
# the code, not the number).
write_env() {
  "$PYTHON" - "$OUT/env.json" <<'PY'
import importlib, json, os, platform, sys
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
    from benchmark import bf16_peak, measured_bf16_matmul
except ImportError as exn:
    print(f"error: launch/benchmark.py does not import: {exn}")
    bf16_peak = measured_bf16_matmul = lambda *a: None  # noqa: E731

cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "cpu"
site = os.environ["SITE"]
env = {"device": name, "cuda_available": cuda, "device_count": torch.cuda.device_count(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
       "python": platform.python_version(), "bf16_peak_tflops": bf16_peak(name) if cuda else None,
       "diffusers": imports("diffusers"), "deepspeed": imports("deepspeed"),
       "fallback_site": site if os.path.exists(os.path.join(site, ".gpu_check_site")) else None}
n = 8192 if cuda else 256
try:
    tflops = measured_bf16_matmul(torch.device("cuda" if cuda else "cpu"), n)
    env["bf16_matmul_tflops"], env["bf16_matmul_n"] = (round(tflops, 4), n) if tflops else (None, None)
except Exception as exn:  # noqa: BLE001 - a number we could not measure is null, not a failed install
    print(f"[install] the bf16 matmul failed: {type(exn).__name__}: {exn}")
    env["bf16_matmul_tflops"] = None
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(env)
PY
}
export -f install_deps write_env pip_group use_site
# The harness is used from this checkout (no install needed, also offline); the tests' subprocesses too.
# Unbuffered: a part stopped at its limit still leaves in its log what it printed (pytest: every finished test).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PYTHON OUT WHEELS SITE
use_site
if [[ "$SELECTED" == *" install "* ]]; then
  run_part install 90 bash -c 'install_deps; ok=$?; write_env || ok=1; exit $ok'
else
  run_part env 60 bash -c write_env
fi
use_site

NO_CUDA=0
if [ "$MODE" = gpu ] && ! grep -q '"cuda_available": true' "$OUT/env.json" 2>/dev/null; then
  echo "error: no CUDA device visible (torch.cuda.is_available() is False); use --cpu for the dry run" >&2
  printf 'cuda\tfailed\t0\tno CUDA device visible\n' >> "$OUT/parts.tsv"
  NO_CUDA=1
fi
SIDES=ours,diffusers
grep -q '"diffusers": true' "$OUT/env.json" 2>/dev/null || SIDES=ours  # no diffusers (offline, no wheels): ours alone

# The GPU tests skip themselves without a GPU: on CPU this checks that they still collect and import (and runs the
# one test for any device). -v: one line per test as it ends; faulthandler: the stacks of a test still running
# after 90 s; a per-test limit where pytest-timeout is installed (the image has it): one hung test fails, the
# next ones still run.
PYTEST=("$PYTHON" -m pytest -v -rA -p no:cacheprovider -o faulthandler_timeout=90)
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=130)
[ -n "${GPU_TESTS_K:-}" ] && PYTEST+=(-k "$GPU_TESTS_K")
run_part gpu_tests 170 "${PYTEST[@]}" tests/test_gpu.py

BENCH=("$PYTHON" launch/benchmark.py peer)
# Throughput as a user would get it: AdamW's fused kernel (the benchmark's default is a per-parameter loop) and
# cuDNN's timed choice of convolution kernels, on every side alike.
FAST=(--fused --cudnn-benchmark)
if [ "$MODE" = cpu ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a CI machine is shared: one thread is not oversubscribed
  SIZE=(--ch 32 --ch-mult 1,2 --layers 1 --image-size 16 --batch-size 1 --rounds 1 --warmup 0 --device cpu)
  run_part peer_bf16 60 "${BENCH[@]}" "${SIZE[@]}" --dtype bf16 --sides "$SIDES" "${FAST[@]}" --flops \
    --json "$OUT/peer_bf16.jsonl"
  run_part peer_fp16 60 "${BENCH[@]}" "${SIZE[@]}" --dtype fp16 --sides "$SIDES" "${FAST[@]}" --json "$OUT/peer_fp16.jsonl"
  skip_part klf8_step "cpu mode"
  STEP=("$PYTHON" launch/benchmark.py step --config tests/configs/tiny.yaml --image-size 32 --batch-size 4 --steps 2
        --warmup 1 --rounds 1)
  run_part step_host 60 "${STEP[@]}" --json "$OUT/step_host.jsonl" train.mixed_precision=bf16
  run_part step_fused 60 "${STEP[@]}" --json "$OUT/step_fused.jsonl" train.mixed_precision=bf16 optim.fused=true
  run_part encode 60 bash -c "'$PYTHON' -m shards demo '$OUT/encode_data' --num-samples 48 --image-size 32 --seed 3 \
    --shard-size 16 && '$PYTHON' launch/benchmark.py encode tests/configs/tiny.yaml --data '$OUT/encode_data' \
    --workers 1 --batch-size 8 --rounds 1 --device cpu --json '$OUT/encode.jsonl'"
  skip_part compile "cpu mode"
elif [ "$NO_CUDA" = 1 ]; then  # kl-f8 at 256 px on a CPU would only burn the budget
  for part in peer_bf16 klf8_step peer_fp16 step_host step_fused encode compile; do skip_part $part "no CUDA device"; done
else
  # Most telling first: when the budget runs short, the last ones are skipped.
  run_part peer_bf16 60 "${BENCH[@]}" --preset kl-f8 --batch-size "$BATCH" --dtype bf16 --rounds 5 --steps 3 \
    --sides "$SIDES,ours+nchw" "${FAST[@]}" --flops --json "$OUT/peer_bf16.jsonl"
  run_part klf8_step 45 "${BENCH[@]}" --preset kl-f8 --batch-size "$STEP_BATCH" --dtype bf16 --rounds 5 --steps 3 \
    --sides ours,ours+nchw "${FAST[@]}" --flops --json "$OUT/klf8_step.jsonl"
  run_part peer_fp16 45 "${BENCH[@]}" --preset kl-f8 --batch-size "$BATCH" --dtype fp16 --rounds 5 --steps 3 \
    --sides "$SIDES" "${FAST[@]}" --flops --json "$OUT/peer_fp16.jsonl"
  # The harness's own step against a plain loop (which never reads the device; same precision, same AdamW):
  # host-decided (reads the gradient norm each step) vs optim.fused (no host sync). Small images, so the host's
  # waits show.
  STEP=("$PYTHON" launch/benchmark.py step --config launch/configs/kl_f8.yaml --image-size 64 --batch-size 8
        --steps 20 --rounds 3)
  run_part step_host 40 "${STEP[@]}" --json "$OUT/step_host.jsonl" train.mixed_precision=bf16
  run_part step_fused 40 "${STEP[@]}" --json "$OUT/step_fused.jsonl" train.mixed_precision=bf16 optim.fused=true
  # Latent shards as a diffusion user would make them: loader workers decode while the GPU encodes.
  run_part encode 60 bash -c "'$PYTHON' -m shards demo '$OUT/encode_data' --num-samples 512 --image-size 256 \
    --seed 3 --shard-size 128 && '$PYTHON' launch/benchmark.py encode launch/configs/kl_f8.yaml \
    --data '$OUT/encode_data' --workers 4 --batch-size 32 --rounds 2 --json '$OUT/encode.jsonl'"
  # Opt-in: its compile took 587 s on a CPU once; on a GPU give it a run of its own (PARTS=install,compile).
  run_part compile 240 "${BENCH[@]}" --preset kl-f8 --batch-size "$BATCH" --dtype bf16 --rounds 3 --steps 3 \
    --sides ours,ours+compile "${FAST[@]}" --json "$OUT/compile.jsonl"
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
env = res["env"] or {}
log = out / "gpu_tests.log"
if log.exists():  # each test's outcome from pytest -v's lines, also from a log cut short by the part's limit
    outcomes, words, current = {}, "PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS", None
    for line in log.read_text(errors="replace").splitlines():
        if m := re.match(rf"(tests/\S+::\S+)(?: ({words})\b)?", line):  # -v: the test's id as it starts
            current = m.group(1)
            outcomes[current] = (m.group(2) or "unfinished").lower()  # no outcome (yet): the part stopped in it
        elif m := re.match(rf"({words}) (tests/\S+::\S+)", line):  # -rA's summary
            outcomes[m.group(2)] = m.group(1).lower()
        elif (m := re.match(rf"({words})\s+\[\s*\d+%\]", line)) and current:  # after output the test printed
            outcomes[current] = m.group(1).lower()
    counts = {}
    for v in outcomes.values():
        counts[v] = counts.get(v, 0) + 1
    if not outcomes:  # nothing collected (an import error): pytest's last line
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail[0])}
    res["gpu_tests"], res["gpu_tests_each"] = counts, outcomes
for name in ("peer_bf16", "peer_fp16", "klf8_step", "step_host", "step_fused", "encode", "compile"):
    f = out / f"{name}.jsonl"
    if f.exists() and f.read_text().strip():
        res[name] = json.loads(f.read_text().strip().splitlines()[-1])
        for row in res[name].get("rows", []):  # against the ceiling measured here too
            if row.get("tflops") and env.get("bf16_matmul_tflops") and env.get("cuda_available"):
                row["matmul_fraction"] = round(row["tflops"] / env["bf16_matmul_tflops"], 3)
res["ok"] = all(p["status"] in ("ok", "skipped") for p in parts.values())
(out / "gpu_check.json").write_text(json.dumps(res, indent=1))
lines = [f"gpu_check ({mode}) on {env.get('device', '?')}, {elapsed} s of {budget} s"]
if env.get("bf16_matmul_tflops") is not None:
    lines.append(f"  bf16 ceiling: data sheet {env.get('bf16_peak_tflops') or 'n/a'} TFLOP/s, measured "
                 f"{env['bf16_matmul_tflops']:.4g} TFLOP/s ({env['bf16_matmul_n']}^3 matmul)")
lines += [f"  {n:<10} {p['status']:<8} {p['seconds']:>4} s  {p['note']}" for n, p in parts.items()]
if "gpu_tests" in res:
    lines.append(f"  tests/test_gpu.py: {res['gpu_tests']}")
    lines += [f"    {v.upper()} {k}" for k, v in res["gpu_tests_each"].items() if v not in ("passed", "skipped")]
for name in ("step_host", "step_fused"):
    if name in res:
        r = res[name]
        lines.append(f"  {name}: {r['device']}, batch {r['batch_size']}, {r['image_size']} px, "
                     f"{r.get('mixed_precision', '?')}: harness {r['harness_ms']:.1f} ms vs plain loop "
                     f"{r['plain_ms']:.1f} ms ({r['overhead_pct']:+.1f}%)")
if "encode" in res:
    r = res["encode"]
    lines.append(f"  encode: {r['images']} images at {r['image_size']} px on {r.get('device', '?')}, {r['workers']} "
                 f"workers: encode.py {r['img_per_s']['encode.py']:.1f} img/s vs plain loop "
                 f"{r['img_per_s']['plain loop']:.1f} img/s (ratio {r['ratio']:.2f})")
for name in ("peer_bf16", "peer_fp16", "klf8_step", "compile"):
    if name in res:
        r = res[name]
        lines.append(f"  {name}: {r['dtype']}, batch {r['batch_size']}, {r['image_size']} px")
        for row in r["rows"]:
            extra = (f", {row['tflops']:.1f} TFLOP/s" if row.get("tflops") is not None else "") + (
                f" = {100 * row['peak_fraction']:.0f}% of bf16 peak" if row.get("peak_fraction") else "") + (
                f", {100 * row['matmul_fraction']:.0f}% of measured" if row.get("matmul_fraction") else "") + (
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
