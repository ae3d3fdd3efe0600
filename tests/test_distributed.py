"""Multi-process runs on CPU: data prepared once, exact validation, sharded caches, the submitit launcher."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_seg.config import CONFIG_DIR
from lightning_seg.distributed import launch_id, prepare_once_per_node
from lightning_seg.errors import ConfigError, UserError
from lightning_seg.training import train
from lightning_seg.validate import validate

from .conftest import compose_config, learnable_synthetic_overrides, tiny_synthetic_overrides

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]

# started in every Python process of the run (spawned ones too, through PYTHONPATH): counts each call of
# the dataset check and the synthetic writer in a file, whichever process makes it
COUNTER = """
import os
import lightning_seg.data.datamodule as dm

def counted(name, fn):
    def wrapper(*args, **kwargs):
        with open(os.environ["LIGHTNING_SEG_TEST_COUNTER"], "a") as out:
            out.write(f"{name} {os.getpid()}\\n")
        return fn(*args, **kwargs)
    return wrapper

dm.check_dataset = counted("check", dm.check_dataset)
dm.write_synthetic_msd = counted("write", dm.write_synthetic_msd)
"""


@pytest.mark.parametrize(
    "hardware",
    [
        ["hardware=ddp_cpu"],  # ddp_spawn: the processes start inside trainer.fit
        ["hardware=cpu", "trainer.devices=2", "trainer.strategy=ddp"],  # rank 1 runs train.py again
    ],
    ids=["ddp_spawn", "ddp_subprocess"],
)
def test_two_processes_prepare_the_data_once_and_write_one_run(tmp_path, hardware):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(COUNTER)
    counter = tmp_path / "calls.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), str(ROOT)]),
        "LIGHTNING_SEG_TEST_COUNTER": str(counter),
    }
    run = tmp_path / "run"
    overrides = [
        *tiny_synthetic_overrides(),
        *hardware,
        "task.synthetic.num_cases=12",  # 2 validation cases: one per process
        "trainer.max_epochs=2",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run}",
    ]
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    calls = counter.read_text().split()
    assert calls.count("check") == 1 and calls.count("write") == 1, calls
    log = pd.read_csv(run / "csv" / "metrics.csv")
    assert log["val/dice"].notna().sum() == 2  # one row per validation: one process logs
    assert len(list((run / "checkpoints").glob("best-*.ckpt"))) == 1
    assert json.loads((run / "environment.json").read_text())["batch"] == {
        "per_device": 2,
        "processes": 2,
        "accumulate": 1,
        "global": 4,
    }


def test_waiting_processes_stop_with_the_message_of_the_one_that_prepares(tmp_path, monkeypatch):
    def broken_dataset():
        raise UserError("dataset.json: no 'training' list of cases")

    with pytest.raises(UserError, match="no 'training' list"):
        prepare_once_per_node(broken_dataset, tmp_path)  # local rank 0
    marker = tmp_path / f".prepared-{launch_id()}-node0"
    assert marker.read_text() == "dataset.json: no 'training' list of cases"

    # local rank 1 of a launch where all processes start at once: it waits, then fails the same way
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29500")
    fresh = tmp_path / f".prepared-{launch_id()}-node0"  # this launch's: its torchrun agent, its restart

    def rank_zero_fails_later():
        time.sleep(1.5)
        fresh.write_text("labelsTr/case_3.nii.gz: label values {7} are not labels of the task")

    threading.Thread(target=rank_zero_fails_later).start()
    started = time.monotonic()
    with pytest.raises(UserError, match=r"case_3.nii.gz: label values \{7\}"):
        prepare_once_per_node(lambda: pytest.fail("only local rank 0 prepares"), tmp_path)
    assert time.monotonic() - started >= 1.0


def test_each_validation_case_on_exactly_one_process_and_training_shards(synthetic_task_dir, tmp_path):
    """Process-local datasets of a 3-process run (set up as Lightning would in each process)."""
    cfg = compose_config(tmp_path, [*tiny_synthetic_overrides(), "data.val_fraction=0.5"])
    per_rank = []
    for rank in range(3):
        datamodule = instantiate(
            cfg.data, task_dir=str(synthetic_task_dir), cache_shard_per_rank=True, prep_workers=0
        )
        datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=3, num_devices=3)
        datamodule.setup("fit")
        per_rank.append(datamodule)
    stored = per_rank[0].store.case  # a case's folder in the preprocessed store
    val = [case.folder for dm in per_rank for case in dm.val_set.cases]
    assert sorted(val) == sorted(stored(c).folder for c in per_rank[0].val_cases)  # each once, none repeated
    shards = [[case.folder for case in dm.train_set.cases] for dm in per_rank]
    train_cases = {stored(c).folder for c in per_rank[0].train_cases}
    assert {case for shard in shards for case in shard} == train_cases
    assert len({len(shard) for shard in shards}) == 1  # evened out: every process steps equally often
    with pytest.raises(ConfigError, match="3 validation case.s. for 4 processes"):
        per_rank[0].check_processes(4)


def validate_with(tmp_path: Path, name: str, ckpt: Path, hardware: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="validate",
            overrides=[
                f"ckpt_path={ckpt}",
                f"hardware={hardware}",
                f"paths.output_dir={tmp_path / name}",
                f"paths.log_dir={tmp_path / 'outputs'}",
                "trainer.enable_progress_bar=false",
            ],
        )
    (tmp_path / name).mkdir()
    metrics = validate(cfg)
    assert json.loads((tmp_path / name / "val_metrics.json").read_text()) == metrics
    return metrics


def test_two_process_validation_equals_one_process_on_an_odd_number_of_cases(tmp_path):
    cfg = compose_config(tmp_path, [*learnable_synthetic_overrides(), "trainer.max_epochs=4"])
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert len(json.loads((tmp_path / "run" / "split.json").read_text())["val"]) == 3
    one = validate_with(tmp_path, "one", ckpt, "cpu")
    two = validate_with(tmp_path, "two", ckpt, "ddp_cpu")
    assert (one["processes"], two["processes"], one["cases"], two["cases"]) == (1, 2, 3, 3)
    assert one["val/dice"] > 0.2, one  # a trained network: the comparison means something
    for key in ("val/dice", "val/dice_organ_a", "val/dice_organ_b"):
        assert two[key] == pytest.approx(one[key], abs=1e-5), key


def test_submitit_local_launcher_runs_a_one_step_job(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [
        *tiny_synthetic_overrides(),
        *QUIET,
        "trainer.max_steps=1",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    ]
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=local", *overrides],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 1
    assert list((sweep / ".submitit").glob("*/*_0_log.out"))  # the job ran under submitit
