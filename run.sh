#!/usr/bin/env bash
# From data to a Kaggle-ready submission and a portable model file, one step per line. Rerun after a kill:
# finished steps are skipped.
#
#   bash run.sh                                   # input/ (or generated demo data when input/ has no competition data)
#   INPUT_DIR=../shared/rsna_sample K=3 bash run.sh
#   SUBSET=100000 bash run.sh                     # about 100k labelled slices of whole patients, as data of their own
#   INPUT_DIR=/data/rsna OUT_DIR=/scratch/rsna bash run.sh
#   OVERWRITE=1 bash run.sh                       # redo every step whose settings or inputs changed
#   bash run.sh test                              # the test suite
#
# Settings (environment): INPUT_DIR (Kaggle-layout data), OUT_DIR (default outputs/<data folder name>),
# K and SEED (folds; K is 5, or 3 on the generated demo data), DEVICE_CONFIG=gpu|cpu (default: gpu when CUDA is
# available), MODELS (space-separated model specs to run instead of the device's list, e.g.
# MODELS=configs/densenet121_256_25d.yaml), TRAIN_FLAGS, SEQ_FLAGS and
# BOOST_FLAGS (appended to every stage-1 / GRU / LightGBM command, e.g. TRAIN_FLAGS="--epochs 1" for a smoke run),
# BLEND_FLAGS (the blend of a run's stages, default by device: --weights fit-global on CPU, fit on GPU),
# CACHE_SIZE (cached image size: 256 on GPU, 128 on CPU), FOLDS_FILE, SUBMISSIONS_DIR, OVERWRITE,
# SUBSET and SUBSET_SEED (a label-stratified subset of whole patients, src/subset.py: its own data tag <data>_sub<N>),
# LAUNCH (how stage 1 is started; several GPUs: LAUNCH=".venv/bin/torchrun --nproc_per_node=4"; batch sizes are
# per process, and a fold resumes on another GPU count).
# Every step records what made its output (src/stamps.py): a step whose settings and inputs are unchanged is
# skipped; one whose settings changed stops the run and says what differs, unless OVERWRITE=1. Paths come from
# src/layout.py; each step prints its own "[run ]" line when it computes.
# Outputs of two data folders never mix: each has its own OUT_DIR, folds/<name>_k<K>_seed<SEED>.csv and
# submission name.
set -euo pipefail
cd "$(dirname "$0")"

# ---- models: one YAML file per model (the run is named after the file); stage-2 flags per device ----
GPU_CONFIGS=(configs/seresnext50_256.yaml configs/densenet121_256_25d.yaml)
CPU_CONFIGS=(configs/resnet10t_128.yaml)
# stage-2 inputs: randomly initialised fold models do not share an embedding space, so on CPU the sequence
# model reads the stage-1 logits only (docs/pipeline.md); pretrained GPU models share one: embeddings + logits
GPU_SEQ_FLAGS="--features both"
CPU_SEQ_FLAGS="--features logits"
# blend weights: per class on the GPU specs' full data; one weight per member for the CPU spec, which runs on small
# data, where 18 per-class weights overfit (measured on the real sample over 3 seeds: docs/figures.md)
GPU_BLEND_FLAGS="--weights fit"
CPU_BLEND_FLAGS="--weights fit-global"
K_GIVEN=${K:-}
K=${K:-5}
SEED=${SEED:-42}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
SEQ_FLAGS=${SEQ_FLAGS:-}
BOOST_FLAGS=${BOOST_FLAGS:-}
SUBMISSIONS_DIR=${SUBMISSIONS_DIR:-submissions}
OW=""; [ "${OVERWRITE:-0}" = 1 ] && OW="--overwrite"

T_START=$(date +%s)
export ICH_STEP_STATUS; ICH_STEP_STATUS=$(mktemp); trap 'rm -f "$ICH_STEP_STATUS"' EXIT
step() {  # step NAME COMMAND...: the command prints "[run ] NAME" itself when it computes, and tells run.sh (through
          # ICH_STEP_STATUS) when it was up to date, so run.sh needs no output path to know either (src/stamps.py)
  local name=$1; shift
  local t0; t0=$(date +%s)
  : > "$ICH_STEP_STATUS"
  ICH_STEP_NAME=$name "$@"
  if grep -q skip "$ICH_STEP_STATUS"; then echo "[skip] $name (up to date)"; else echo "[done] $name in $(( $(date +%s) - t0 ))s"; fi
}

# ---- 1. environment: .venv from requirements.txt, (re)installed when missing or stale ----
if [ ! -x .venv/bin/python ] || ! cmp -s requirements.txt .venv/requirements.installed; then
  echo "[run ] setup: creating .venv and installing requirements.txt"
  t0=$(date +%s)
  ${PYTHON:-python3} -m venv .venv
  .venv/bin/python -m pip install -qq --upgrade pip
  .venv/bin/python -m pip install -qq -r requirements.txt
  cp requirements.txt .venv/requirements.installed
  echo "[done] setup in $(( $(date +%s) - t0 ))s"
else
  echo "[skip] setup (.venv matches requirements.txt)"
fi
PY=.venv/bin/python
LAUNCH=${LAUNCH:-$PY}

if [ "${1:-}" = "test" ]; then  # on every core: most of the suite's time is single-threaded (imports, subprocesses)
  shift
  exec $PY -m pytest -q -n auto --dist loadgroup "$@"
fi

# ---- 2. data: competition data in INPUT_DIR, else generated demo data ----
INPUT_DIR=${INPUT_DIR:-input}
if [ ! -f "$INPUT_DIR/stage_2_train.csv" ]; then
  echo "no competition data in $INPUT_DIR/ (stage_2_train.csv): using generated demo data in input/demo"
  INPUT_DIR=input/demo
  # 20 patients in 3 folds: a fresh clone's whole run within ~10 min on 2 cores (docs/pipeline.md has the figures)
  K=${K_GIVEN:-3}
  [ -f "$INPUT_DIR/stage_2_sample_submission.csv" ] || $PY -m src.synth --data-dir "$INPUT_DIR" --patients 20 --overwrite
fi
# SUBSET=N: about N labelled training slices of whole patients, stratified on label presence, made (or reused) as a
# data folder of symlinks in outputs/subsets/<data>_sub<N>/; its name is the data tag, so nothing mixes with the full
# run's outputs (an explicit OUT_DIR gets a sibling of the subset's name). The test set stays whole.
if [ -n "${SUBSET:-}" ]; then
  FULL_OUT=${OUT_DIR:-}
  INPUT_DIR=$($PY -m src.subset "$INPUT_DIR" --n "$SUBSET" --subset-seed "${SUBSET_SEED:-0}" ${FULL_OUT:+--out-dir "$FULL_OUT"} $OW | tail -1)
  [ -z "$FULL_OUT" ] || OUT_DIR="$(dirname "$FULL_OUT")/$(basename "$INPUT_DIR")"
fi
TAG=$($PY -m src.layout tag --data-dir "$INPUT_DIR")                       # the data folder's name
OUT_DIR=${OUT_DIR:-$($PY -m src.layout out --data-dir "$INPUT_DIR")}      # outputs/<TAG> unless told otherwise
echo "data: $INPUT_DIR -> outputs: $OUT_DIR"

DEVICE_CONFIG=${DEVICE_CONFIG:-$($PY -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")}
if [ "$DEVICE_CONFIG" = gpu ]; then CONFIGS=("${GPU_CONFIGS[@]}"); IMG=${CACHE_SIZE:-256}; SEQ_FLAGS="$GPU_SEQ_FLAGS $SEQ_FLAGS"
  BLEND_FLAGS=${BLEND_FLAGS:-$GPU_BLEND_FLAGS}; else
  CONFIGS=("${CPU_CONFIGS[@]}"); IMG=${CACHE_SIZE:-128}; SEQ_FLAGS="$CPU_SEQ_FLAGS $SEQ_FLAGS"
  BLEND_FLAGS=${BLEND_FLAGS:-$CPU_BLEND_FLAGS}
  echo "no GPU: using the small CPU configuration (resnet10t, 128 px, few epochs); DEVICE_CONFIG=gpu overrides"
fi
# shellcheck disable=SC2206
[ -z "${MODELS:-}" ] || CONFIGS=($MODELS)  # MODELS="configs/a.yaml configs/b.yaml": these model specs instead

# ---- 3. cache and folds ----
step "prepare cache" $PY -m src.prepare "$INPUT_DIR" --out-dir "$OUT_DIR" --cache-size "$IMG" $OW
FOLDS=(--k "$K" --fold-seed "$SEED" ${FOLDS_FILE:+--folds-file "$FOLDS_FILE"})  # default folds/<TAG>_k<K>_seed<SEED>.csv
step "folds" $PY -m src.folds "$INPUT_DIR" --out-dir "$OUT_DIR" "${FOLDS[@]}"

RUNS=()
for CFG in "${CONFIGS[@]}"; do
  NAME=$(basename "$CFG" .yaml)
  RUN=$($PY -m src.layout run --out-dir "$OUT_DIR" --name "$NAME")  # the run folder (src/layout.py owns the layout)
  # ---- 4. stage 1: one command per fold (--resume continues a killed fold) ----
  for ((k = 0; k < K; k++)); do
    # shellcheck disable=SC2086
    step "train $NAME fold $k" $LAUNCH -m src.train --config "$CFG" --data-dir "$INPUT_DIR" \
      --out-dir "$OUT_DIR" "${FOLDS[@]}" --fold "$k" $TRAIN_FLAGS --resume $OW
  done
  step "evaluate $NAME" $PY -m src.evaluate "$RUN"
  # ---- 5. test predictions and embeddings of every fold ----
  step "predict $NAME" $PY -m src.predict "$RUN" $OW
  # ---- 6. stage 2: a GRU over each series, and boosted trees on each slice and its neighbours, per fold ----
  for ((k = 0; k < K; k++)); do
    # shellcheck disable=SC2086
    step "sequence $NAME fold $k" $PY -m src.sequence --stage1 "$RUN" --fold "$k" $SEQ_FLAGS $OW
  done
  for ((k = 0; k < K; k++)); do
    # shellcheck disable=SC2086
    step "boost $NAME fold $k" $PY -m src.boost --stage1 "$RUN" --fold "$k" $BOOST_FLAGS $OW
  done
  # ---- 7. the blend of the run's stages (fitted once on OOF; the Predictor applies it) and their report ----
  # shellcheck disable=SC2086
  step "blend $NAME" $PY -m src.blend "$RUN" $BLEND_FLAGS $OW
  step "evaluate stage 1 vs stage 2 ($NAME)" $PY -m src.evaluate "$RUN"
  # ---- 8. the trained model as one portable file (src/export.py): what a colleague or a hospital loads ----
  step "bundle $NAME" $PY -m src.export "$RUN" $OW
  RUNS+=("$RUN")
done

# ---- 9. blend every model's stages and write the submission ----
SUB=$($PY -m src.layout submission --name "${TAG}_blend" --submissions-dir "$SUBMISSIONS_DIR")
# shellcheck disable=SC2086
step "submission" $PY -m src.make_submission "${RUNS[@]}" --name "${TAG}_blend" --data-dir "$INPUT_DIR" \
  --submissions-dir "$SUBMISSIONS_DIR" $BLEND_FLAGS $OW
$PY -m src.upload "$SUB" -m "$TAG blend" --data-dir "$INPUT_DIR" --dry-run

echo "total: $(( $(date +%s) - T_START ))s"
echo "submission: $SUB   (upload: python -m src.upload $SUB -m \"message\" --data-dir $INPUT_DIR)"
for CFG in "${CONFIGS[@]}"; do
  echo "model: $($PY -m src.layout bundle --out-dir "$OUT_DIR" --name "$(basename "$CFG" .yaml)")   (load: Predictor.load(FILE); try: python -m src.serve.demo --run FILE DICOMS...)"
done
