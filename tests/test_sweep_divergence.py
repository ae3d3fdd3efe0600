"""A sweep outlives a diverged run: the other jobs run, the run dir and time_to_accuracy.json record the
divergence, the report, dashboard and W&B summary count it per precision, the equal-accuracy verdict does
not hide it, and the command still exits non-zero at the end. A single run stops with its one error line.

One sweep point is forced to diverge with NaN images (a test hook). TF32 is fp32 on a CPU (no TF32 there),
so the sweep's two precisions train deterministically apart from the forced point: bf16 autocast of these
tiny networks can diverge on its own on CPUs with native bf16 (docs/benchmarks/bf16_cpu_nan.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pytorch_lightning import Callback

from lightning_seg.study.dashboard import write_page
from lightning_seg.study.report import write_report

from .conftest import ROOT, tiny_synthetic_overrides
from .test_time_to_accuracy import wandb_records


class DivergeOne(Callback):
    """NaN training images from global step 2 on, in the run whose `run` equals `at` (`precision/seed`)."""

    def __init__(self, run: str, at: str) -> None:
        self.poisoned = run == at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.poisoned and trainer.global_step >= 2:
            batch["image"].fill_(float("nan"))


def train_py(tmp: Path, arguments: list[str]) -> subprocess.CompletedProcess:
    paths = [f"paths.{key}_dir={tmp / key}" for key in ("data", "cache", "log")]
    return subprocess.run(
        [sys.executable, "train.py", *arguments, *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_SILENT": "true"},
    )


def diverge(at: str) -> list[str]:
    return [
        "+callbacks.diverge._target_=tests.test_sweep_divergence.DivergeOne",
        "+callbacks.diverge.run='${precision}/${seed}'",
        f"+callbacks.diverge.at={at}",
        "callbacks.amp_guard.max_nonfinite_steps=2",  # the NaN steps 2 and 3 stop it, before any validation
        "trainer.max_epochs=1",
        *tiny_synthetic_overrides(),
    ]


def test_a_sweep_outlives_a_diverged_run_and_its_report_counts_it(tmp_path):
    done = train_py(
        tmp_path,
        [
            "-m",
            "precision=32,tf32",
            "seed=0,1",
            "logger=wandb",
            "logger.wandb.offline=true",
            *diverge("tf32/1"),
        ],
    )
    (sweep,) = (tmp_path / "log" / "multiruns").iterdir()
    # every job ran; the command says at its end that one diverged, and fails
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"error: 1 of 4 runs diverged (listed above; the others ran) in {sweep}" in done.stderr
    assert f"{sweep / '3'}: training loss non-finite (nan) since step 2 (epoch 0)" in done.stderr
    assert [(sweep / job / "final_metrics.json").is_file() for job in "0123"] == [True, True, True, False]
    assert not any((sweep / job / "diverged.json").exists() for job in "012")
    record = json.loads((sweep / "3" / "diverged.json").read_text())
    # steps taken (the NaN steps 2 and 3 too), as time_to_accuracy.json counts them
    assert (record["step"], record["epoch"], record["precision"]) == (4, 0, "tf32")
    assert record["error"].startswith("training loss non-finite (nan) since step 2 (epoch 0) for 2 ")
    timing = json.loads((sweep / "3" / "time_to_accuracy.json").read_text())
    assert timing["diverged"] == {"step": 4, "epoch": 0, "error": record["error"]} and timing["reached"] == {}

    files = write_report(sweep, sweep / "report")
    table = pd.read_csv(files["csv"]).set_index("precision")
    assert table.loc["fp32", "diverged"] == "0 of 2" and table.loc["TF32", "diverged"] == "1 of 2"
    finished = {job: json.loads((sweep / job / "time_to_accuracy.json").read_text())["best"] for job in "012"}
    # the diverged run is no Dice of 0: TF32's best Dice is its finished run's
    assert table.loc["TF32", "best val/dice"] == pytest.approx(finished["2"])
    assert table.loc["fp32", "best val/dice"] == pytest.approx((finished["0"] + finished["1"]) / 2)
    runs = pd.read_csv(files["runs"], keep_default_na=False).set_index("run")
    assert list(runs["diverged"]) == ["", "", "", "at step 4"]
    accuracy = pd.read_csv(files["equal_accuracy"]).set_index("precision")
    assert accuracy.loc["TF32", "differs beyond seed spread"] == "diverged 1 of 2"
    assert accuracy.loc["TF32", "seeds"] == 1
    markdown = files["markdown"].read_text()
    assert "## Equal accuracy?\n\nno: TF32 diverged in 1 of 2 runs." in markdown
    summary = {}
    for entry in wandb_records(next(files["wandb"].glob("offline-run-*/run-*.wandb"))):
        if entry["type"] == "summary":
            summary.update(entry["summary"]["update"])
    assert summary["equal_accuracy/TF32/diverged"] == "1 of 2"
    assert summary["equal_accuracy/fp32/diverged"] == "0 of 2"
    assert summary["equal_accuracy/answer"] == "no: TF32 diverged in 1 of 2 runs"

    page = write_page(sweep, tmp_path / "dashboard").read_text()
    assert "fp32 0 of 2, TF32 1 of 2" in page and "TF32, seed 1 (3, diverged at step 4)" in page
    assert "no: TF32 diverged in 1 of 2 runs" in page


def test_a_single_run_that_diverges_exits_with_its_one_error_line(tmp_path):
    done = train_py(tmp_path, ["hydra.run.dir=" + str(tmp_path / "run"), *diverge("32/0")])
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training loss non-finite (nan) since step 2")
    record = json.loads((tmp_path / "run" / "diverged.json").read_text())
    assert f"error: {record['error']}" == errors[0]
