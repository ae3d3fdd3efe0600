"""Issue 29's acceptance runs: `python train.py precision=P trainer.max_epochs=2 seed=S` for each seed and
precision, `--repeats` times each, one after the other; prints one row per run (exit status, whether the
loss or the weights went non-finite, best val/dice).

    python docs/benchmarks/bf16_cpu_nan/seeds.py WORK --seeds 0-19 --repeats 2 --precisions bf16 32
    python docs/benchmarks/bf16_cpu_nan/seeds.py WORK --precisions bf16 --repeats 1 --checkout OLD_TREE

Set ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 in the environment to take the kernels of an AMX-less CPU
(AMD Zen 4/5, Intel before Sapphire Rapids), where the divergence was seen."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[3]


def seeds(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def run(checkout: Path, work: Path, precision: str, seed: int, repeat: int, extra: list[str]) -> dict:
    run_dir = work / f"p{precision}_s{seed}_r{repeat}"
    command = [sys.executable, str(checkout / "train.py"), f"precision={precision}", "trainer.max_epochs=2"]
    command += [f"seed={seed}", f"hydra.run.dir={run_dir}", *extra]
    command += [f"paths.cache_dir={work / 'cache'}", f"paths.data_dir={work / 'data'}"]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, cwd=checkout)
    metrics = run_dir / "csv" / "metrics.csv"
    val = pd.read_csv(metrics).dropna(subset=["val/dice"]) if metrics.is_file() else pd.DataFrame()
    output = done.stdout + done.stderr
    return {
        "precision": precision,
        "seed": seed,
        "repeat": repeat,
        "exit": done.returncode,
        "diverged": "non-finite" in output or "diverged" in output,  # the AMP guard's two messages
        "best_dice": round(float(val["val/dice"].max()), 4) if len(val) else None,
        "seconds": round(time.monotonic() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--seeds", type=seeds, default=seeds("0-19"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "32"])
    parser.add_argument("--checkout", type=Path, default=ROOT, help="another commit's tree (before the fix)")
    parser.add_argument("extra", nargs="*", help="more overrides for every run")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(args.work / "runs.jsonl", "a") as log:
        for repeat in range(1, args.repeats + 1):
            for seed in args.seeds:
                for precision in args.precisions:
                    if precision != "bf16" and repeat > 1:
                        continue  # the fp32 spread: one run per seed
                    rows.append(run(args.checkout, args.work, precision, seed, repeat, args.extra))
                    print(json.dumps(rows[-1]), file=log, flush=True)
                    print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    failed = int((table["exit"] != 0).sum())
    print(f"diverged: {int(table['diverged'].sum())} of {len(table)} runs; failed: {failed}")


if __name__ == "__main__":
    main()
