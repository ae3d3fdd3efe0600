"""The step benchmark's smoke preset and the step-breakdown callback during training."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest

from lightning_seg import precision
from lightning_seg.training import train

from .conftest import compose_config, tiny_synthetic_overrides

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("forward", "loss", "backward", "optimizer")


def run_bench(out: Path, *overrides: str) -> dict:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_seg.study.bench",
            "bench=cpu_smoke",
            f"hydra.run.dir={out}",
            *overrides,
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return json.loads((out / "bench.json").read_text())


def table_of(out: Path) -> str:
    return (out / "bench.md").read_text()


def test_cpu_smoke_preset_writes_consistent_json_markdown_and_charts(tmp_path):
    result = run_bench(tmp_path)
    points = result["points"]
    assert [(p["precision"], p["patch"], p["batch"]) for p in points] == [("32", 32, 2), ("bf16", 32, 2)]
    for point in points:
        if point["precision"] == "bf16" and not precision.cpu_has_native_bf16():
            assert point["project"]["error"].startswith("not timed: no native bf16 on this CPU")
            continue
        if point["precision"] == "bf16" and "non-finite" in point["project"].get("error", ""):
            # CPU bf16 autocast of a U-Net with instance norm can diverge within steps on some CPUs (the
            # probe and the AMP guard exist for it): the record must then say so, and the table show it
            assert "| basic_unet | 32^3, 2 | bf16 AMP | FloatingPointError: non-finite loss" in table_of(
                tmp_path
            )
            continue
        assert "median_s" in point["project"], point["project"]  # else: why this point has no timing
        timing = point["project"]["median_s"]
        assert all(timing[phase] > 0 for phase in PHASES)
        # medians of a sum and of its parts agree closely when steps are steady
        assert sum(timing[p] for p in PHASES) == pytest.approx(timing["total"], rel=0.15)
        assert point["project"]["peak_memory_gib"] > 0 and point["project"]["train_step_gflop"] > 0
        # from batch start to batch start: the step plus Lightning's own work between steps
        assert point["project"]["samples_per_s"] == pytest.approx(2 / point["project"]["step_interval_s"])
        assert point["project"]["step_interval_s"] >= 0.9 * timing["total"]
    assert result["environment"]["torch"] and result["environment"]["tf32_cudnn_conv"] == "ieee"
    table = table_of(tmp_path)
    assert "| basic_unet | 32^3, 2 | fp32 |" in table and "| basic_unet | 32^3, 2 | bf16 AMP |" in table
    for chart in ("phases.png", "memory.png"):
        assert mpimg.imread(tmp_path / chart).shape[0] > 200


def test_a_failing_point_is_recorded_and_the_grid_goes_on(tmp_path):
    # a 24^3 patch cannot go through basic_unet's 4 down-samplings: that point fails, the next runs
    result = run_bench(tmp_path, "bench.precisions=[32]", "bench.points=[[24,1],[32,1]]", "bench.steps=2")
    first, second = result["points"]
    assert "multiple of 16" in first["project"]["error"]
    assert second["project"]["median_s"]["total"] > 0
    assert "multiple of 16" in (tmp_path / "bench.md").read_text()


def test_the_probe_runs_beside_the_grid_and_its_table_names_both_choices(tmp_path):
    result = run_bench(tmp_path, "bench.steps=2", "bench.probe=true", "model.width=8")
    [row] = result["precision_auto"]["points"]
    assert (row["model"], row["patch"], row["batch"]) == ("basic_unet", 32, 2)
    assert row["probe"]["train"] in ("32", "bf16") and row["grid_choice"] in ("32", "bf16")
    assert row["probe"]["training"]["32"]["step_s"] > 0 and row["probe"]["inference"]["32"]["batch_s"] > 0
    table = table_of(tmp_path)
    assert "## precision=auto's probe against this grid" in table
    assert f"| {precision.label(row['probe']['train'])} | {precision.label(row['grid_choice'])} |" in table


def test_bare_loop_runs_side_by_side(tmp_path):
    result = run_bench(tmp_path, "bench.precisions=[32]", "bench.steps=3", "bench.bare_loop=true")
    [point] = result["points"]
    bare = point["bare"]["median_s"]
    assert all(bare[phase] > 0 for phase in PHASES)
    assert point["project_over_bare"] == pytest.approx(point["project"]["median_s"]["total"] / bare["total"])
    assert f"| {point['project_over_bare']:.3f} |" in (tmp_path / "bench.md").read_text()


def test_step_breakdown_callback_logs_positive_phases_during_training(tmp_path):
    cfg = compose_config(
        tmp_path,
        [
            *tiny_synthetic_overrides(),
            "trainer.max_epochs=1",
            "callbacks.step_breakdown.every_n_steps=2",
            "trainer.log_every_n_steps=1",
        ],
    )
    _, objects = train(cfg)
    log = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    rows = log.dropna(subset=["step/total_s"])
    assert list(rows["step"]) == list(range(0, objects["trainer"].global_step, 2))
    for phase in PHASES:
        assert (rows[f"step/{phase}_s"] > 0).all()
    parts = rows[[f"step/{p}_s" for p in PHASES]].sum(axis=1)
    assert (parts - rows["step/total_s"]).abs().max() < 1e-6
    assert (rows["step/peak_memory_gib"] > 0).all()


def test_loader_mode_times_the_real_loader_against_synthetic_input(tmp_path, synthetic_task_dir):
    result = run_bench(
        tmp_path,
        "bench=loader",
        "task=synthetic",
        f"paths.data_dir={synthetic_task_dir.parent}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "task.patch_size=[32,32,32]",
        "model.width=4",
        "bench.warmup=1",
        "bench.steps=4",
        "bench.worker_seconds=0.5",
    )
    [point] = result["points"]
    assert point["patch"] == "32x32x32" and point["batch"] == 2  # the task's patch, data.batch_size
    synthetic, loader = point["project"], point["loader"]
    assert synthetic["data_wait_frac"] < 0.05  # tensors already on the device
    assert 0.0 < loader["data_wait_frac"] < 1.0  # the real loader crops and augments on the way
    assert point["loader_over_synthetic_rate"] == pytest.approx(
        loader["samples_per_s"] / synthetic["samples_per_s"]
    )
    feeding = point["feeding"]  # one worker's draws beside the step's consumption
    assert feeding["worker"]["patches_per_s"] > 0 and feeding["worker"]["seconds"] >= 0.5
    assert feeding["consumed_patches_per_s"] == synthetic["samples_per_s"]
    assert feeding["workers_needed"] == math.ceil(
        synthetic["samples_per_s"] / feeding["worker"]["patches_per_s"]
    )
    table = (tmp_path / "bench.md").read_text()
    assert "## Real loader against synthetic input" in table
    assert f"| {point['loader_over_synthetic_rate']:.3f} |" in table
    assert f"| {feeding['workers_needed']} | 0 |" in table  # workers needed, data.num_workers on a CPU


def test_gpu_check_dry_run_writes_its_report_on_a_cpu(tmp_path):
    done = subprocess.run(
        # VENV: this test's Python, also when the suite runs in another venv (make test-lowest)
        [
            "make",
            "gpu-check",
            "DRY=1",
            f"VENV={sys.prefix}",
            f"REPORT_DIR={tmp_path}",
            f"DATA_DIR={tmp_path / 'none'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(
        [
            "report.md",
            "grid.json",
            "auto.json",
            "switches.json",
            "loader.json",
            "training.json",
            "plan.json",
            "phases.png",
            "memory.png",
        ]
    )
    report = (tmp_path / "report.md").read_text()
    assert "dry run" in report and "failed" not in report
    for section in (
        "## Goals",
        "## Reference grid",
        "## precision=auto's probe against this grid",
        "## Each switch alone",
        "## Real loader",
        "## Short real",
    ):
        assert section in report
    switches = json.loads((tmp_path / "switches.json").read_text())["switches"]
    assert switches["torch.compile"]["project"]["fast_path"]["compiled"] is True
    training = json.loads((tmp_path / "training.json").read_text())["training"]
    assert [r["precision"] for r in training] == ["32", "16", "bf16", "auto"]
    auto = json.loads((tmp_path / "auto.json").read_text())["auto"]
    grid = json.loads((tmp_path / "grid.json").read_text())["grid"]
    for row in auto["points"]:
        totals = {
            p["precision"]: p["project"]["median_s"]["total"]
            for p in grid
            if (p["patch"], p["batch"]) == (row["patch"], row["batch"]) and "median_s" in p["project"]
        }
        # where the grid's fp32 and bf16 differ clearly, the probe chose the faster (2 steps are noisy),
        # unless bf16's loss turned non-finite in the probe's steps (this width-4 network on a CPU can).
        # On a CPU "tf32" runs fp32's kernels: their spread is the timing noise, and a loaded machine
        # (other jobs on its 2 cores) makes the two measurements, minutes apart, incomparable
        safe = "step_s" in row["probe"]["training"].get("bf16", {"step_s": None})
        clear = "bf16" in totals and max(totals["32"], totals["bf16"]) > 1.5 * min(
            totals["32"], totals["bf16"]
        )
        quiet = "tf32" not in totals or abs(totals["tf32"] - totals["32"]) < 0.1 * totals["32"]
        if clear and safe and quiet:
            assert row["probe"]["train"] == row["grid_choice"], (row, totals)
    # what auto chose is recorded, whether its run then trained or (bf16 on a CPU, see above) diverged
    assert training[-1]["chosen"][0] in ("32", "bf16")
    # diverged: AmpGuard stops on a non-finite loss, or on non-finite weights at a save, whichever comes first
    assert "perf/data_wait_frac" in training[-1] or "NonFiniteLossError" in training[-1]["error"]
    assert 0 <= training[0]["perf/data_wait_frac"] < 1  # fp32
    for run in training[1:]:
        # bf16 autocast of a width-4 network on this CPU can diverge: the guard's message is the record
        assert 0 <= run.get("perf/data_wait_frac", 0) < 1 or "non-finite" in run["error"]
