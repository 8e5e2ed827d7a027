#!/usr/bin/env bash
# Retrain the bundled models from scratch with `vitscope pretrain` only, then package them.
#   scripts/train_bundled.sh [STEPS] [OUT_DIR]      (PACKAGE=0: train only, package later)
# Same architecture and budget (steps x batch) for every objective. Three processes at a time, one
# thread each (this machine has 2 cores; the cheap MIM runs share one). A killed run continues where it stopped: the script passes
# --resume when a run directory already holds a checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-${STEPS:-300}}
OUT=${2:-runs/bundled}
VITSCOPE=${VITSCOPE:-.venv/bin/vitscope}
ARCH=vit_tiny_patch16_224
KWARGS='{"img_size":28,"patch_size":4,"embed_dim":64,"depth":6,"num_heads":4}'
COMMON=(--model "$ARCH" --model-kwargs "$KWARGS" --data fashion-mnist --steps "$STEPS" --batch-size 128
        --lr 1e-3 --warmup-steps 30 --save-every 25 --seed 0 --no-progress)
mkdir -p "$OUT"

train() {  # NAME ARGS...
  local name=$1; shift
  local resume=()
  [ -f "$OUT/$name/train_state.pt" ] && resume=(--resume)
  echo "$(date -u +%FT%TZ) start $name" >> "$OUT/train.log"
  printf '%s\tvitscope pretrain %s --out %s\n' "$name" "$(printf '%q ' "$@" "${COMMON[@]}")" "$OUT/$name" \
    >> "$OUT/commands.tsv"
  OMP_NUM_THREADS=1 "$VITSCOPE" pretrain "$@" "${COMMON[@]}" --out "$OUT/$name" "${resume[@]}" \
    > "$OUT/$name.stdout" 2>&1
  echo "$(date -u +%FT%TZ) done $name" >> "$OUT/train.log"
}

train moco --method moco &
train hybrid --method hybrid --mim simmim --cl-weight 0.2 &
(train simmim --method simmim; train mae --method mae) &
wait
[ "${PACKAGE:-1}" = 1 ] && .venv/bin/python scripts/package_bundled.py "$OUT"
