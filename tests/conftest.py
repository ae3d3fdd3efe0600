"""Shared fixtures: configs composed with Hydra's compose API into tmp_path, tiny synthetic tasks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lightning_seg import precision
from lightning_seg.config import CONFIG_DIR
from lightning_seg.data.synthetic import write_synthetic_msd

ROOT = Path(__file__).resolve().parents[1]
# real MSD cases for the tests that train on them: LIGHTNING_SEG_TEST_DATA, else the development machines'
# shared data folder beside the checkout
SHARED_DATA = Path(os.environ.get("LIGHTNING_SEG_TEST_DATA", ROOT.parent / "shared" / "data"))
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "Task04_Hippocampus" / "dataset.json").is_file(),
    reason=f"real MSD cases not found at {SHARED_DATA} (LIGHTNING_SEG_TEST_DATA names a folder holding them)",
)

# a synthetic task small enough for many CPU tests: 6 cases of 32 x 32 x 24 voxels
TINY_SYNTHETIC = dict(num_cases=6, shape=[32, 32, 24], spacing=[1.5, 1.5, 2.0], seed=0)


def compose_config(tmp_path: Path, overrides: list[str] = (), data_dir: Path | None = None) -> DictConfig:
    """The training config as `python train.py <overrides>` would build it, writing under tmp_path."""
    paths = [
        f"paths.data_dir={data_dir or tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'outputs'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_dir={tmp_path / 'run'}",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*paths, *overrides])


def tiny_synthetic_overrides() -> list[str]:
    return [
        "task.synthetic.num_cases=6",
        "task.synthetic.shape=[32,32,24]",
        "task.patch_size=[32,32,32]",
        "model.width=4",
        "hardware=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]


def learnable_synthetic_overrides() -> list[str]:
    """Big enough to learn in seconds: 16 cases of 40 x 40 x 32 voxels, about 6 steps per epoch."""
    return [
        *tiny_synthetic_overrides(),
        "task.synthetic.num_cases=16",
        "task.synthetic.shape=[40,40,32]",
        "model.width=8",
        "data.batch_size=4",
    ]


@pytest.fixture(scope="session")
def synthetic_task_dir(tmp_path_factory) -> Path:
    """A tiny synthetic MSD folder (read-only use: tests that break files make their own copy)."""
    return write_synthetic_msd(tmp_path_factory.mktemp("data") / "Task00_Synthetic", **TINY_SYNTHETIC)


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Path:
    """A 2 x 2 multirun sweep (fp32, bf16 x seeds 0, 1) of two tiny epochs each, W&B offline, made
    once through train.py as a user makes it; the report, dashboard and notebook tests read it.
    Threshold 0 is reached at the first validation, 0.99 never, 0.001 by runs that learn at all."""
    overrides = [o for o in tiny_synthetic_overrides() if not o.startswith("trainer.enable_model_summary")]
    arguments = [
        "experiment=amp_time_to_accuracy",
        "precision=32,bf16",
        "seed=0,1",
        "trainer.max_epochs=2",
        "task.dice_thresholds=[0,0.001,0.99]",
        "logger.wandb.offline=true",
        "callbacks.val_images.count=1",
        # bf16 autocast of this tiny network on a CPU often diverges to NaN at the first step (CPU
        # autocast runs instance norm in bf16; an open finding). The sweep and its report are under
        # test here, the guard that would stop those runs in test_amp_guard.py
        "callbacks.amp_guard=null",
        *overrides,
    ]
    return multirun(tmp_path_factory.mktemp("sweep"), arguments)


def multirun(tmp: Path, arguments: list[str]) -> Path:
    """`python train.py -m <arguments>` writing under tmp, as a user runs it; the sweep dir."""
    paths = [
        f"paths.{key}_dir={tmp / folder}"
        for key, folder in (("data", "data"), ("cache", "cache"), ("log", "outputs"))
    ]
    subprocess.run(
        [sys.executable, "train.py", "-m", *arguments, *paths],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "WANDB_SILENT": "true"},
    )
    (sweep,) = (tmp / "outputs" / "multiruns").iterdir()
    return sweep


@pytest.fixture
def slow_cpu_bf16(monkeypatch):
    """A CPU without native bf16 (AVX2 only), faked: this machine's oneDNN may have bf16 kernels."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "bf16_conv_slowdown", lambda: 42.0)
