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
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lightning_seg.run_dir import RunDir  # noqa: E402
from lightning_seg.study import report  # noqa: E402
from lightning_seg.study.callbacks.step_breakdown import PHASES  # noqa: E402
from lightning_seg.study.callbacks.val_images import WANDB_KEY  # noqa: E402

PHASE_COLUMNS = [f"step/{phase}_s" for phase in PHASES]
LOSS_SCALE = "train/loss_scale"


def run_name(run: report.Run, sweep_dir: Path) -> str:
    return f"{run.label}, seed {run.seed} ({run.path.relative_to(sweep_dir)})"


def _full_log(run: report.Run) -> pd.DataFrame:
    """Every row of the run's metrics.csv (the report keeps only validation rows)."""
    return pd.read_csv(RunDir(run.path).metrics_csv)


def plot_phases(runs: list[report.Run], names: list[str], out: Path) -> Path | None:
    """Mean seconds per step phase (callbacks.step_breakdown), one stacked bar per run."""
    logs = [_full_log(r) for r in runs]
    if not all(set(PHASE_COLUMNS) <= set(log) for log in logs):
        return None
    means = np.array([[log[c].mean() for c in PHASE_COLUMNS] for log in logs])
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(runs) + 1.5), dpi=110)
    left = np.zeros(len(runs))
    for i, phase in enumerate(PHASES):
        ax.barh(names, means[:, i], left=left, label=phase)
        left += means[:, i]
    ax.set_xlabel("seconds per training step (mean of the measured steps)")
    ax.set_title("Step-phase breakdown", fontsize=10)
    ax.legend(fontsize=8, ncols=len(PHASES), loc="lower right")
    return _save(fig, out / "phases.png")


def plot_memory(runs: list[report.Run], names: list[str], out: Path) -> Path | None:
    """Peak memory per run, the column report.summary_table uses (GPU training peak, else CPU RSS)."""
    for column, label in report.MEMORY_COLUMNS.items():
        if all(column in r.curve for r in runs):
            fig, ax = plt.subplots(figsize=(8, 0.5 * len(runs) + 1.5), dpi=110)
            colours = [report.COLOURS.get(r.precision, "black") for r in runs]
            ax.barh(names, [r.curve[column].max() for r in runs], color=colours)
            ax.set_xlabel(label)
            ax.set_title("Peak memory", fontsize=10)
            return _save(fig, out / "memory.png")
    return None


def plot_loss_scale(runs: list[report.Run], names: list[str], out: Path) -> Path | None:
    """The fp16 grad scaler's loss scale against the step; None where no run had one."""
    logs = [_full_log(r) for r in runs]
    if not any(LOSS_SCALE in log for log in logs):
        return None
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    for run, name, log in zip(runs, names, logs, strict=True):
        if LOSS_SCALE in log:
            scale = log.dropna(subset=[LOSS_SCALE])
            ax.plot(scale["step"], scale[LOSS_SCALE], color=report.COLOURS.get(run.precision), label=name)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss scale")
    ax.legend(fontsize=8)
    return _save(fig, out / "loss_scale.png")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def latest_overlays(run: report.Run) -> list[Path]:
    """The run's overlay PNGs of its last validation (file names start with epoch and step)."""
    pictures = sorted(RunDir(run.path).val_images.glob("epoch*-step*-*.png"))
    if not pictures:
        return []
    last = pictures[-1].name.split("-")[:2]
    return [p for p in pictures if p.name.split("-")[:2] == last]


def write_page(sweep_dir: Path, out: Path | None = None) -> Path:
    """The offline dashboard: SWEEP_DIR/dashboard/index.html with its PNGs beside it."""
    out = out or sweep_dir / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    runs = report.load_runs(sweep_dir)
    names = [run_name(r, sweep_dir) for r in runs]
    table, per_run = report.summary_table(runs), report.runs_table(runs)
    per_run.insert(0, "name", names)
    accuracy, answer = report.equal_accuracy(runs)

    def image(path: Path | None, missing: str) -> str:
        if path is None:
            return f"<p><em>{html.escape(missing)}</em></p>"
        return f'<img src="{html.escape(os.path.relpath(path, out))}" style="max-width:100%">'

    overlays = []
    for run, name in zip(runs, names, strict=True):
        pictures = latest_overlays(run)
        overlays.append(f"<h3>{html.escape(name)}</h3>")
        overlays.extend(image(p, "") for p in pictures)
        if not pictures:
            overlays.append(image(None, "no val_images/ (callbacks.val_images off)"))
    body = [
        f"<h1>Sweep {html.escape(sweep_dir.name)}: {html.escape(runs[0].task)} on "
        f"{html.escape(runs[0].device)}</h1>",
        "<p>Runs: " + ", ".join(html.escape(n) for n in names) + "</p>",
        "<h2>Validation Dice vs training time</h2>",
        image(report.plot_curves(runs, out), ""),
        image(report.plot_mean_range(runs, out), ""),
        "<h2>Time to accuracy</h2>",
        "<p>Training seconds, validation excluded, from each run's time_to_accuracy.json: mean and "
        "spread (standard deviation) over the seeds that reached the threshold.</p>",
        table.to_html(index=False, float_format="{:.3g}".format, na_rep="not reached"),
        per_run.to_html(index=False, float_format="{:.4f}".format),
        "<h2>Equal accuracy?</h2>",
        f"<p>{html.escape(answer)}.</p>",
        accuracy.to_html(index=False, float_format="{:.4f}".format),
        "<h2>Step phases and peak memory</h2>",
        image(plot_phases(runs, names, out), "no step/*_s logged (callbacks.step_breakdown off)"),
        image(plot_memory(runs, names, out), "no peak memory logged"),
        "<h2>Loss scale</h2>",
        image(plot_loss_scale(runs, names, out), "no loss scale: only fp16 with a grad scaler logs one"),
        "<h2>Segmentations (latest validation)</h2>",
        *overlays,
    ]
    page = out / "index.html"
    page.write_text(
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>lightning_seg sweep</title></head>\n'
        "<body style='font-family:sans-serif;max-width:1100px;margin:auto'>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    return page


def workspace(sweep_dir: Path, entity: str):
    """The W&B workspace for the sweep's runs (their W&B project and group): the same panels as the
    offline page, built without network access; `.save()` uploads it."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    runs = report.load_runs(sweep_dir)
    config = runs[0].wandb
    if config is None:
        raise SystemExit(f"the runs below {sweep_dir} did not log to W&B (train with logger=wandb)")
    project, group = config["project"], config["group"]
    table = report.summary_table(runs)
    accuracy, answer = report.equal_accuracy(runs)
    tables = (
        f"### Time to accuracy (training s)\n\n{table.to_markdown(index=False, floatfmt='.3g')}\n\n"
        f"### Equal accuracy? {answer}\n\n{accuracy.to_markdown(index=False, floatfmt='.4f')}"
    )
    thresholds = [f"time_to_dice/{t:g}/train_s" for t in runs[0].thresholds]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=f"{group} sweep",
        runset_settings=ws.RunsetSettings(
            filters=ws.And(ws.Metric("Group") == group), groupby=[ws.Config("precision")]
        ),
        sections=[
            ws.Section(
                name="Validation Dice vs training time",
                is_open=True,
                panels=[
                    wr.LinePlot(
                        title="val/dice by precision",
                        x="time/train_s",
                        y=["val/dice"],
                        groupby="precision",
                        groupby_aggfunc="mean",
                        groupby_rangefunc="minmax",
                    )
                ],
            ),
            ws.Section(
                name="Time to accuracy",
                is_open=True,
                panels=[
                    wr.MarkdownPanel(markdown=tables),
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
            ws.Section(
                name="Segmentations",
                is_open=True,
                panels=[wr.MediaBrowser(title="image, reference, prediction", media_keys=[WANDB_KEY])],
            ),
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
        saved = workspace(args.sweep_dir, args.entity).save()
        print(f"W&B workspace: {saved.url}")
        return
    print(f"dashboard page: {write_page(args.sweep_dir, args.out)}")
    print(
        "the hosted W&B dashboard needs an online W&B login: `wandb login`, `wandb sync` the runs' "
        f"wandb/offline-run-* folders, then python -m lightning_seg.study.dashboard {args.sweep_dir} "
        "--online --entity ENTITY"
    )


if __name__ == "__main__":
    main()
