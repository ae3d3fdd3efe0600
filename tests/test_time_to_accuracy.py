"""Time-to-accuracy callback, multirun sweep and its report, W&B offline files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest

from lightning_seg.report import write_report
from lightning_seg.training import train

from .conftest import compose_config, learnable_synthetic_overrides, tiny_synthetic_overrides

ROOT = Path(__file__).resolve().parents[1]


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


def test_multirun_sweep_and_report(tmp_path):
    overrides = [o for o in tiny_synthetic_overrides() if not o.startswith("trainer.enable_model_summary")]
    command = [
        sys.executable,
        "train.py",
        "-m",
        "experiment=amp_time_to_accuracy",
        "precision=32,bf16",
        "seed=0,1",
        "trainer.max_epochs=2",
        "logger.wandb.offline=true",
        # bf16 autocast of this tiny network on a CPU often diverges to NaN at the first step (CPU
        # autocast runs instance norm in bf16; an open finding). The sweep and its report are under
        # test here, the guard that would stop those runs in test_amp_guard.py
        "callbacks.amp_guard=null",
        *overrides,
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.log_dir={tmp_path / 'outputs'}",
    ]
    subprocess.run(
        command, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "WANDB_SILENT": "true"}
    )
    sweeps = list((tmp_path / "outputs" / "multiruns").iterdir())
    assert len(sweeps) == 1
    run_dirs = sorted(p for p in sweeps[0].iterdir() if (p / "csv" / "metrics.csv").is_file())
    assert [p.name for p in run_dirs] == ["0", "1", "2", "3"]

    files = write_report(sweeps[0])
    table = pd.read_csv(files["csv"])
    assert list(table["precision"]) == ["fp32", "bf16 AMP"]
    assert list(table["runs"]) == [2, 2]
    assert "| fp32" in files["markdown"].read_text()
    for key in ("curves", "mean_range"):
        image = mpimg.imread(files[key])
        assert image.shape[0] > 300 and image.shape[1] > 500

    # W&B offline runs, read back with W&B's own inspector: one run per job, one group per sweep,
    # validation Dice plotted against training time, the logged keys in the history
    records = [wandb_records(f) for f in sorted(sweeps[0].glob("*/wandb/offline-run-*/run-*.wandb"))]
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
