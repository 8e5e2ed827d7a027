#!/usr/bin/env bash
# Short recipe sweeps for the bundled models: the bundled architecture and data, a few epochs per
# variant, one variant after another on one thread at the lowest priority, then the late-layer
# metrics of every variant's per-epoch snapshots (scripts/track_snapshots.py -> OUT/curves.csv).
#   scripts/sweep_bundled.sh OUT METHOD EPOCHS NAME='EXTRA ARGS' [NAME='EXTRA ARGS' ...]
# e.g.
#   scripts/sweep_bundled.sh runs/sweep-moco moco 2 base='' tau01='--moco-t 0.1' crop008='--crop-min-scale 0.08'
# Every variant starts from the bundled recipe (scripts/bundled_recipe.sh) and adds its own
# arguments, which override the recipe's (argparse keeps the last value). A killed sweep continues
# where it stopped: finished variants are skipped, a started one resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1 METHOD=$2 EPOCHS=$3
shift 3
VITSCOPE=${VITSCOPE:-.venv/bin/vitscope}
PYTHON=${PYTHON:-.venv/bin/python}
# shellcheck source=scripts/bundled_recipe.sh
source scripts/bundled_recipe.sh
mkdir -p "$OUT"
names=()
for variant in "$@"; do
  name=${variant%%=*} extra=${variant#*=}
  names+=("$name")
  [ -f "$OUT/$name/done" ] && continue
  resume=()
  [ -f "$OUT/$name/train_state.pt" ] && resume=(--resume)
  # shellcheck disable=SC2086  # EXTRA ARGS are split into words on purpose
  args=(--method "$METHOD" --epochs "$EPOCHS" "${RECIPE[@]}" $extra)
  # one snapshot per epoch, whatever the variant's batch size
  batch=$(printf '%s\n' "${args[@]}" | awk 'prev == "--batch-size" { b = $0 } { prev = $0 } END { print b }')
  printf '%s\tvitscope pretrain %s--out %s\n' "$name" "$(printf '%q ' "${args[@]}")" "$OUT/$name" >> "$OUT/commands.tsv"
  echo "$(date -u +%FT%TZ) start $name" >> "$OUT/sweep.log"
  OMP_NUM_THREADS=1 nice -n 19 "$VITSCOPE" pretrain "${args[@]}" --keep-every $((60000 / batch)) \
    --out "$OUT/$name" "${resume[@]}" >> "$OUT/$name.stdout" 2>&1
  touch "$OUT/$name/done"
  echo "$(date -u +%FT%TZ) done $name" >> "$OUT/sweep.log"
done
nice -n 19 "$PYTHON" scripts/track_snapshots.py "$OUT" --names "${names[@]}" --plot "$OUT/curves.png"
