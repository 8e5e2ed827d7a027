#!/usr/bin/env bash
# Retrain the bundled models from scratch with `vitscope pretrain` only, then package them.
#   scripts/train_bundled.sh [OUT_DIR]        (PACKAGE=0: train only, package later)
# Budgets in epochs of Fashion-MNIST's 60,000 training images (override per run: MOCO_EPOCHS=...,
# SIMMIM_EPOCHS, MAE_EPOCHS, HYBRID_EPOCHS). Same architecture, batch and optimizer for every objective;
# extra arguments per run (MOCO_ARGS, SIMMIM_ARGS, MAE_ARGS, HYBRID_ARGS, split into words) override the
# recipe, e.g. MOCO_ARGS='--moco-t 0.1' (a resumed run must be given the same ones).
# Two lanes, one thread each (two one-thread processes train 1.3x faster than one two-thread process
# on a 2-core machine), both at the lowest CPU priority so the machine stays usable:
#   lane 1: moco, then hybrid        lane 2: simmim, then mae
# The encoder is kept after every epoch (OUT/NAME/snapshots/step-NNNNNNN/) for the learning curves.
# A killed run continues where it stopped: the script passes --resume when a run directory already
# holds a checkpoint.
# ONLY='moco hybrid mae' trains just those runs. LANES=each gives every run its own one-thread process
# instead of the two lanes: with three runs of different lengths on two cores the kernel shares the
# cores, and the last run ends sooner than when it waits in a lane behind another.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bundled}
VITSCOPE=${VITSCOPE:-.venv/bin/vitscope}
# shellcheck source=scripts/bundled_recipe.sh
source scripts/bundled_recipe.sh
COMMON=("${RECIPE[@]}" --keep-every $((60000 / BATCH)))
mkdir -p "$OUT"

ONLY=${ONLY:-moco hybrid simmim mae}
wanted() { [[ " $ONLY " == *" $1 "* ]]; }

train() {  # NAME EPOCHS ARGS...
  wanted "$1" || return 0
  local name=$1 epochs=$2; shift 2  # ARGS come last: they override the recipe (argparse keeps the last value)
  local resume=()
  [ -f "$OUT/$name/train_state.pt" ] && resume=(--resume)
  echo "$(date -u +%FT%TZ) start $name" >> "$OUT/train.log"
  printf '%s\tvitscope pretrain %s --out %s\n' "$name" "$(printf '%q ' "${COMMON[@]}" --epochs "$epochs" "$@")" \
    "$OUT/$name" >> "$OUT/commands.tsv"
  OMP_NUM_THREADS=1 nice -n 19 "$VITSCOPE" pretrain "${COMMON[@]}" --epochs "$epochs" "$@" --out "$OUT/$name" \
    "${resume[@]}" >> "$OUT/$name.stdout" 2>&1
  echo "$(date -u +%FT%TZ) done $name" >> "$OUT/train.log"
}

# shellcheck disable=SC2086  # the *_ARGS are split into words on purpose
# MoCo freezes its patch projection (MoCo v3's ViT recipe) and trains 2 epochs: over a longer schedule
# it gives back much of its late-layer collapse as the learning rate decays (docs/reproduction.md,
# "The CL recipe at depth 12"). The hybrid keeps a trained projection and 5 epochs.
moco() { train moco "${MOCO_EPOCHS:-2}" --method moco "${CL_SCHEDULE[@]}" --freeze-patch-embed ${MOCO_ARGS:-}; }
# shellcheck disable=SC2086
hybrid() {
  train hybrid "${HYBRID_EPOCHS:-5}" --method hybrid --mim simmim --cl-weight 0.2 "${CL_SCHEDULE[@]}" "${SIMMIM_HEAD[@]}" \
    ${HYBRID_ARGS:-}
}
# shellcheck disable=SC2086
simmim() { train simmim "${SIMMIM_EPOCHS:-12}" --method simmim "${SIMMIM_HEAD[@]}" ${SIMMIM_ARGS:-}; }
# shellcheck disable=SC2086
mae() { train mae "${MAE_EPOCHS:-12}" --method mae ${MAE_ARGS:-}; }
if [ "${LANES:-2}" = each ]; then
  for name in $ONLY; do "$name" & done
else
  (moco; hybrid) &
  (simmim; mae) &
fi
wait
[ "${PACKAGE:-1}" = 1 ] && .venv/bin/python scripts/package_bundled.py "$OUT"
