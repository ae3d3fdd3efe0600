#!/usr/bin/env bash
# Issue 10's fold ensemble on hippocampus: the data.test_fraction=0.2 cases held out (the same 42 as
# run.sh), the rest cut into 5 folds, one run per fold with a share of the budget, one after the other;
# each fold's best checkpoint scored alone on the held-out cases, then all of them as one ensemble
# (probabilities averaged, mirroring on top). Usage (from the repository root):
#   bash docs/results/hippocampus_ablation_cpu/ensemble.sh OUT_DIR [BUDGET_PER_FOLD [FOLDS [OVERRIDE...]]]
# e.g. five 11-minute folds: ensemble.sh OUT_DIR 00:00:11:00 5; OVERRIDEs go to every fold's training
# (e.g. recipe=nnunet, callbacks.weight_average=null)
set -euo pipefail
out=${1:?output dir}
budget=${2:-00:00:11:00}
folds=${3:-5}
shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$out"
data=${DATA_DIR:?set DATA_DIR to the folder holding Task04_Hippocampus}
task_dir="$data/Task04_Hippocampus"
best=()
for ((k = 0; k < folds; k++)); do
  run="$out/fold$k"
  if [ ! -f "$run/eval_test/summary.json" ]; then
    python train.py task=hippocampus "paths.data_dir=$data" data.test_fraction=0.2 "data.num_folds=$folds" \
      "data.fold=$k" "trainer.max_time=$budget" trainer.enable_progress_bar=false "hydra.run.dir=$run" "$@" \
      > "$out/fold$k.log" 2>&1
    python -m lightning_seg.evaluate "ckpt_path=$(ls "$run"/checkpoints/best-*.ckpt | head -1)" \
      "task_dir=$task_dir" split=test predict.mirror=true "output=$run/eval_test" >> "$out/fold$k.log" 2>&1
  fi
  best+=("$(ls "$run"/checkpoints/best-*.ckpt | head -1)")
done
ckpts=$(IFS=,; echo "${best[*]}")
python -m lightning_seg.evaluate "ckpt_path=[$ckpts]" "task_dir=$task_dir" split=test predict.mirror=true \
  "output=$out/ensemble" > "$out/ensemble.log" 2>&1
python docs/results/hippocampus_ablation_cpu/table.py "$out"
python - "$out/ensemble/summary.json" <<'PY'
import json, sys
summary = json.loads(open(sys.argv[1]).read())
labels = summary["labels"]
print(f"ensemble held-out Dice (mirror): {summary['foreground_mean_dice']:.4f} "
      f"(anterior {labels['anterior']['dice']['mean']:.4f}, posterior {labels['posterior']['dice']['mean']:.4f})")
PY
