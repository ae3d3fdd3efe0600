"""Shared fixtures: configs composed with Hydra's compose API into tmp_path, tiny synthetic tasks."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lightning_seg.config import CONFIG_DIR
from lightning_seg.data.synthetic import write_synthetic_msd

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "Task04_Hippocampus" / "dataset.json").is_file(),
    reason=f"real MSD cases not found at {SHARED_DATA} (only the project's development machines have them)",
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
