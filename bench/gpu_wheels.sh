#!/usr/bin/env bash
# The wheels a bare GPU machine needs for bench/gpu_check.sh, downloaded here (it has a package registry; the GPU
# machine has none) into .whl/ (git-ignored), which travels there with the working tree:
#
#   bash bench/gpu_wheels.sh                 # then .whl/wheels.txt lists the pins that bench/gpu_check.sh installs
#
# The GPU machine's image already holds torch (2.11), timm, OpenCV, pandas, scikit-learn, safetensors, scipy, joblib,
# tqdm, PyYAML, matplotlib and tensorboard (its list: docs/gpu.md). What it lacks and the pipeline needs: the DICOM
# reader and its decoders for compressed files, the cache's LZ4, LightGBM and the fold splitter, at requirements.txt's
# pins, for CPython 3.12 on manylinux x86_64 (pip download --no-deps: their own dependencies are all on the image).
# The serving side (FastAPI, pynetdicom, highdicom) and the test tools are left out. Ends by checking that the tree
# and the wheels together stay under the 64 MiB that travels (du), and fails when they do not.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
NEEDED="pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle lz4 lightgbm iterative-stratification"
LIMIT_MIB=64

specs=()
for name in $NEEDED; do
  pin=$(grep -iE "^${name}==" requirements.txt | sed 's/[[:space:]#].*//') || true
  [ -n "$pin" ] || { echo "error: $name is not pinned in requirements.txt" >&2; exit 1; }
  specs+=("$pin")
done
platforms=()  # pip matches manylinux_2_N exactly: every N a wheel of these may be tagged with
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
rm -rf "$DEST"; mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${specs[@]}"
printf '%s\n' "${specs[@]}" > "$DEST/wheels.txt"
ls -1 "$DEST"

tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
wheels=$(du -sb "$DEST" | cut -f1)
total=$(( tree + wheels ))
echo "working tree $(( tree / 1024 )) KiB + wheels $(( wheels / 1024 )) KiB = $(( total / 1048576 )) MiB (limit ${LIMIT_MIB} MiB)"
[ "$total" -lt $(( LIMIT_MIB * 1048576 )) ] || { echo "error: over ${LIMIT_MIB} MiB: it would not travel" >&2; exit 1; }
