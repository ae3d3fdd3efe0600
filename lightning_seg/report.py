"""Time-to-accuracy report for a sweep: PNG plots, a Markdown table and a CSV.

usage: python -m lightning_seg.report SWEEP_DIR [--out DIR]

Reads every run below SWEEP_DIR (a run is a folder with csv/metrics.csv and .hydra/config.yaml).
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

PRECISION_ORDER = ["32", "tf32", "16", "bf16"]
PRECISION_LABEL = {"32": "fp32", "tf32": "TF32", "16": "fp16 AMP", "bf16": "bf16 AMP"}
COLOURS = {"32": "tab:blue", "tf32": "tab:purple", "16": "tab:orange", "bf16": "tab:green"}


@dataclass
class Run:
    path: Path
    precision: str
    seed: int
    task: str
    thresholds: list[float]
    curve: pd.DataFrame  # validations: time/train_s, val/dice (and what else was logged)
    device: str

    @property
    def label(self) -> str:
        return PRECISION_LABEL.get(self.precision, self.precision)

    def time_to(self, threshold: float) -> float:
        """First training time at which val/dice >= threshold (NaN if never)."""
        hit = self.curve[self.curve["val/dice"] >= threshold]
        return float(hit["time/train_s"].iloc[0]) if len(hit) else float("nan")


def load_runs(sweep_dir: Path) -> list[Run]:
    runs = []
    for metrics in sorted(sweep_dir.glob("**/csv/metrics.csv")):
        run_dir = metrics.parent.parent
        config_file = run_dir / ".hydra" / "config.yaml"
        if not config_file.is_file():
            continue
        cfg = OmegaConf.load(config_file)
        log = pd.read_csv(metrics)
        if "val/dice" not in log:
            continue
        curve = log.dropna(subset=["val/dice"]).reset_index(drop=True)
        env_file = run_dir / "environment.json"
        env = json.loads(env_file.read_text()) if env_file.is_file() else {}
        runs.append(
            Run(
                run_dir,
                str(cfg.precision),
                int(cfg.seed),
                str(cfg.task.name),
                [float(t) for t in cfg.task.dice_thresholds],
                curve,
                env.get("gpu") or f"CPU ({env.get('cpu_count', '?')} cores)",
            )
        )
    if not runs:
        raise SystemExit(f"no runs with csv/metrics.csv and .hydra/config.yaml below {sweep_dir}")
    return sorted(runs, key=lambda r: (_precision_rank(r.precision), r.seed))


def _precision_rank(precision: str) -> int:
    return PRECISION_ORDER.index(precision) if precision in PRECISION_ORDER else len(PRECISION_ORDER)


# the GPU's training-step peak (validation apart); on a CPU only the process peak exists
MEMORY_COLUMNS = {
    "memory/train_peak_gib": "training peak GPU memory (GiB)",
    "memory/peak_gib": "process peak RSS, CPU (GiB)",
}


def summary_table(runs: list[Run]) -> pd.DataFrame:
    """One row per precision: mean time to each threshold over seeds, speed-up vs fp32, best Dice."""
    thresholds = runs[0].thresholds
    rows = []
    for precision in dict.fromkeys(r.precision for r in runs):
        group = [r for r in runs if r.precision == precision]
        row = {
            "precision": PRECISION_LABEL.get(precision, precision),
            "runs": len(group),
            "seeds": ",".join(str(r.seed) for r in group),
        }
        for t in thresholds:
            times = np.array([r.time_to(t) for r in group])
            reached = ~np.isnan(times)
            row[f"time to {t:g} (s)"] = float(times[reached].mean()) if reached.all() else float("nan")
            row[f"reached {t:g}"] = f"{int(reached.sum())}/{len(group)}"
        row["best val/dice"] = float(np.mean([r.curve["val/dice"].max() for r in group]))
        for column, name in MEMORY_COLUMNS.items():
            if all(column in r.curve for r in group):
                row[name] = float(np.mean([r.curve[column].max() for r in group]))
                break
        rows.append(row)
    table = pd.DataFrame(rows)
    base = table[table["precision"] == PRECISION_LABEL["32"]]
    for t in thresholds:
        column = f"time to {t:g} (s)"
        table[f"speed-up vs fp32 at {t:g}"] = (
            float(base[column].iloc[0]) / table[column] if len(base) else np.nan
        )
    return table


def plot_curves(runs: list[Run], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = ["-", "--", ":", "-."]
    for run in runs:
        ax.plot(
            run.curve["time/train_s"],
            run.curve["val/dice"],
            styles[run.seed % len(styles)],
            marker=".",
            color=COLOURS.get(run.precision, "black"),
            label=f"{run.label}, seed {run.seed}",
        )
    _decorate(ax, runs, "Validation Dice vs training time, one curve per run")
    path = out / "dice_vs_time.png"
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_mean_range(runs: list[Run], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for precision in dict.fromkeys(r.precision for r in runs):
        group = [r for r in runs if r.precision == precision]
        # the span every seed covers, so the mean never jumps where a seed starts or ends
        start = max(r.curve["time/train_s"].min() for r in group)
        end = min(r.curve["time/train_s"].max() for r in group)
        grid = np.linspace(start, end, 200)
        # Dice so far (best up to t) makes seeds with different validation times comparable
        values = np.stack(
            [np.interp(grid, r.curve["time/train_s"], r.curve["val/dice"].cummax()) for r in group]
        )
        colour = COLOURS.get(precision, "black")
        ax.plot(grid, values.mean(0), color=colour, label=f"{group[0].label}: mean of {len(group)}")
        ax.fill_between(grid, values.min(0), values.max(0), color=colour, alpha=0.2)
    _decorate(ax, runs, "Best validation Dice so far: mean and range over seeds")
    path = out / "dice_vs_time_mean.png"
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _decorate(ax, runs: list[Run], title: str) -> None:
    for t in runs[0].thresholds:
        ax.axhline(t, color="grey", lw=0.8, ls=":")
        ax.text(
            0.01, t, f"Dice {t:g}", transform=ax.get_yaxis_transform(), va="bottom", fontsize=8, color="grey"
        )
    ax.set_xlabel("training time, validation excluded (s)")
    ax.set_ylabel("validation foreground mean Dice")
    ax.set_title(f"{runs[0].task} on {runs[0].device}: {title}", fontsize=10)
    low = min(min(r.curve["val/dice"].min() for r in runs), min(runs[0].thresholds))
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def write_report(sweep_dir: Path, out: Path | None = None) -> dict[str, Path]:
    runs = load_runs(sweep_dir)
    out = out or sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(runs)
    csv_path, md_path = out / "time_to_accuracy.csv", out / "time_to_accuracy.md"
    table.to_csv(csv_path, index=False)
    header = (
        f"# Time to accuracy: {runs[0].task} on {runs[0].device}\n\n"
        f"{len(runs)} runs from `{sweep_dir}`. Times are training seconds with validation excluded "
        f"(`time/train_s`), averaged over seeds; a threshold not reached by every seed shows as nan.\n\n"
    )
    md_path.write_text(header + table.to_markdown(index=False, floatfmt=".3g") + "\n")
    return {
        "csv": csv_path,
        "markdown": md_path,
        "curves": plot_curves(runs, out),
        "mean_range": plot_mean_range(runs, out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: SWEEP_DIR/report")
    args = parser.parse_args()
    for kind, path in write_report(args.sweep_dir, args.out).items():
        print(f"{kind:10s} {path}")


if __name__ == "__main__":
    main()
