#!/usr/bin/env bash
# Wheels for an offline GPU machine, made on a machine that can reach a package index:
#
#   bash launch/gpu_wheels.sh                 # -> .whl/ (git-ignored), for CPython 3.12 on x86_64 Linux
#   PY_VERSION=3.11 DEST=w bash launch/gpu_wheels.sh
#
# The GPU machines lent to this project reach no package index. Their image has torch, accelerate, einops,
# tensorboard, safetensors, transformers, pytest and the like, but not what this harness adds: webdataset,
# DeepSpeed and diffusers (the peer benchmark), and the small packages those need that the image lacks.
# This downloads exactly those, at the versions installed here (the ones the tests ran with), as wheels
# for the GPU machine's Python; DeepSpeed ships no wheel, so it is built here (DS_BUILD_OPS=0: pure Python,
# its ops compile on first use). Then, on the GPU machine, `WHEELS=.whl bash launch/gpu_check.sh`
# installs them with --no-index before anything else (see README, "GPU check"). Run it again before each
# device call: .whl/ is git-ignored, so a fresh checkout has none, and an old one may hold other versions.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
DEST=${DEST:-.whl}
# What the GPU image lacks, and what those need (launch/gpu_check.sh installs from here what is not installed
# there, with pip's dependency check against the image). Version: the one installed here (pip's newest
# otherwise). msgpack, py-cpuinfo, ninja, typing-extensions and zipp are in the image as last listed (pip
# leaves a version there that satisfies alone), but DeepSpeed cannot import without msgpack, pydantic without
# typing-extensions, importlib-metadata without zipp: carried in case a later image lacks them.
PURE=(webdataset braceexpand hjson pydantic annotated-types typing-inspection diffusers importlib-metadata
      lazy-importer py-cpuinfo typing-extensions zipp)
BINARY=(pydantic-core msgpack ninja)
BUILT=(deepspeed)

version() {  # the installed version of $1, or nothing
  "$PYTHON" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1"
}
spec() { local v; v=$(version "$1"); if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi; }

# Into a fresh folder that replaces $DEST once complete: one version of each package (an older wheel left
# beside a newer one would be a second candidate), and a failed download leaves the old folder as it was.
NEW="$DEST.new"
rm -rf "$NEW" && mkdir -p "$NEW"
specs=()
for p in "${PURE[@]}" "${BINARY[@]}"; do specs+=("$(spec "$p")"); done
echo "[gpu_wheels] for CPython $PY_VERSION x86_64 into $DEST/: ${specs[*]}"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$NEW" "${specs[@]}"
built=()
for p in "${BUILT[@]}"; do built+=("$(spec "$p")"); done
echo "[gpu_wheels] building ${built[*]} (pure Python)"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$NEW" "${built[@]}"
rm -rf "$DEST" && mv "$NEW" "$DEST"
echo "[gpu_wheels] $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST/"
