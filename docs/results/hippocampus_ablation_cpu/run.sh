#!/usr/bin/env bash
# Issue 10's ablation on hippocampus, one change at a time and all together, a 10-minute budget each,
# one run after the other on an otherwise idle machine. Held-out check: data.test_fraction=0.2 (the
# test split of split.json), best checkpoint, mirroring. Usage (from the repository root):
#   bash docs/results/hippocampus_ablation_cpu/run.sh OUT_DIR [BUDGET [VARIANT...]]
# e.g. the 60-minute pair: run.sh OUT_DIR 00:01:00:00 reference_talk nnunet_all
set -euo pipefail
out=${1:?output dir}
budget=${2:-00:00:10:00}
shift $(( $# > 1 ? 2 : 1 ))
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(reference_talk poly_schedule augmentation dice_ce clip_12 nnunet_all)
mkdir -p "$out"
data=${DATA_DIR:?set DATA_DIR to the folder holding Task04_Hippocampus}
common=(task=hippocampus "paths.data_dir=$data" data.test_fraction=0.2 "trainer.max_time=$budget"
        trainer.enable_progress_bar=false)
declare -A variants=(
  [reference_talk]=""
  [poly_schedule]="optimizer.schedule=poly"
  [augmentation]="recipe=nnunet loss=dice optimizer.schedule=constant trainer.gradient_clip_val=null"
  [dice_ce]="loss=dice_ce"
  [clip_12]="trainer.gradient_clip_val=12"
  [nnunet_all]="recipe=nnunet"
  [dice_fg_batch]="loss.include_background=false +loss.batch=true"
  [mirror_si]="data.flip_axes=[0,2]"
)
for name in "${names[@]}"; do
  run="$out/$name"
  [ -f "$run/eval_test/summary.json" ] && continue
  # shellcheck disable=SC2086
  python train.py "${common[@]}" ${variants[$name]} "hydra.run.dir=$run" > "$out/$name.log" 2>&1
  best=$(ls "$run"/checkpoints/best-*.ckpt | head -1)
  python -m lightning_seg.evaluate "ckpt_path=$best" "task_dir=$data/Task04_Hippocampus" split=test \
    predict.mirror=true "output=$run/eval_test" >> "$out/$name.log" 2>&1
done
python docs/results/hippocampus_ablation_cpu/table.py "$out"
