"""A dashboard for a sweep: the hosted W&B workspace, or the same content as a local HTML page.

usage: python -m lightning_seg.study.dashboard SWEEP_DIR [--out DIR] [--online --entity ENTITY]

Offline (the default) it writes SWEEP_DIR/dashboard/index.html from the run dirs: validation Dice
against training time, the time-to-accuracy and equal-accuracy tables (lightning_seg.study.report's, from
each run's time_to_accuracy.json), step-phase and peak-memory bars, the AMP loss scale and each
run's latest segmentation overlays (callbacks.val_images). `--online` saves the same panels as a
W&B workspace over the sweep's W&B group (needs `wandb login` and the runs synced).
"""

import html
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lightning_seg.run_dir import RunDir
from lightning_seg.study import report
from lightning_seg.study.callbacks.step_breakdown import PHASES
from lightning_seg.study.callbacks.val_images import WANDB_KEY
from lightning_seg.study.report import Run

PHASE_COLUMNS = [f"step/{phase}_s" for phase in PHASES]
LOSS_SCALE = "train/loss_scale"


def run_name(run: Run, sweep_dir: Path) -> str:
    diverged = f", diverged at step {run.diverged['step']}" if run.diverged else ""
    return f"{run.label}, seed {run.seed} ({run.path.relative_to(sweep_dir)}{diverged})"


def plot_phases(logs: list[pd.DataFrame], names: list[str], out: Path) -> Path | None:
    """Mean seconds per step phase (callbacks.step_breakdown), one stacked bar per run."""
    if not all(set(PHASE_COLUMNS) <= set(log) for log in logs):
        return None
    means = np.array([[log[c].mean() for c in PHASE_COLUMNS] for log in logs])
    ax = Figure(figsize=(8, 0.5 * len(logs) + 1.5), dpi=110).subplots()
    for i, phase in enumerate(PHASES):
        ax.barh(names, means[:, i], left=means[:, :i].sum(axis=1), label=phase)
    ax.set_xlabel("seconds per training step (mean of the measured steps)")
    ax.set_title("Step-phase breakdown", fontsize=10)
    ax.legend(fontsize=8, ncols=len(PHASES), loc="lower right")
    return report.save_figure(ax.figure, out / "phases.png")


def plot_memory(runs: list[Run], names: list[str], out: Path) -> Path | None:
    """Peak memory per run, the column report.summary_table uses."""
    if not (memory := report.memory_column(runs)):
        return None
    column, name = memory
    ax = Figure(figsize=(8, 0.5 * len(runs) + 1.5), dpi=110).subplots()
    colours = [report.COLOURS.get(r.precision, "black") for r in runs]
    ax.barh(names, [r.curve[column].max() for r in runs], color=colours)
    ax.set_xlabel(name)
    ax.set_title("Peak memory", fontsize=10)
    return report.save_figure(ax.figure, out / "memory.png")


def plot_loss_scale(runs: list[Run], logs: list[pd.DataFrame], names: list[str], out: Path) -> Path | None:
    """The fp16 grad scaler's loss scale against the step; None where no run had one."""
    if not any(LOSS_SCALE in log for log in logs):
        return None
    ax = Figure(figsize=(8, 4), dpi=110).subplots()
    for run, name, log in zip(runs, names, logs, strict=True):
        if LOSS_SCALE in log:
            scale = log.dropna(subset=[LOSS_SCALE])
            ax.plot(scale["step"], scale[LOSS_SCALE], color=report.COLOURS.get(run.precision), label=name)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss scale")
    ax.legend(fontsize=8)
    return report.save_figure(ax.figure, out / "loss_scale.png")


def write_page(sweep_dir: Path, out: Path | None = None) -> Path:
    """The offline dashboard: SWEEP_DIR/dashboard/index.html with its PNGs beside it."""
    out = out or sweep_dir / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    runs = report.load_runs(sweep_dir)
    names = [run_name(r, sweep_dir) for r in runs]
    logs = [pd.read_csv(RunDir(r.path).metrics_csv) for r in runs]  # every row, not only validations
    table, per_run = report.summary_table(runs), report.runs_table(runs)
    per_run.insert(0, "name", names)
    accuracy, answer = report.equal_accuracy(runs)

    def image(path: Path | None, missing: str = "") -> str:
        if path is None:
            return f"<p><em>{html.escape(missing)}</em></p>"
        return f'<img src="{html.escape(os.path.relpath(path, out))}" style="max-width:100%">'

    body = [
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>lightning_seg sweep</title></head>',
        "<body style='font-family:sans-serif;max-width:1100px;margin:auto'>",
        f"<h1>Sweep {html.escape(sweep_dir.name)}: {html.escape(runs[0].task)} on "
        f"{html.escape(runs[0].device)}</h1>",
        "<p>Runs: " + ", ".join(html.escape(n) for n in names) + "</p>",
        "<p>Diverged (loss or weights non-finite; left out of the best Dice): "
        + ", ".join(f"{html.escape(row['precision'])} {row['diverged']}" for _, row in table.iterrows())
        + "</p>",
        "<h2>Validation Dice vs training time</h2>",
        image(report.plot_curves(runs, out)),
        image(report.plot_mean_range(runs, out)),
        "<h2>Time to accuracy</h2>",
        "<p>Training seconds, validation excluded, from each run's time_to_accuracy.json: mean and "
        "spread (standard deviation) over the seeds that reached the threshold.</p>",
        table.to_html(index=False, float_format="{:.3g}".format, na_rep="not reached"),
        per_run.to_html(index=False, float_format="{:.4f}".format),
        "<h2>Equal accuracy?</h2>",
        f"<p>{html.escape(answer)}.</p>",
        accuracy.to_html(index=False, float_format="{:.4f}".format),
        "<h2>Step phases and peak memory</h2>",
        image(plot_phases(logs, names, out), "no step/*_s logged (callbacks.step_breakdown off)"),
        image(plot_memory(runs, names, out), "no peak memory logged"),
        "<h2>Loss scale</h2>",
        image(
            plot_loss_scale(runs, logs, names, out), "no loss scale: only fp16 with a grad scaler logs one"
        ),
        "<h2>Segmentations (latest validation)</h2>",
        *overlays(runs, names, image),
        "</body></html>\n",
    ]
    page = out / "index.html"
    page.write_text("\n".join(body))
    return page


def overlays(runs: list[Run], names: list[str], image: Callable[[Path | None, str], str]) -> list[str]:
    """Each run's name and the overlay PNGs of its last validation (file names start with epoch and step)."""
    parts = []
    for run, name in zip(runs, names, strict=True):
        pictures = sorted(RunDir(run.path).val_images.glob("epoch*-step*-*.png"))
        last = pictures[-1].name.split("-")[:2] if pictures else None
        latest = [p for p in pictures if p.name.split("-")[:2] == last] or [None]  # None: says there are none
        parts.append(f"<h3>{html.escape(name)}</h3>")
        parts.extend(image(p, "no val_images/ (callbacks.val_images off)") for p in latest)
    return parts


def time_to_accuracy_markdown(runs: list[Run]) -> str:
    """The time-to-accuracy and equal-accuracy tables, for a W&B markdown panel."""
    accuracy, answer = report.equal_accuracy(runs)
    return (
        f"### Time to accuracy (training s)\n\n"
        f"{report.summary_table(runs).to_markdown(index=False, floatfmt='.3g')}\n\n"
        f"### Equal accuracy? {answer}\n\n{accuracy.to_markdown(index=False, floatfmt='.4f')}"
    )


def workspace(sweep_dir: Path, entity: str):
    """The W&B workspace for the sweep's runs (their W&B project and group): the same panels as the
    offline page, built without network access; `.save()` uploads it."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    runs = report.load_runs(sweep_dir)
    if (config := runs[0].wandb) is None:
        raise SystemExit(f"the runs below {sweep_dir} did not log to W&B (train with logger=wandb)")
    group = config["group"]
    thresholds = [f"time_to_dice/{t:g}/train_s" for t in runs[0].thresholds]
    dice = wr.LinePlot(
        title="val/dice by precision",
        x="time/train_s",
        y=["val/dice"],
        groupby="precision",
        groupby_aggfunc="mean",
        groupby_rangefunc="minmax",
    )
    media = wr.MediaBrowser(title="image, reference, prediction", media_keys=[WANDB_KEY])
    return ws.Workspace(
        entity=entity,
        project=config["project"],
        name=f"{group} sweep",
        runset_settings=ws.RunsetSettings(
            filters=ws.And(ws.Metric("Group") == group), groupby=[ws.Config("precision")]
        ),
        sections=[
            ws.Section(name="Validation Dice vs training time", is_open=True, panels=[dice]),
            ws.Section(
                name="Time to accuracy",
                is_open=True,
                panels=[
                    wr.MarkdownPanel(markdown=time_to_accuracy_markdown(runs)),
                    wr.BarPlot(title="training s to each Dice threshold", metrics=thresholds),
                    wr.BarPlot(title="best val/dice", metrics=["best/val_dice"]),
                ],
            ),
            ws.Section(
                name="Step phases and peak memory",
                panels=[
                    wr.BarPlot(title="step phases (s)", metrics=[*PHASE_COLUMNS, "step/total_s"]),
                    wr.BarPlot(title="peak memory (GiB)", metrics=list(report.MEMORY_COLUMNS)),
                ],
            ),
            ws.Section(name="Loss scale", panels=[wr.LinePlot(title="fp16 loss scale", y=[LOSS_SCALE])]),
            ws.Section(name="Segmentations", is_open=True, panels=[media]),
        ],
    )


def main() -> None:
    parser = report.sweep_parser(__doc__)
    parser.add_argument("--out", type=Path, default=None, help="offline page folder (SWEEP_DIR/dashboard)")
    parser.add_argument("--online", action="store_true", help="save the hosted W&B workspace")
    parser.add_argument("--entity", default=None, help="W&B entity (user or team) for --online")
    args = parser.parse_args()
    if args.online:
        if not args.entity:
            parser.error("--online needs --entity")
        print(f"W&B workspace: {workspace(args.sweep_dir, args.entity).save().url}")
        return
    print(f"dashboard page: {write_page(args.sweep_dir, args.out)}")
    print(
        "the hosted W&B dashboard needs an online W&B login: `wandb login`, `wandb sync` the runs' "
        f"wandb/offline-run-* folders, then python -m lightning_seg.study.dashboard {args.sweep_dir} "
        "--online --entity ENTITY"
    )


if __name__ == "__main__":
    main()
