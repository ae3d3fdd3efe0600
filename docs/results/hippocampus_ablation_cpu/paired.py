"""Paired comparison of two evaluations on the same cases: mean per-case difference of the foreground
mean Dice, its standard error and how many cases the first one scores higher. Usage:
    python docs/results/hippocampus_ablation_cpu/paired.py A/per_case.csv B/per_case.csv
(`per_case.csv` as `lightning_seg.evaluate` writes it)."""

import csv
import math
import sys


def foreground_dice(path: str) -> dict[str, float]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in rows[0] if c.startswith("dice_")]
    return {r["case"]: sum(float(r[c]) for c in columns) / len(columns) for r in rows}


a, b = foreground_dice(sys.argv[1]), foreground_dice(sys.argv[2])
if a.keys() != b.keys():
    sys.exit("the two evaluations scored different cases")
diff = [a[case] - b[case] for case in a]
mean = sum(diff) / len(diff)
se = math.sqrt(sum((d - mean) ** 2 for d in diff) / (len(diff) - 1) / len(diff))
better = sum(d > 0 for d in diff)
print(f"{len(diff)} cases: mean difference {mean:+.4f} (s.e. {se:.4f}), first better on {better}")
