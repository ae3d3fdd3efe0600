"""`make gpu-check`: the project's own acceptance run on a GPU, with its targets (the reference talk's
AMP speed-ups, the bare-loop ratios, the loader's rate). Not part of the installed package: it checks
the package from a checkout.

usage: python acceptance/gpu_check.py [--data-dir DIR] [--report-dir DIR] [--dry]

Parts, each recorded on its own (a failing part is written into the report and the rest go on):
1. the reference grid (128^3 b2 and b8 with the bare PyTorch loop side by side, 160^3 b8) in
   true fp32, TF32, fp16 AMP and bf16 AMP, then precision=auto's probe at each of its points: the
   probe's timings and choice against the grid's fastest;
2. the fast configuration (fp16 AMP, torch.compile, fused Adam, cuDNN benchmark) against plain
   AMP, with the bare loop plain and compiled;
3. each switch alone against the default fp16 step (cuDNN benchmark, deterministic kernels,
   compile, channels_last_3d, fused Adam);
4. the real training loader against synthetic input, CPU cache and GPU cache;
5. short real-data trainings (hippocampus) at 32, 16, bf16 and auto (with the precisions auto chose):
   time to each Dice threshold and the loader's wait;
6. the memory planner (`lightning_seg.study.memory`) at the reference points: predicted against measured
   `torch.cuda.max_memory_allocated` (dry: predictions only).

Runs in the Python environment it is started from: no install, no download. `--dry` runs every
part at tiny sizes (on a CPU in a few minutes, the synthetic task standing in for real data), so
the command stays working where there is no GPU. The report: REPORT_DIR/report.md with grid.json,
auto.json, switches.json, loader.json, training.json, plan.json, phases.png and memory.png beside it.
"""

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir

from lightning_seg.config import CONFIG_DIR
from lightning_seg.environment import environment_info
from lightning_seg.precision import PRECISIONS, label
from lightning_seg.run_dir import RunDir
from lightning_seg.study.bench.__main__ import attempt, prepared_datamodule, probe_against_grid, run_point
from lightning_seg.study.bench.step import measure
from lightning_seg.study.bench.tables import (
    loader_table,
    markdown_table,
    plot_memory,
    plot_phases,
    probe_table,
)

log = logging.getLogger("gpu_check")
ROOT = Path(__file__).resolve().parents[1]

# sizes: the full run fits in about 8 minutes of an H100/H200; dry runs the same parts on a CPU
FULL = {
    "grid_bare_points": [[128, 2], [128, 8]],
    "grid_points": [[160, 8]],
    "switch_point": [128, 2],
    "switch_precision": "16",
    "grid_steps": ["bench.warmup=2", "bench.steps=6"],
    "switch_steps": ["bench.warmup=3", "bench.steps=10"],
    "model": [],
    "loader_steps": ["bench.warmup=5", "bench.steps=40"],
    "loader_precisions": ["32", "16"],
    "train_time": "00:00:00:40",
    # the planner's reference points (docs/benchmarks/gpu_anchors.md): model, patch edge, batch, precision
    "plan_points": [
        ("basic_unet", 128, 2, "32"),
        ("basic_unet", 128, 2, "16"),
        ("basic_unet", 128, 8, "32"),
        ("basic_unet", 128, 8, "16"),
        ("basic_unet", 160, 8, "32"),
        ("dynunet", 128, 2, "32"),
        ("dynunet", 128, 2, "16"),
        ("monai_unet", 128, 2, "32"),
        ("monai_unet", 128, 2, "16"),
    ],
}
DRY = {
    "grid_bare_points": [[32, 1]],
    "grid_points": [[32, 2]],
    "switch_point": [32, 1],
    # fp32: compiled bf16 autocast on a CPU gave intermittent NaN losses, in a bare PyTorch loop too
    "switch_precision": "32",
    "grid_steps": ["bench.warmup=1", "bench.steps=2"],
    "switch_steps": ["bench.warmup=1", "bench.steps=2"],
    # Inductor's C++ build of a U-Net takes minutes on 2 cores: dry checks the graph capture only
    "model": ["model.width=4", "speed.compile_backend=aot_eager"],
    "loader_steps": ["bench.warmup=1", "bench.steps=3", "bench.worker_seconds=0.5"],
    "loader_precisions": ["32"],  # a CPU's loader rate does not depend on the step's precision
    "train_time": "00:00:00:08",
    "plan_points": [("basic_unet", 32, 1, "32"), ("basic_unet", 32, 1, "16")],
}
# each switch alone, against the default step (cuDNN benchmark on, fused Adam on, eager)
SWITCHES = {
    "default": [],
    "cuDNN benchmark off": ["trainer.benchmark=false"],
    "deterministic kernels": ["trainer.deterministic=warn"],
    "reproducible=true (both)": ["reproducible=true"],
    "fused Adam off": ["speed.fused_adam=false"],
    "channels_last_3d": ["speed.channels_last_3d=true"],
    "torch.compile": ["speed.compile=true"],
}
FAST = ["speed.compile=true", "speed.fused_adam=true"]
PLAIN_AMP = ["speed.fused_adam=false"]


def card_name() -> str:
    return torch.cuda.get_device_name().replace(" ", "") if torch.cuda.is_available() else "cpu"


class Check:
    """The parts of one gpu-check run and the state they share."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dry, self.sizes = args.dry, DRY if args.dry else FULL
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.report_dir = Path(args.report_dir)
        self.work = ROOT / "outputs" / "gpu_check" / "work" / time.strftime("%Y%m%d-%H%M%S")
        self.data_dir = Path(args.data_dir) if args.data_dir else None
        hippocampus = self.data_dir and (self.data_dir / "Task04_Hippocampus" / "dataset.json").is_file()
        self.real_data = bool(hippocampus) and not self.dry
        self.notes: list[str] = []
        if not self.real_data:
            why = "dry run" if self.dry else f"no Task04_Hippocampus under --data-dir {self.data_dir}"
            self.notes.append(f"{why}: the loader and training parts use the synthetic task")

    def paths(self, name: str) -> list[str]:
        run = self.work / name
        return [
            f"paths.data_dir={self.data_dir if self.real_data else self.work / 'data'}",
            f"paths.log_dir={run}",
            f"paths.cache_dir={self.work / 'cache'}",
            f"paths.output_dir={run}",
        ]

    def task(self) -> list[str]:
        if self.real_data:
            return ["task=hippocampus", "data.prep_workers=8"]
        tiny = ["task.synthetic.num_cases=8", "task.synthetic.shape=[32,32,24]", "task.patch_size=[32,32,32]"]
        return ["task=synthetic", *tiny, "model.width=4"]

    def grid(self) -> list[dict]:
        s = self.sizes
        base = [*self.paths("grid"), *s["model"], *s["grid_steps"]]
        points = [(e, b, True) for e, b in s["grid_bare_points"]]
        points += [(e, b, False) for e, b in s["grid_points"]]
        self.grid_records = [
            run_point(base, p, "basic_unet", edge, batch, self.device, bare, None)
            for edge, batch, bare in points
            for p in PRECISIONS
        ]
        return self.grid_records

    def auto(self) -> dict:
        """precision=auto's probe at each grid point: its timings and choice against the grid's fastest."""
        base = [*self.paths("auto"), *self.sizes["model"]]
        margin = compose(config_name="bench", overrides=base).auto_precision.margin
        return {"margin": margin, "points": probe_against_grid(base, self.grid_records, self.device, margin)}

    def switches(self) -> dict[str, dict]:
        s = self.sizes
        edge, batch = s["switch_point"]
        base = [*self.paths("switches"), *s["model"], *s["switch_steps"]]
        precision = s["switch_precision"]
        rows = {
            name: run_point([*base, *extra], precision, "basic_unet", edge, batch, self.device, False, None)
            for name, extra in SWITCHES.items()
        }
        # the bare loop's fp16 AMP, plain and compiled, beside the project's plain AMP and fast path
        rows["plain AMP (fused Adam off)"] = run_point(
            [*base, *PLAIN_AMP], precision, "basic_unet", edge, batch, self.device, True, None
        )
        # dry: the bare loop's compile would be an Inductor build (minutes on a CPU)
        rows["fast: compile + fused Adam + cuDNN benchmark"] = run_point(
            [*base, *FAST],
            "16",
            "basic_unet",
            edge,
            batch,
            self.device,
            not self.dry,
            None,
        )
        return rows

    def loader(self) -> list[dict]:
        base = [*self.paths("loader"), *self.task(), *self.sizes["loader_steps"], "bench.loader=true"]
        records = []
        for cache in ("disk", "memory", "gpu"):  # patches read from the store, held in memory, on the GPU
            overrides = [*base, f"data.cache={cache}"]
            cfg = compose(config_name="bench", overrides=overrides, return_hydra_config=True)
            datamodule = prepared_datamodule(cfg)
            model = cfg.hydra.runtime.choices.model  # the task's own network
            for precision in self.sizes["loader_precisions"]:
                record = run_point(
                    overrides, precision, model, None, cfg.data.batch_size, self.device, None, datamodule
                )
                records.append({**record, "cache": cache})
        return records

    def plan(self) -> list[dict]:
        """Predicted peak of each reference point next to the measured one: the same config, predicted
        by the memory planner and run by the benchmark's real Trainer step (a GPU only)."""
        from lightning_seg.study.memory import train_step_memory

        records = []
        for model, edge, batch, precision in self.sizes["plan_points"]:
            overrides = [
                *self.paths("plan"),
                "task=spleen",
                f"model={model}",
                f"precision={precision}",
                f"task.patch_size=[{edge},{edge},{edge}]",
                f"data.batch_size={batch}",
                "bench.warmup=3",
                "bench.steps=3",
                *self.sizes["model"],
            ]
            cfg = compose(config_name="bench", overrides=overrides)
            record = {"model": model, "patch": edge, "batch": batch, "precision": precision}
            record["predicted_gib"] = train_step_memory(cfg).peak_gib
            if self.device.type == "cuda":
                measured = attempt("plan", lambda cfg=cfg, b=batch: measure(cfg, b, self.device), self.device)
                if "error" in measured:
                    record["error"] = measured["error"]
                else:  # from before the warm-up, as the reference peaks were measured
                    record["measured_gib"] = measured["peak_with_warmup_gib"]
                    record["measured_warm_gib"] = measured["peak_memory_gib"]
            records.append(record)
        return records

    def training(self, precisions: tuple[str, ...] = ("32", "16", "bf16", "auto")) -> list[dict]:
        from lightning_seg.training import train

        results = []
        for precision in precisions:
            name = f"train_{precision}"
            overrides = [
                *self.paths(name),
                *self.task(),
                f"precision={precision}",
                f"trainer.max_time={self.sizes['train_time']}",
                "trainer.enable_progress_bar=false",
            ]
            cfg = compose(config_name="train", overrides=overrides)
            outcome = attempt(name, lambda cfg=cfg: train(cfg)[0], self.device)
            results.append(_training_record(precision, self.work / name, outcome))
        return results


def _training_record(precision: str, run: Path, outcome: dict) -> dict:
    record = {"precision": precision, "run_dir": str(run)}
    env = RunDir(run).environment_json  # written before the first step: there for a run that then failed
    auto = json.loads(env.read_text()).get("precision_auto") if env.is_file() else None
    if auto:  # precision=auto: what the probe chose for training and for validation
        record["chosen"] = [auto["train"], auto["inference_precision"]]
    if "error" in outcome:
        return {**record, **outcome}
    metrics = pd.read_csv(RunDir(run).metrics_csv)
    val = metrics.dropna(subset=["val/dice"])
    last = val.iloc[-1] if len(val) else None  # a run can end before its first validation
    tta = json.loads(RunDir(run).time_to_accuracy_json.read_text())
    return {
        **record,
        "steps": int(metrics["step"].max()),
        "best_val_dice": float(val["val/dice"].max()) if len(val) else None,
        "time_to_dice_s": {t: r["train_s"] for t, r in tta["reached"].items()},
        "thresholds": tta["thresholds"],
        **{
            key: float(last[key])
            for key in ("time/train_s", "perf/data_wait_frac", "perf/samples_per_s", "memory/train_peak_gib")
            if last is not None and key in val
        },
    }


def goals(grid: list[dict], switches: dict, loader: list[dict]) -> list[str]:
    """The issue's GPU goals, each a ratio measured in this run."""

    def total(point: dict, side: str = "project") -> float | None:
        return point.get(side, {}).get("median_s", {}).get("total")

    lines = ["| goal | measured | target |", "| --- | --- | --- |"]
    for edge, batch, target in ((128, 2, 2.0), (128, 8, 2.7), (32, 1, None)):
        fp32 = next(
            (p for p in grid if (p["patch"], p["batch"], p["precision"]) == (edge, batch, "32")), None
        )
        amp = next((p for p in grid if (p["patch"], p["batch"], p["precision"]) == (edge, batch, "16")), None)
        if fp32 and amp and total(fp32) and total(amp):
            want = f">= {target}x" if target else "(dry run)"
            lines.append(
                f"| fp16 AMP over true fp32, {edge}^3 b{batch} | {total(fp32) / total(amp):.2f}x | {want} |"
            )
    fast = switches.get("fast: compile + fused Adam + cuDNN benchmark", {})
    plain = switches.get("plain AMP (fused Adam off)", {})
    for bare, name, target in (
        (plain, "plain fp16 AMP", "0.5 (aim)"),
        (fast, "fp16 AMP + compile", "<= 1.0"),
    ):
        if total(fast) and total(bare, "bare"):
            ratio = total(fast) / total(bare, "bare")
            lines.append(f"| fast step / bare-loop {name} | {ratio:.2f} | {target} |")
    for record in loader:
        if "loader_over_synthetic_rate" in record:
            lines.append(
                f"| loader / synthetic rate, {label(record['precision'])}, data.cache={record['cache']} "
                f"| {record['loader_over_synthetic_rate']:.2f} | >= 0.9 |"
            )
    return lines


def switch_table(switches: dict) -> list[str]:
    base = switches.get("default", {}).get("project", {}).get("median_s", {}).get("total")
    lines = [
        "| configuration | s/step | x vs default | forward | backward | optimizer | peak GiB "
        "| bare loop s/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, point in switches.items():
        ours = point.get("project", {})
        if "median_s" not in ours:
            lines.append(f"| {name} | {ours.get('error', 'not run')} | | | | | | |")
            continue
        m, bare = ours["median_s"], point.get("bare", {}).get("median_s", {}).get("total")
        fallback = ours["fast_path"].get("compile_fallback")
        lines.append(
            f"| {name}{f' (eager: {fallback})' if fallback else ''} | {m['total']:.4f} | "
            f"{base / m['total']:.2f} | {m['forward']:.4f} | {m['backward']:.4f} | {m['optimizer']:.4f} | "
            f"{ours['peak_memory_gib']:.2f} | {f'{bare:.4f}' if bare else '-'} |"
        )
    return lines


def training_table(runs: list[dict]) -> list[str]:
    thresholds = next((r["thresholds"] for r in runs if "thresholds" in r), [])
    head = " | ".join(f"time to {t:g} (s)" for t in thresholds)
    lines = [
        f"| precision | steps | best val Dice | {head} | data wait | samples/s | train peak GiB |",
        "| --- " * (6 + len(thresholds)) + "|",
    ]
    for r in runs:
        trained = (
            f" (trained {label(r['chosen'][0])}, validated {label(r['chosen'][1])})" if "chosen" in r else ""
        )
        name = f"{label(r['precision'])}{trained}"
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |" + " |" * (4 + len(thresholds)))
            continue
        times = " | ".join(
            f"{r['time_to_dice_s'][f'{t:g}']:.1f}" if f"{t:g}" in r["time_to_dice_s"] else "not reached"
            for t in thresholds
        )
        wait = r.get("perf/data_wait_frac")
        peak = r.get("memory/train_peak_gib")
        best = r["best_val_dice"]
        lines.append(
            f"| {name} | {r['steps']} | {'-' if best is None else f'{best:.3f}'} | "
            f"{times} | {f'{100 * wait:.1f}%' if wait is not None else '-'} | "
            f"{r.get('perf/samples_per_s', float('nan')):.1f} | {f'{peak:.2f}' if peak else '-'} |"
        )
    return lines


def plan_table(records: list[dict]) -> list[str]:
    lines = [
        "| network | patch, batch | precision | predicted GiB | measured GiB (from warm-up) | error "
        "| warm steps only GiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        measured, warm = r.get("measured_gib"), r.get("measured_warm_gib")
        predicted = r["predicted_gib"]
        error = f"{100 * (predicted / measured - 1):+.1f}%" if measured else r.get("error") or "no GPU"
        lines.append(
            f"| {r['model']} | {r['patch']}^3, {r['batch']} | {label(r['precision'])} | {predicted:.2f} "
            f"| {f'{measured:.2f}' if measured else '-'} | {error} | {f'{warm:.2f}' if warm else '-'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir", default="", help="folder holding Task04_Hippocampus (default: synthetic)"
    )
    parser.add_argument(
        "--report-dir", default="", help="default docs/benchmarks/gpu/<card>/ (dry: outputs/)"
    )
    parser.add_argument("--dry", action="store_true", help="tiny sizes: checks the command on a CPU")
    args = parser.parse_args()
    if not args.report_dir:
        args.report_dir = str(
            ROOT / ("outputs/gpu_check" if args.dry else f"docs/benchmarks/gpu/{card_name()}")
        )
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    if not torch.cuda.is_available() and not args.dry:
        raise SystemExit("no CUDA GPU here: run `make gpu-check DRY=1` to check the command on a CPU")
    started = time.perf_counter()
    check = Check(args)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        results = {}
        for part in ("grid", "auto", "switches", "loader", "training", "plan"):
            part_start = time.perf_counter()
            results[part] = attempt(part, getattr(check, part), check.device)
            log.info("part %s done in %.0f s", part, time.perf_counter() - part_start)
    write_report(check, results, time.perf_counter() - started)


def write_report(check: Check, results: dict, seconds: float) -> None:
    out = check.report_dir
    out.mkdir(parents=True, exist_ok=True)
    env = environment_info()
    for part, value in results.items():
        (out / f"{part}.json").write_text(
            json.dumps({"environment": env, part: value}, indent=2, default=str)
        )
    grid = results["grid"] if isinstance(results["grid"], list) else []
    steps = dict(item.removeprefix("bench.").split("=") for item in check.sizes["grid_steps"])
    grid_result = {"environment": env, "bench": steps, "points": grid}
    if grid:
        plot_phases(grid_result, out / "phases.png")
        plot_memory(grid_result, out / "memory.png")
    switches = results["switches"] if "error" not in results["switches"] else {}
    loader = results["loader"] if isinstance(results["loader"], list) else []
    training = results["training"] if isinstance(results["training"], list) else []
    device = env["gpu"] or f"CPU ({env['cpu_count']} cores)"
    lines = [
        f"# gpu-check on {device}{' (dry run: tiny sizes)' if check.dry else ''}",
        "",
        f"Command: `make gpu-check{' DRY=1' if check.dry else ''}`; {seconds / 60:.1f} minutes; "
        f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Lightning {env['lightning']}, "
        f"MONAI {env['monai']}.",
        *(f"- note: {n}" for n in check.notes),
        *(
            f"- part `{k}` failed: {v['error']}"
            for k, v in results.items()
            if isinstance(v, dict) and "error" in v
        ),
        "",
        "## Goals",
        "",
        *goals(grid, switches, loader),
        "",
        markdown_table(grid_result).replace("# Training-step", "## Reference grid: training-step", 1),
        *(
            probe_table({"precision_auto": results["auto"]})
            if "points" in results["auto"]
            else ["## precision=auto's probe against this grid", "", "not run", ""]
        ),
        f"## Each switch alone ({label(check.sizes['switch_precision'])})",
        "",
        *switch_table(switches),
        "",
        *(loader_table(loader) if loader else ["## Real loader against synthetic input", "", "not run"]),
        "",
        "Rows in order: data.cache=disk (patches read from the preprocessed store), data.cache=memory, "
        "data.cache=gpu (memory where there is no GPU).",
        "",
        "## Short real-data trainings",
        "",
        *training_table(training),
        "",
        "## Memory planner: predicted against measured peak (`python -m lightning_seg.study.memory`)",
        "",
        *plan_table(results["plan"] if isinstance(results["plan"], list) else []),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    shutil.rmtree(check.work / "data", ignore_errors=True)
    print((out / "report.md").read_text())
    print(f"written to {out}")


if __name__ == "__main__":
    main()
