#!/usr/bin/env bash
# One call on a bare GPU machine measures what docs/gpu.md needs and checks the CUDA path, in about 6 minutes:
#
#   bash bench/gpu_wheels.sh                 # here, once: the wheels the GPU image lacks, into .whl/ (git-ignored)
#   bash bench/gpu_check.sh                  # there (the working tree and .whl/ travel); everything goes to $OUT
#   bash bench/gpu_check.sh --cpu            # a dry run at tiny sizes on the CPU (tests/test_specs.py runs it)
#   python bench/gpu_projection.py $OUT/rates.json     # the GPU-hours of the full pipeline from the measured rates
#
# Phases, each under its own `timeout` (cut to what is left of BUDGET_S), so a failure or a hang still leaves the
# figures of the phases before it:
#   setup        the wheels in .whl/ installed into the machine's python (pip --no-index: the machine has no registry;
#                skipped with --cpu), then every pinned version against requirements.txt (OUT/versions.json)
#   data         generated demo data at 256 px and its cache (bench/gpu_check.py data)
#   throughput   per GPU spec, bench/train_step.py: training images/s through the spec's loader and with the data on
#                the device (EMA, clipping, the lr schedule), peak memory, inference with flip TTA at two batch sizes
#                (OUT/rates.json)
#   correctness  one fold killed with SIGKILL during epoch 2 and resumed, the second fold, predict, the GRU and
#                LightGBM, the blend, the report, the bundle, the submission (OUT/correctness.json)
#   compile      per GPU spec, the A/B of torch.compile (last: the slowest and the likeliest to run out of time)
# With --cpu: tiny sizes, resnet10t in place of the specs' networks (their code paths, not their cost), the
# throughput of all specs in one process and the compile A/B of the first (torch.compile's tracing only).
#   projection   bench/gpu_projection.py OUT/rates.json (OUT/projection.txt)
# OUT (default bench/out/gpu_check) holds only flat files: gpu_check.log, phases.json, versions.json, rates.json,
# correctness.json, projection.txt. Scratch data goes to WORK (default a fresh folder under /tmp).
# Settings (environment): OUT, WORK, PY (default python3; with --cpu .venv/bin/python when present), BUDGET_S
# (default 330 s of phases), SPECS (default run.sh's GPU_CONFIGS).
set -uo pipefail
cd "$(dirname "$0")/.."
CPU=0; [ "${1:-}" = "--cpu" ] && CPU=1
OUT=${OUT:-bench/out/gpu_check}
WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
BUDGET_S=${BUDGET_S:-330}
if [ -z "${PY:-}" ]; then PY=python3; [ "$CPU" = 1 ] && [ -x .venv/bin/python ] && PY=.venv/bin/python; fi
mkdir -p "$OUT" "$WORK"
export CPU OUT WORK PY
LOG=$OUT/gpu_check.log; : > "$LOG"
PHASES=$OUT/phases.json; echo "{}" > "$PHASES"
SPECS=${SPECS:-$(sed -n 's/^GPU_CONFIGS=(\(.*\))$/\1/p' run.sh)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T0=$(date +%s)

first=${SPECS%% *}
if [ "$CPU" = 1 ]; then  # tiny: the whole dry run well under a minute on 2 cores
  export OMP_NUM_THREADS=1  # tiny tensors: a second thread spin-waits more than it computes
  SIZE=32; PATIENTS=6; SLICES="8 9"
  BENCH="--model resnet10t --size 32 --batch 4 --workers 1 --steps 2 --warmup 1 --infer-batches 8 16 --infer-images 16"
  BENCH="$BENCH --amp off"
  COMPILE="--compile-backend eager"
  TRAIN="--pretrained false --model resnet10t --img-size 32 --epochs 2 --max-steps-per-epoch 2 --batch-size 8"
  TRAIN="$TRAIN --workers 0 --amp off --tensorboard false"
  SEQ="--features both --epochs 1"; BOOST="--max-trees 5"
  THROUGHPUT=("$SPECS"); COMPILED=("$first")  # one process for all specs: the same code, one torch import
else
  SIZE=256; PATIENTS=16; SLICES="20 24"
  BENCH="--steps 40 --warmup 10"
  COMPILE=""
  TRAIN="--pretrained false --epochs 3 --max-steps-per-epoch 30 --batch-size 32 --workers 8"
  SEQ="--features both --epochs 3"; BOOST="--max-trees 20"
  read -r -a THROUGHPUT <<< "$SPECS"; COMPILED=("${THROUGHPUT[@]}")  # one process per spec: a hang loses one
fi

record() {  # record NAME STATUS SECONDS: one entry of phases.json
  "$PY" - "$PHASES" "$1" "$2" "$3" <<'EOF'
import json, sys
path, name, status, seconds = sys.argv[1:]
d = json.load(open(path)); d[name] = {"status": status, "seconds": int(seconds)}
json.dump(d, open(path, "w"), indent=1)
EOF
}

phase() {  # phase NAME MAX_S COMMAND...: the command under `timeout`, cut to what is left of the budget
  local name=$1 max=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - T0) ))
  local limit=$(( max < left ? max : left ))
  if [ "$limit" -lt 10 ]; then
    echo "[skip] $name: ${left}s of the ${BUDGET_S}s budget left" | tee -a "$LOG"; record "$name" skipped-budget 0; return
  fi
  echo "[run ] $name (at most ${limit}s)" | tee -a "$LOG"
  local t1; t1=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$? took=$(( $(date +%s) - t1 ))
  local status=ok; [ "$rc" = 0 ] || status="failed ($rc)"; [ "$rc" = 124 ] && status="timed out after ${limit}s"
  echo "[$( [ "$rc" = 0 ] && echo done || echo FAIL)] $name: $status in ${took}s" | tee -a "$LOG"
  record "$name" "$status" "$took"
}

setup() {
  if [ "$CPU" = 1 ]; then
    echo "setup: --cpu, nothing installed (the wheels in .whl/ are for CPython 3.12 on the GPU machine)"
  elif [ -f .whl/wheels.txt ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --find-links .whl -r .whl/wheels.txt || return 1
    echo "setup: installed $(tr '\n' ' ' < .whl/wheels.txt)"
  else
    echo "setup: no .whl/wheels.txt (bash bench/gpu_wheels.sh makes it): using what the machine has"
  fi
  nvidia-smi || true
  "$PY" bench/gpu_check.py versions --out "$OUT"
}

export -f setup
phase setup 60 bash -c setup
# shellcheck disable=SC2086
phase data 60 "$PY" bench/gpu_check.py data --work "$WORK" --patients "$PATIENTS" --size "$SIZE" --slices $SLICES
names() { local n=""; for s in $1; do n="$n $(basename "$s" .yaml)"; done; echo "${n# }"; }
for group in "${THROUGHPUT[@]}"; do
  # shellcheck disable=SC2086
  phase "throughput $(names "$group")" 75 "$PY" bench/train_step.py --spec $group --out-dir "$WORK/out" $BENCH \
    --json "$OUT/rates.json"
done
phase correctness 150 "$PY" bench/gpu_check.py correctness --work "$WORK" --out "$OUT" --spec "$first" \
  --train-flags "$TRAIN" --seq-flags "$SEQ" --boost-flags "$BOOST"
for group in "${COMPILED[@]}"; do
  # shellcheck disable=SC2086
  phase "compile $(names "$group")" 100 "$PY" bench/train_step.py --spec $group --out-dir "$WORK/out" $BENCH $COMPILE \
    --compile-only --json "$OUT/rates.json"
done
projection() { "$PY" bench/gpu_projection.py "$OUT/rates.json" | tee "$OUT/projection.txt"; }
export -f projection
phase projection 30 bash -c projection
echo "total: $(( $(date +%s) - T0 ))s; figures in $OUT" | tee -a "$LOG"
cat "$PHASES"
