"""`make gpu-check DRY=1`'s bf16 training (the tiny synthetic task, width-4 network, 8 s), `--times` times,
each in a fresh work folder; prints whether each ended with a non-finite loss and its best Dice.

    python docs/benchmarks/bf16_cpu_nan/gpu_check_training.py WORK --times 10"""

import argparse
import json
import sys
from pathlib import Path

from hydra import initialize_config_dir

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "acceptance"))
from gpu_check import CONFIG_DIR, Check  # noqa: E402 - a script folder, not a package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--times", type=int, default=10)
    args = parser.parse_args()
    check = Check(argparse.Namespace(dry=True, report_dir=str(args.work), data_dir=""))
    records = []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for attempt in range(args.times):
            check.work = args.work / f"try{attempt}"
            (record,) = check.training(("bf16",))
            kept = {key: record.get(key) for key in ("error", "best_val_dice", "steps")}
            records.append({"try": attempt, **kept})
            print(json.dumps(records[-1]), flush=True)
    failed = [r for r in records if r["error"]]
    print(f"{len(failed)} of {len(records)} bf16 trainings failed: {[r['error'] for r in failed]}")


if __name__ == "__main__":
    main()
