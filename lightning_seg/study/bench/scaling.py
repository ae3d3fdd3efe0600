"""Training throughput of N processes against one: the same config trained both ways, alternately.

Each run is a real `lightning_seg.training` process; its rate is its last `perf/samples_per_s` (patches of
all processes per second of training time). Runs go A-B-B-A so a drift of the machine hits both sides.

usage: python -m lightning_seg.study.bench.scaling [--multi hardware=ddp_cpu] [--repeats 2] [OVERRIDE ...]"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from lightning_seg.environment import environment_info
from lightning_seg.run_dir import RunDir


def samples_per_s(overrides: list[str], run_dir: Path) -> float:
    command = [sys.executable, "-m", "lightning_seg.training", *overrides, f"hydra.run.dir={run_dir}"]
    subprocess.run(command, check=True, capture_output=True)
    return float(pd.read_csv(RunDir(run_dir).metrics_csv)["perf/samples_per_s"].dropna().iloc[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", default="hardware=cpu", help="override(s) of the one-process side")
    parser.add_argument("--multi", default="hardware=ddp_cpu", help="override(s) of the many-process side")
    parser.add_argument("--repeats", type=int, default=2, help="A-B-B-A blocks")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("overrides", nargs="*", help="training overrides shared by both sides")
    args = parser.parse_args(argv)

    sides = {"1 process": args.single.split(), "N processes": args.multi.split()}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate([*sides, *reversed(sides)] * args.repeats):
            rate = samples_per_s([*args.overrides, *sides[name]], Path(tmp) / str(i))
            rates[name].append(rate)
            print(f"{name}: {rate:.2f} samples/s", flush=True)
    single, multi = (statistics.median(rates[name]) for name in sides)
    env = environment_info()
    command = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"`python -m lightning_seg.study.bench.scaling {command}`",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}, GPU: {env['gpu']}",
        "",
        "| side | overrides | runs (samples/s) | median samples/s |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name} | `{' '.join(sides[name])}` | {', '.join(f'{r:.2f}' for r in rates[name])} "
            f"| {statistics.median(rates[name]):.2f} |"
            for name in sides
        ),
        "",
        f"N processes / 1 process: **{multi / single:.2f}x**",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
