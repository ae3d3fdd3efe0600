"""The ablation table from the run dirs run.sh wrote: python table.py OUT_DIR."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
print("| variant | best val Dice | held-out Dice (mirror) | anterior | posterior | train s to 0.85 | steps |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for run in sorted(p for p in out.iterdir() if (p / "eval_test" / "summary.json").is_file()):
    final = json.loads((run / "final_metrics.json").read_text())
    summary = json.loads((run / "eval_test" / "summary.json").read_text())
    reached = json.loads((run / "time_to_accuracy.json").read_text())["reached"]
    to_085 = reached.get("0.85", {}).get("train_s")
    labels = summary["labels"]
    steps = json.loads((run / "checkpoints" / "model_card.json").read_text())["validation"]["global_step"]
    print(
        f"| {run.name} | {final['best/val_dice']:.4f} | {summary['foreground_mean_dice']:.4f} "
        f"| {labels['anterior']['dice']['mean']:.4f} | {labels['posterior']['dice']['mean']:.4f} "
        f"| {f'{to_085:.0f}' if to_085 is not None else 'not reached'} | {steps} |"
    )
