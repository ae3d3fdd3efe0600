"""Every task x precision x model composes; group choices land where the trainer reads them."""

import itertools

import pytest
from hydra.utils import instantiate

from lightning_seg.config import CONFIG_DIR
from lightning_seg.precision import uses_tf32

from .conftest import compose_config

TASKS = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))
PRECISIONS = {
    "32": ("32-true", False),
    "tf32": ("32-true", True),
    "16": ("16-mixed", False),
    "bf16": ("bf16-mixed", False),
}
MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def test_all_ten_msd_tasks_and_the_synthetic_one_are_there():
    # at least: a new task or network is a new file, and every test here covers it without an edit
    assert len(TASKS) >= 11 and "synthetic" in TASKS and "hippocampus" in TASKS
    assert {"basic_unet", "monai_unet", "dynunet"} <= set(MODELS)


@pytest.mark.parametrize("task,precision,model", list(itertools.product(TASKS, PRECISIONS, MODELS)))
def test_composes(tmp_path, task, precision, model):
    cfg = compose_config(tmp_path, [f"task={task}", f"precision={precision}", f"model={model}"])
    assert cfg.trainer.precision == PRECISIONS[precision][0]
    assert uses_tf32(cfg.precision) is PRECISIONS[precision][1]
    assert cfg.model._target_.endswith(model)
    assert cfg.model.out_channels == len(cfg.task.labels)
    assert cfg.data.task_dir.endswith(cfg.task.msd_folder)
    assert len(cfg.task.patch_size) == 3 and len(cfg.task.spacing) == 3
    assert cfg.task.normalization.kind in ("zscore_nonzero", "ct_window", "percentile")


@pytest.mark.parametrize("task", TASKS)
def test_networks_build_for_every_task(tmp_path, task):
    cfg = compose_config(tmp_path, [f"task={task}"])
    net = instantiate(cfg.model)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_hippocampus_uses_the_tutorial_network_unless_told_otherwise(tmp_path):
    assert compose_config(tmp_path, ["task=hippocampus"]).model._target_.endswith("monai_unet")
    cfg = compose_config(tmp_path, ["task=hippocampus", "model=dynunet"])
    assert cfg.model._target_.endswith("dynunet")


def test_basic_unet_explains_a_patch_it_cannot_take(tmp_path):
    cfg = compose_config(tmp_path, ["task=hippocampus", "model=basic_unet"])
    with pytest.raises(Exception, match="multiple of 16"):
        instantiate(cfg.model)


def test_patch_size_is_overridable(tmp_path):
    cfg = compose_config(tmp_path, ["task=spleen", "task.patch_size=[160,160,160]"])
    assert list(cfg.module.patch_size) == [160, 160, 160]
    assert list(cfg.model.patch_size) == [160, 160, 160]


def test_unknown_precision_is_refused_with_the_choices(tmp_path):
    cfg = compose_config(tmp_path, ["precision=8"])
    with pytest.raises(Exception, match="precision=8: choose one of 32, tf32, 16, bf16"):
        _ = cfg.trainer.precision


def test_command_line_takes_precision_as_typed():
    import subprocess
    import sys

    root = CONFIG_DIR.parent
    out = subprocess.run(
        [sys.executable, "train.py", "task=left_atrium", "precision=16", "--cfg", "job", "--resolve"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "precision: 16-mixed" in out and "name: left_atrium" in out
