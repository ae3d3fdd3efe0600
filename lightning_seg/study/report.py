"""Time-to-accuracy report for a sweep: PNG plots, Markdown tables and CSVs.

usage: python -m lightning_seg.study.report SWEEP_DIR [--out DIR] [--no-wandb]

Reads every run below SWEEP_DIR (a run is a folder with csv/metrics.csv, .hydra/config.yaml and
time_to_accuracy.json). Threshold times, best Dice and a divergence come from each run's
time_to_accuracy.json, written by the callback that saw them; metrics.csv only gives the curves. A run that
diverged counts as such per precision, never as a Dice: best Dice and the equal-accuracy verdict are over
the runs that finished. Where the runs
logged to W&B, the report's numbers also go into the summary of one W&B run in the sweep's group.
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from lightning_seg.precision import AUTO, PRECISIONS, label
from lightning_seg.run_dir import RunDir

COLOURS = {"32": "tab:blue", "tf32": "tab:purple", "16": "tab:orange", "bf16": "tab:green", AUTO: "tab:red"}
# the GPU's training-step peak (validation apart); on a CPU only the process peak exists
MEMORY_COLUMNS = {
    "memory/train_peak_gib": "training peak GPU memory (GiB)",
    "memory/peak_gib": "process peak RSS, CPU (GiB)",
}


@dataclass
class Run:
    path: Path
    precision: str
    seed: int
    task: str
    curve: pd.DataFrame  # validations: time/train_s, val/dice (and what else was logged)
    device: str
    time_to_accuracy: dict  # the run's time_to_accuracy.json
    wandb: dict | None  # the resolved logger.wandb config where the run logged to W&B
    chosen: str | None = None  # precision=auto: what the probe chose to train in

    @property
    def label(self) -> str:
        return label(self.precision) + (f" ({label(self.chosen)})" if self.chosen else "")

    @property
    def thresholds(self) -> list[float]:
        return [float(t) for t in self.time_to_accuracy["thresholds"]]

    @property
    def best_dice(self) -> float:
        """The best validation Dice (NaN where the run diverged before its first validation)."""
        best = float(self.time_to_accuracy["best"])
        return best if np.isfinite(best) else np.nan

    @property
    def diverged(self) -> dict | None:
        """Where its loss or weights turned non-finite (step, epoch, error), None for a run that finished."""
        return self.time_to_accuracy.get("diverged")

    def crossing(self, threshold: float) -> dict | None:
        """The callback's record of the first validation at or above `threshold` (None if never)."""
        return self.time_to_accuracy["reached"].get(f"{threshold:g}")

    @property
    def validation_share(self) -> float:
        """Share of the wall time spent outside training, at the last validation."""
        if self.curve.empty:
            return np.nan
        last = self.curve.iloc[-1]
        wall = float(last.get("time/wall_s", float("nan")))
        return 1.0 - float(last["time/train_s"]) / wall if wall > 0 else float("nan")


def load_runs(sweep_dir: Path) -> list[Run]:
    runs = []
    for metrics in sorted(sweep_dir.glob("**/csv/metrics.csv")):
        run = RunDir(metrics.parent.parent)
        if not run.config_yaml.is_file():
            continue
        log = pd.read_csv(metrics)
        tta = run.time_to_accuracy_json
        record = json.loads(tta.read_text()) if tta.is_file() else {}
        if "val/dice" not in log and not record.get("diverged"):  # never validated, nor diverged
            continue
        if not record:
            print(
                f"skipping {run.path}: no time_to_accuracy.json (callbacks.time_to_accuracy off?)",
                file=sys.stderr,
            )
            continue
        cfg = OmegaConf.load(run.config_yaml)
        env = json.loads(run.environment_json.read_text()) if run.environment_json.is_file() else {}
        # logger.wandb as the run resolved it: .hydra/config.yaml keeps interpolations only Hydra resolves
        hparams = run.hparams_yaml.read_text() if run.hparams_yaml.is_file() else ""
        resolved = yaml.load(hparams, Loader=_HparamsLoader) or {}
        runs.append(
            Run(
                run.path,
                str(cfg.precision),
                int(cfg.seed),
                str(cfg.task.name),
                log.dropna(subset=["val/dice"]).reset_index(drop=True) if "val/dice" in log else log.iloc[:0],
                env.get("gpu") or f"CPU ({env.get('cpu_count', '?')} cores)",
                record,
                (resolved.get("logger") or {}).get("wandb"),
                env.get("precision_auto", {}).get("train"),
            )
        )
    if not runs:
        raise SystemExit(
            f"no runs with csv/metrics.csv, .hydra/config.yaml and time_to_accuracy.json below {sweep_dir}"
        )
    rank = {p: i for i, p in enumerate([*PRECISIONS, AUTO])}
    return sorted(runs, key=lambda r: (rank.get(r.precision, len(rank)), r.seed))


class _HparamsLoader(yaml.SafeLoader):
    """Reads csv/hparams.yaml, where Lightning writes some values (torch's version) as Python objects."""


_HparamsLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def memory_column(runs: list[Run]) -> tuple[str, str] | None:
    """The first of MEMORY_COLUMNS that every run logged, with its table name."""
    return next(((c, name) for c, name in MEMORY_COLUMNS.items() if all(c in r.curve for r in runs)), None)


def _spread(values) -> float:
    """Sample standard deviation over seeds; 0 for a single seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _mean(values) -> float:
    """NaN for no values (every run diverged), without numpy's empty-slice warning."""
    return float(np.mean(values)) if len(values) else np.nan


def _groups(runs: list[Run]) -> dict[str, list[Run]]:
    return {p: [r for r in runs if r.precision == p] for p in dict.fromkeys(r.precision for r in runs)}


def finished(runs: list[Run]) -> list[Run]:
    """The runs that did not diverge: the only ones with a final Dice."""
    return [r for r in runs if not r.diverged]


def diverged_count(group: list[Run]) -> str:
    """`1 of 2`: how many runs of a precision diverged."""
    return f"{len(group) - len(finished(group))} of {len(group)}"


def validated(runs: list[Run]) -> list[Run]:
    """The runs with a validation curve (a run may diverge before its first validation)."""
    return [r for r in runs if not r.curve.empty]


def summary_table(runs: list[Run]) -> pd.DataFrame:
    """One row per precision: how many runs diverged, time to each threshold (mean and spread over the seeds
    that reached it, and how many did), speed-up vs fp32 of the means, best Dice of the finished runs (mean
    and spread), peak memory."""
    thresholds = runs[0].thresholds
    rows = []
    for precision, group in _groups(runs).items():
        row = {"precision": label(precision), "runs": len(group), "diverged": diverged_count(group)}
        row["seeds"] = ",".join(str(r.seed) for r in group)
        for t in thresholds:
            reached = [c for c in (r.crossing(t) for r in group) if c]
            times = [c["train_s"] for c in reached]
            row[f"time to {t:g} (s)"] = float(np.mean(times)) if times else np.nan
            row[f"spread {t:g} (s)"] = _spread(times) if times else np.nan
            row[f"reached {t:g}"] = f"{len(times)}/{len(group)}"
            # validation included: a run whose validation dominates cannot look fast
            row[f"wall to {t:g} (s)"] = float(np.mean([c["wall_s"] for c in reached])) if reached else np.nan
        row["validation share of wall time"] = _mean([r.validation_share for r in validated(group)])
        row["best val/dice"] = _mean([r.best_dice for r in finished(group)])
        row["best val/dice spread"] = _spread([r.best_dice for r in finished(group)])
        if memory := memory_column(validated(group)):
            column, name = memory
            row[name] = _mean([r.curve[column].max() for r in validated(group)])
        rows.append(row)
    table = pd.DataFrame(rows)
    base = table[table["precision"] == label("32")]
    for t in thresholds:
        fp32_s = float(base[f"time to {t:g} (s)"].iloc[0]) if len(base) else np.nan
        table[f"speed-up vs fp32 at {t:g}"] = fp32_s / table[f"time to {t:g} (s)"]
    return table


def runs_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run: training seconds to each threshold, or `not reached`, and the best Dice."""
    text = "{train_s:.1f} s (step {step}, wall {wall_s:.1f} s)"  # validation: out of train_s, in wall_s
    rows = []
    for run in runs:
        row = {"run": run.path.name, "precision": run.label, "seed": run.seed}
        for t in run.thresholds:
            row[f"{t:g}"] = text.format(**record) if (record := run.crossing(t)) else "not reached"
        row["best val/dice"] = run.best_dice
        row["diverged"] = f"at step {run.diverged['step']}" if run.diverged else ""
        rows.append(row)
    return pd.DataFrame(rows)


def equal_accuracy(runs: list[Run]) -> tuple[pd.DataFrame, str]:
    """The reference talk's claim, checked: best validation Dice per precision (mean and spread over the
    seeds that finished) and whether it differs from fp32's (else the first precision's) by more than the
    larger spread. A precision with a diverged run is not equal, whatever its other runs reached."""
    groups = _groups(runs)
    reference = "32" if "32" in groups else next(iter(groups))
    ref_values = [r.best_dice for r in finished(groups[reference])]
    rows = []
    for precision, group in groups.items():
        values = [r.best_dice for r in finished(group)]
        delta = _mean(values) - _mean(ref_values)
        if len(values) < len(group):
            verdict = f"diverged {diverged_count(group)}"
        elif precision == reference:
            verdict = "reference"
        elif min(len(values), len(ref_values)) < 2:
            verdict = "one seed: no spread to compare with"
        else:
            verdict = "yes" if abs(delta) > max(_spread(values), _spread(ref_values)) else "no"
        rows.append(
            {
                "precision": label(precision),
                "seeds": len(values),
                "diverged": diverged_count(group),
                "best val/dice mean": _mean(values),
                "best val/dice spread": _spread(values),
                f"difference vs {label(reference)}": delta,
                "differs beyond seed spread": verdict,
            }
        )
    differ = [r["precision"] for r in rows if r["differs beyond seed spread"] == "yes"]
    diverged = [f"{r['precision']} diverged in {r['diverged']} runs" for r in rows if r["diverged"][0] != "0"]
    if diverged:
        answer = "no: " + "; ".join([*diverged, *(f"{p} differs beyond the seed spread" for p in differ)])
    elif not any(r["differs beyond seed spread"] in ("yes", "no") for r in rows):
        answer = "not decided: every precision needs at least two seeds for a spread"
    elif differ:
        answer = f"no: {', '.join(differ)} differ from the reference by more than the seed spread"
    else:
        answer = "yes: every precision is within the seed spread of the reference"
    return pd.DataFrame(rows), answer


def wandb_summary(table: pd.DataFrame, accuracy: pd.DataFrame, answer: str) -> dict:
    """The report's numbers as flat W&B summary keys."""
    summary = {"equal_accuracy/answer": answer}
    for row in accuracy.to_dict("records"):
        summary[f"equal_accuracy/{row['precision']}/diverged"] = row["diverged"]
        summary[f"equal_accuracy/{row['precision']}/best_dice_mean"] = row["best val/dice mean"]
        summary[f"equal_accuracy/{row['precision']}/best_dice_spread"] = row["best val/dice spread"]
    for row in table.to_dict("records"):
        for column, value in row.items():
            if column.startswith(("time to ", "spread ", "reached ")):
                summary[f"time_to_accuracy/{row['precision']}/{column}"] = value
    return summary


def log_to_wandb(runs: list[Run], summary: dict, tables: dict[str, pd.DataFrame], out: Path) -> Path | None:
    """Where the runs logged to W&B: one more run in their project and group (job type `report`), offline
    where they were, with the report's numbers as its summary and the tables in its history; its W&B dir."""
    if (config := runs[0].wandb) is None:
        return None
    import wandb

    run = wandb.init(
        project=config.get("project"),
        group=config.get("group"),
        job_type="report",
        name=f"{config.get('group') or runs[0].task}-report",
        dir=out,
        mode="offline" if config.get("offline", True) else "online",
        config={"runs": [str(r.path) for r in runs]},
    )
    try:
        run.log({name: wandb.Table(dataframe=t.astype(str)) for name, t in tables.items()})
        run.summary.update(summary)
    finally:
        run.finish()
    return out / "wandb"


def save_figure(fig: Figure, path: Path) -> Path:
    fig.savefig(path, bbox_inches="tight")
    return path


def plot_curves(runs: list[Run], out: Path) -> Path:
    ax = Figure(figsize=(8, 5), dpi=120).subplots()
    styles = ["-", "--", ":", "-."]
    for run in validated(runs):
        diverged = f" (diverged at step {run.diverged['step']})" if run.diverged else ""
        ax.plot(
            run.curve["time/train_s"],
            run.curve["val/dice"],
            styles[run.seed % len(styles)],
            marker=".",
            color=COLOURS.get(run.precision, "black"),
            label=f"{run.label}, seed {run.seed}{diverged}",
        )
    _decorate(ax, runs, "Validation Dice vs training time, one curve per run")
    return save_figure(ax.figure, out / "dice_vs_time.png")


def plot_mean_range(runs: list[Run], out: Path) -> Path:
    ax = Figure(figsize=(8, 5), dpi=120).subplots()
    for precision, group in _groups(finished(runs)).items():
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
    _decorate(ax, runs, "Best validation Dice so far: mean and range over the seeds that finished")
    return save_figure(ax.figure, out / "dice_vs_time_mean.png")


def _decorate(ax, runs: list[Run], title: str) -> None:
    for t in runs[0].thresholds:
        ax.axhline(t, color="grey", lw=0.8, ls=":")
        ax.text(
            0.01, t, f"Dice {t:g}", transform=ax.get_yaxis_transform(), va="bottom", fontsize=8, color="grey"
        )
    ax.set_xlabel("training time, validation excluded (s)")
    ax.set_ylabel("validation foreground mean Dice")
    ax.set_title(f"{runs[0].task} on {runs[0].device}: {title}", fontsize=10)
    low = min([r.curve["val/dice"].min() for r in validated(runs)], default=1.0)
    low = min(low, min(runs[0].thresholds))
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt=".3g")


def write_report(sweep_dir: Path, out: Path | None = None, wandb: bool = True) -> dict[str, Path]:
    runs = load_runs(sweep_dir)
    out = out or sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    table, per_run = summary_table(runs), runs_table(runs)
    accuracy, answer = equal_accuracy(runs)
    tables = {"time_to_accuracy": table, "runs": per_run, "equal_accuracy": accuracy}
    for name, frame in tables.items():
        frame.to_csv(out / f"{name}.csv", index=False)
    md_path = out / "time_to_accuracy.md"
    md_path.write_text(
        f"# Time to accuracy: {runs[0].task} on {runs[0].device}\n\n"
        f"{len(runs)} runs from `{sweep_dir}`. Times are training seconds with validation excluded, as "
        "each run's `time_to_accuracy.json` records them: mean and spread (standard deviation) over the "
        "seeds that reached the threshold, with how many did. `wall to` counts validation too, and the "
        "validation share says how much of a run's wall time validation took: a run whose validation "
        "dominates cannot look fast.\n\n"
        f"{_markdown(table)}\n\n## Runs\n\n{_markdown(per_run)}\n\n"
        f"## Equal accuracy?\n\n{answer}.\n\n{_markdown(accuracy)}\n"
    )
    files = {
        "csv": out / "time_to_accuracy.csv",
        "markdown": md_path,
        "runs": out / "runs.csv",
        "equal_accuracy": out / "equal_accuracy.csv",
        "curves": plot_curves(runs, out),
        "mean_range": plot_mean_range(runs, out),
    }
    if wandb and (wandb_dir := log_to_wandb(runs, wandb_summary(table, accuracy, answer), tables, out)):
        files["wandb"] = wandb_dir
    return files


def sweep_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a command that reads a sweep: its usage text and SWEEP_DIR."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    return parser


def main() -> None:
    parser = sweep_parser(__doc__)
    parser.add_argument("--out", type=Path, default=None, help="default: SWEEP_DIR/report")
    parser.add_argument("--no-wandb", action="store_true", help="no W&B run for the report's numbers")
    args = parser.parse_args()
    for kind, path in write_report(args.sweep_dir, args.out, wandb=not args.no_wandb).items():
        print(f"{kind:15s} {path}")


if __name__ == "__main__":
    main()
