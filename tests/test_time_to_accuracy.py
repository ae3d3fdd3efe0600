"""Time-to-accuracy callback, multirun sweep and its report, W&B offline files."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from lightning_seg.study.report import write_report
from lightning_seg.training import train

from .conftest import compose_config, learnable_synthetic_overrides


def test_threshold_times_match_the_metrics_log(tmp_path):
    cfg = compose_config(
        tmp_path,
        [
            *learnable_synthetic_overrides(),
            "trainer.max_epochs=6",
            "task.dice_thresholds=[0.2,0.4,0.6,0.99]",
        ],
    )
    train(cfg)
    run = tmp_path / "run"
    summary = json.loads((run / "time_to_accuracy.json").read_text())
    log = pd.read_csv(run / "csv" / "metrics.csv").dropna(subset=["val/dice"])
    assert summary["reached"], "no threshold reached at all"
    assert "0.99" not in summary["reached"]
    for threshold, record in summary["reached"].items():
        first = log[log["val/dice"] >= float(threshold)].iloc[0]
        assert record["train_s"] == pytest.approx(first["time/train_s"], abs=1e-3)
        # Lightning logs a validation at the index of the last step taken; the record counts steps taken
        assert record["step"] == first["step"] + 1 and record["epoch"] == first["epoch"]
    assert summary["best"] == pytest.approx(log["val/dice"].max())


def test_stop_at_target_stops_training(tmp_path):
    cfg = compose_config(
        tmp_path,
        [
            *learnable_synthetic_overrides(),
            "trainer.max_epochs=30",
            "callbacks.time_to_accuracy.stop_at=0.3",
        ],
    )
    _, objects = train(cfg)
    log = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv").dropna(subset=["val/dice"])
    assert objects["trainer"].current_epoch < 29
    assert log["val/dice"].iloc[-1] >= 0.3 and (log["val/dice"].iloc[:-1] < 0.3).all()


def test_multirun_sweep_and_report(tiny_sweep):
    run_dirs = sorted(p for p in tiny_sweep.iterdir() if (p / "csv" / "metrics.csv").is_file())
    assert [p.name for p in run_dirs] == ["0", "1", "2", "3"]

    files = write_report(tiny_sweep, tiny_sweep / "report_test")
    table = pd.read_csv(files["csv"])
    assert list(table["precision"]) == ["fp32", "bf16 AMP"]
    assert list(table["runs"]) == [2, 2]
    assert "| fp32" in files["markdown"].read_text()
    for key in ("curves", "mean_range"):
        image = mpimg.imread(files[key])
        assert image.shape[0] > 300 and image.shape[1] > 500

    # one source of truth: every time the report shows is the one the run's callback recorded
    records = {p.name: json.loads((p / "time_to_accuracy.json").read_text()) for p in run_dirs}
    per_run = pd.read_csv(files["runs"], dtype=str).set_index("run")
    for name, record in records.items():
        assert "0" in record["reached"] and "0.99" not in record["reached"]
        for threshold in ("0", "0.001", "0.99"):  # 0.001: a run whose bf16 diverged stays at Dice 0
            crossing = record["reached"].get(threshold)
            shown = (
                f"{crossing['train_s']:.1f} s (step {crossing['step']}, wall {crossing['wall_s']:.1f} s)"
                if crossing
                else "not reached"
            )
            assert per_run.loc[name, threshold] == shown
            assert crossing is None or crossing["wall_s"] >= crossing["train_s"]
        assert float(per_run.loc[name, "best val/dice"]) == pytest.approx(record["best"])
    precision = {p.name: OmegaConf.load(p / ".hydra" / "config.yaml").precision for p in run_dirs}
    for label, value in (("fp32", 32), ("bf16 AMP", "bf16")):
        times = [records[n]["reached"]["0"]["train_s"] for n in records if precision[n] == value]
        row = table[table["precision"] == label].iloc[0]
        assert row["time to 0 (s)"] == pytest.approx(np.mean(times))
        assert row["spread 0 (s)"] == pytest.approx(np.std(times, ddof=1))
        assert row["reached 0"] == "2/2" and row["reached 0.99"] == "0/2"
        assert np.isnan(row["time to 0.99 (s)"])
        # validation time shown beside training time
        walls = [records[n]["reached"]["0"]["wall_s"] for n in records if precision[n] == value]
        assert (
            row["wall to 0 (s)"] == pytest.approx(np.mean(walls))
            and row["wall to 0 (s)"] >= row["time to 0 (s)"]
        )
        assert 0 < row["validation share of wall time"] < 1

    # equal accuracy: best Dice per precision over the seeds, and the same numbers in the W&B summary
    accuracy = pd.read_csv(files["equal_accuracy"])
    best = [records[n]["best"] for n in records if precision[n] == 32]
    fp32 = accuracy[accuracy["precision"] == "fp32"].iloc[0]
    assert fp32["best val/dice mean"] == pytest.approx(np.mean(best))
    assert fp32["best val/dice spread"] == pytest.approx(np.std(best, ddof=1))
    assert accuracy["differs beyond seed spread"].iloc[1] in ("yes", "no")
    (report_run,) = files["wandb"].glob("offline-run-*/run-*.wandb")
    summary = {}
    for record in wandb_records(report_run):
        if record["type"] == "summary":
            summary.update(record["summary"]["update"])
    assert summary["equal_accuracy/fp32/best_dice_mean"] == pytest.approx(np.mean(best))
    assert summary["time_to_accuracy/fp32/time to 0 (s)"] == pytest.approx(table["time to 0 (s)"].iloc[0])

    # W&B offline runs, read back with W&B's own inspector: one run per job, one group per sweep,
    # validation Dice plotted against training time, the logged keys in the history
    records = [wandb_records(f) for d in run_dirs for f in d.glob("wandb/offline-run-*/run-*.wandb")]
    assert len(records) == 4
    runs = [next(r["run"] for r in recs if r["type"] == "run") for recs in records]
    assert len({r["run_id"] for r in runs}) == 4 and len({r["run_group"] for r in runs}) == 1
    names = sorted(r["display_name"] for r in runs)
    assert names == ["synthetic-p32-s0", "synthetic-p32-s1", "synthetic-pbf16-s0", "synthetic-pbf16-s1"]
    for recs in records:
        metrics = [r["metric"] for r in recs if r["type"] == "metric"]
        assert {"glob_name": "val/*", "step_metric": "time/train_s"}.items() <= next(
            m for m in metrics if m.get("glob_name") == "val/*"
        ).items()
        history = set().union(*(r["history"]["item"] for r in recs if r["type"] == "history"))
        assert {"val/dice", "time/train_s", "train/loss_step"} <= history


def wandb_records(path: Path) -> list[dict]:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]
