#!/usr/bin/env bash
# MSD Task04 hippocampus three ways, one after the other, trainer.max_time each (default 10 min):
#   msd      the hand-written task=hippocampus on the MSD folder
#   nnunet   the same config on the same cases converted to nnU-Net v2 raw (same split: cases by name)
#   planned  lightning-seg-new-task ... gpu=cpu on the nnU-Net folder, trained with no other task argument
# usage: docs/results/own_data/hippocampus_side_by_side.sh TASK04_DIR OUT [DD:HH:MM:SS]
set -euo pipefail
SRC="$1"; OUT="$2"; BUDGET="${3:-00:00:10:00}"
RAW="$OUT/Dataset004_Hippocampus"
mkdir -p "$OUT"
[ -d "$RAW" ] || python docs/results/own_data/msd_to_nnunet.py "$SRC" "$RAW" --link
python -m lightning_seg.new_task "$RAW" name=hippocampus_planned gpu=cpu config_dir="$OUT/conf" | tee "$OUT/plan.txt"
export LIGHTNING_SEG_CONFIG_DIR="$OUT/conf"
common=(trainer.max_time="$BUDGET" paths.cache_dir="$OUT/cache" trainer.enable_progress_bar=false)
python train.py task=hippocampus paths.data_dir="$(dirname "$SRC")" task.msd_folder="$(basename "$SRC")" \
  "${common[@]}" hydra.run.dir="$OUT/msd" > "$OUT/msd.out" 2>&1
python train.py task=hippocampus task.msd_folder="$RAW" "${common[@]}" hydra.run.dir="$OUT/nnunet" > "$OUT/nnunet.out" 2>&1
python train.py task=hippocampus_planned "${common[@]}" hydra.run.dir="$OUT/planned" > "$OUT/planned.out" 2>&1
for run in msd nnunet planned; do
  echo "$run: $(cat "$OUT/$run/final_metrics.json")"
  echo "  $(cat "$OUT/$run/time_to_accuracy.json")"
done
