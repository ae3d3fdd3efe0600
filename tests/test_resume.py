"""Runs that die: killed runs resume in place, SIGTERM saves, atomic files, forks, config guards."""

import csv
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from pytorch_lightning import Trainer
from pytorch_lightning.demos.boring_classes import BoringModel

from lightning_seg.callbacks.checkpoint import ResumableCheckpoint
from lightning_seg.checkpoint_io import AtomicCheckpointIO
from lightning_seg.data.datamodule import split_in_checkpoint
from lightning_seg.errors import UserError
from lightning_seg.loggers import ResumableCSVLogger
from lightning_seg.resume import find_checkpoint
from lightning_seg.training import train

from .conftest import compose_config, tiny_synthetic_overrides

ROOT = Path(__file__).resolve().parents[1]
RELOAD_WARNINGS = ("won't be reloaded", "will not be reloaded", "dirpath has changed")
# one thread per training process: on a busy 2-core machine OpenMP threads that spin for each other
# slow a step from 0.1 s to seconds, and the kill test would run out of time
ENV = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def train_command(tmp_path: Path, run_dir: Path, *overrides: str) -> list[str]:
    """`python train.py` on the tiny synthetic task, writing under tmp_path, the run in run_dir."""
    return [
        sys.executable,
        "train.py",
        *tiny_synthetic_overrides(),
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.log_dir={tmp_path / 'outputs'}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]


def launch(command: list[str], log_file: Path) -> subprocess.Popen:
    with open(log_file, "w") as out:
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=ENV)


def rows(run_dir: Path) -> list[dict]:
    """metrics.csv as it is on disk now (a row cut short by a kill left out)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    text = path.read_text()
    text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(text)))


def steps_reached(run_dir: Path) -> int:
    """Steps taken, from the training rows logged so far (log_every_n_steps=1: the row of step s says
    that s + 1 steps were taken)."""
    return max((int(r["step"]) + 1 for r in rows(run_dir) if r.get("train/loss_step")), default=0)


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def wait_for(condition, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def newer_last_ckpt(run_dir: Path, than: int):
    last = run_dir / "checkpoints" / "last.ckpt"
    return lambda: last.is_file() and checkpoint_step(last) > than


def test_killed_three_times_the_run_resumes_in_place_and_completes(tmp_path):
    """SIGKILL at seeded random moments, then the same command with ckpt_path=last, three times."""
    run = tmp_path / "run"
    interval_min, epochs = 0.0005, 30  # a checkpoint interval shorter than a step
    command = train_command(
        tmp_path,
        run,
        f"trainer.max_epochs={epochs}",
        f"checkpoint_every_min={interval_min}",
        "trainer.log_every_n_steps=1",
        "callbacks.step_breakdown.every_n_steps=0",
        "task.dice_thresholds=[0.005,0.01,0.02]",
    )
    rng = random.Random(0)
    lost, first_saved, before_first_kill = [], 0, None
    for attempt in range(3):
        resumed_from = checkpoint_step(run / "checkpoints" / "last.ckpt") if attempt else 0
        process = launch(command + (["ckpt_path=last"] if attempt else []), tmp_path / f"launch{attempt}.log")
        try:
            # a kill at a random moment once this launch has trained and checkpointed
            wait_for(newer_last_ckpt(run, resumed_from), process, 120, "new last.ckpt")
            time.sleep(rng.uniform(0.5, 5.0))
            assert process.poll() is None, "the run finished before the kill: plan more epochs"
        finally:
            process.kill()
            process.wait()
        saved = checkpoint_step(run / "checkpoints" / "last.ckpt")
        # (the training row of the checkpoint's own step is written just after the checkpoint)
        lost.append(max(steps_reached(run), saved) - saved)
        if attempt == 0:  # the rows on disk after the first kill that the checkpoint covers
            first_saved = saved
            before_first_kill = pd.DataFrame([r for r in rows(run) if int(r["step"]) < saved])
    final = subprocess.run(
        command + ["ckpt_path=last"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV
    )
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]

    split = json.loads((run / "split.json").read_text())
    planned = epochs * len(split["train"])  # one volume per step (batch_size 2 = samples_per_volume)
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == planned

    log = pd.read_csv(run / "csv" / "metrics.csv")
    # the rows logged before the first kill are kept as they were
    kept = log[log["step"] < first_saved].reset_index(drop=True)
    expected = before_first_kill.apply(pd.to_numeric, errors="coerce")
    pd.testing.assert_frame_equal(kept[expected.columns], expected, check_dtype=False)
    # no step twice: replayed steps replaced their lost rows
    for column in ("train/loss_step", "train/loss_epoch", "val/dice"):
        assert log.dropna(subset=[column])["step"].is_unique, column
    val = log.dropna(subset=["val/dice"]).sort_values("step")
    assert list(val["epoch"]) == list(range(epochs))  # every validation once, none skipped
    assert val["time/train_s"].is_monotonic_increasing and val["time/wall_s"].is_monotonic_increasing

    # a kill loses at most the steps of one checkpoint interval (plus the step in flight)
    train_s = val["time/train_s"].to_numpy()
    steps = val["step"].to_numpy()
    seconds_per_step = min(
        (train_s[i + 1] - train_s[i]) / (steps[i + 1] - steps[i]) for i in range(len(val) - 1)
    )
    # (half the mean step time of the fastest epoch: steps vary on a shared CPU)
    bound = math.ceil(interval_min * 60 / (0.5 * seconds_per_step)) + 1
    assert all(n <= bound for n in lost), (lost, bound)

    # the best checkpoint and its score survive the kills
    best = list((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1, best
    state = torch.load(best[0], map_location="cpu", weights_only=True)["callbacks"]
    score = next(v["best_model_score"] for k, v in state.items() if k.startswith("ModelCheckpoint"))
    assert float(score) == pytest.approx(val["val/dice"].max(), abs=1e-6)
    final_metrics = json.loads((run / "final_metrics.json").read_text())
    assert final_metrics["best/val_dice"] == pytest.approx(val["val/dice"].max(), abs=1e-6)
    # the time-to-accuracy record agrees with the surviving log
    summary = json.loads((run / "time_to_accuracy.json").read_text())
    for threshold, record in summary["reached"].items():
        first = val[val["val/dice"] >= float(threshold)].iloc[0]
        assert record["step"] == first["step"] + 1
        assert record["train_s"] == pytest.approx(first["time/train_s"], abs=1e-3)
    # in place: Lightning reloads the checkpoint callback's state, without its changed-dir warning
    for attempt in (1, 2):
        assert not any(w in (tmp_path / f"launch{attempt}.log").read_text() for w in RELOAD_WARNINGS)
    assert not any(w in final.stdout + final.stderr for w in RELOAD_WARNINGS)
    assert not list(run.rglob("*.tmp"))


def test_sigterm_writes_a_loadable_last_checkpoint_and_the_run_continues(tmp_path):
    run = tmp_path / "run"
    # no validation and no timed checkpoint: only the SIGTERM can write last.ckpt
    command = train_command(
        tmp_path,
        run,
        "trainer.max_epochs=1000",
        "trainer.check_val_every_n_epoch=1000",
        "checkpoint_every_min=60",
        "trainer.log_every_n_steps=1",
    )
    process = launch(command, tmp_path / "launch.log")
    try:
        wait_for(lambda: steps_reached(run) >= 3, process, 120, "three training steps")
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert status == 128 + signal.SIGTERM, (tmp_path / "launch.log").read_text()[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)  # whole, plain data
    assert checkpoint["global_step"] > 0
    assert checkpoint["global_step"] == steps_reached(run)  # no step lost
    assert "ckpt_path=last" in (tmp_path / "launch.log").read_text()  # says how to continue

    # the same command continues it to a (now nearer) end
    epochs = checkpoint["epoch"] + 2
    steps_per_epoch = len(json.loads((run / "split.json").read_text())["train"])
    done = subprocess.run(
        [*command, f"trainer.max_epochs={epochs}", "ckpt_path=last"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoint_step(last) == epochs * steps_per_epoch
    log = pd.read_csv(run / "csv" / "metrics.csv").dropna(subset=["train/loss_step"])
    assert list(log["step"]) == list(range(epochs * steps_per_epoch))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A two-epoch run on the tiny task, trained in this process into `<tmp>/run`."""
    tmp = tmp_path_factory.mktemp("finished")
    train(compose_config(tmp, [*tiny_synthetic_overrides(), "trainer.max_epochs=2"]))
    return tmp / "run"


def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of a run dir, with its modification time and content (Hydra's own files aside)."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"
    }


def test_a_resume_that_changes_the_split_stops_and_names_the_key(finished_run, tmp_path):
    before = snapshot(finished_run)
    data = finished_run.parent
    result = subprocess.run(
        [
            *train_command(data, finished_run, "trainer.max_epochs=3", "ckpt_path=last", "data.split_seed=1"),
            "model.width=8",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "data.split_seed: 0 -> 1" in output and "model.width: 4 -> 8" in output, output[-3000:]
    assert snapshot(finished_run) == before  # stopped before writing anything


def test_ckpt_path_last_without_a_checkpoint_names_the_missing_file(tmp_path):
    cfg = compose_config(tmp_path, [*tiny_synthetic_overrides(), "ckpt_path=last"])
    with pytest.raises(UserError, match=str(tmp_path / "run" / "checkpoints" / "last.ckpt")):
        train(cfg)


def test_a_fork_into_a_new_dir_leaves_the_old_run_untouched(finished_run, tmp_path):
    before = snapshot(finished_run)
    old_last = finished_run / "checkpoints" / "last.ckpt"
    cfg = compose_config(
        tmp_path,
        [*tiny_synthetic_overrides(), "trainer.max_epochs=3", f"ckpt_path={old_last}"],
        data_dir=finished_run.parent / "data",
    )
    _, objects = train(cfg)
    assert snapshot(finished_run) == before
    fork = tmp_path / "run"
    assert objects["trainer"].global_step == checkpoint_step(fork / "checkpoints" / "last.ckpt")
    assert checkpoint_step(fork / "checkpoints" / "last.ckpt") > checkpoint_step(old_last)
    assert len(list((fork / "checkpoints").glob("best-*.ckpt"))) == 1  # its own best, in its own dir
    val = pd.read_csv(fork / "csv" / "metrics.csv").dropna(subset=["val/dice"])
    assert list(val["epoch"]) == [2]  # its own log, from where the checkpoint was
    assert json.loads((fork / "split.json").read_text()) == json.loads(
        (finished_run / "split.json").read_text()
    )


def test_resume_in_place_continues_the_log_and_the_wandb_run(tmp_path):
    overrides = [*tiny_synthetic_overrides(), "logger=wandb", "logger.wandb.group=test"]
    train(compose_config(tmp_path, [*overrides, "trainer.max_epochs=1"]))
    run = tmp_path / "run"
    first_rows = pd.read_csv(run / "csv" / "metrics.csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(compose_config(tmp_path, [*overrides, "trainer.max_epochs=2", "ckpt_path=last"]))
    assert not [w for w in caught if any(s in str(w.message) for s in RELOAD_WARNINGS)]
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]

    log = pd.read_csv(run / "csv" / "metrics.csv")
    pd.testing.assert_frame_equal(log.iloc[: len(first_rows)][first_rows.columns], first_rows)
    assert list(log.dropna(subset=["val/dice"])["epoch"]) == [0, 1]
    assert log.dropna(subset=["train/loss_step"])["step"].is_unique
    # one W&B run, continued: both launches' offline files carry the stored id
    run_id = (run / "wandb" / "run_id").read_text().strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline)
    # the split came back from the checkpoint
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert split_in_checkpoint(last) == json.loads((run / "split.json").read_text())


def test_every_end_of_a_resumed_run_leaves_last_checkpoint_at_its_final_step(tmp_path):
    """Validation every second epoch (as on hippocampus): a run that stops after an epoch without
    validation, or in the middle of one, has no validation to write last.ckpt at its last step."""
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    every_batch = "checkpoint_every_min=0.00001"  # a timed save at every batch end that may save
    common = [
        *tiny_synthetic_overrides(),
        "trainer.check_val_every_n_epoch=2",
        "trainer.log_every_n_steps=1",
        "callbacks.val_images.count=0",
    ]

    def fit(*overrides: str) -> int:
        resume = ["ckpt_path=last"] if last.is_file() else []
        _, objects = train(compose_config(tmp_path, [*common, *overrides, *resume]))
        return objects["trainer"].global_step

    # what a kill leaves: last.ckpt from a timed save in on_train_batch_end, in the middle of an epoch
    assert fit("trainer.max_steps=2", every_batch) == 2
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert (checkpoint["global_step"], progress["ready"], progress["completed"]) == (2, 2, 1)

    n = len(json.loads((run / "split.json").read_text())["train"])  # steps per epoch: one volume each
    ends = [
        # max_steps in the middle of epoch 2, no timed save due since epoch 1's validation
        (2 * n + 2, [f"trainer.max_steps={2 * n + 2}", "checkpoint_every_min=60"]),
        # max_steps at the end of epoch 2, which has no validation (the timed save skips its last batch)
        (3 * n, [f"trainer.max_steps={3 * n}", every_batch]),
        # max_epochs, at the end of epoch 4 (validation after epoch 3)
        (5 * n, ["trainer.max_steps=-1", "trainer.max_epochs=5", every_batch]),
    ]
    for final, overrides in ends:
        assert fit(*overrides) == final
        assert checkpoint_step(last) == final, overrides

    log = pd.read_csv(run / "csv" / "metrics.csv")
    # each resume continued at the step its checkpoint holds: every step once, none twice or skipped
    assert list(log.dropna(subset=["train/loss_step"])["step"]) == list(range(5 * n))
    assert list(log.dropna(subset=["val/dice"])["epoch"]) == [1, 3]


# -- the parts, alone ------------------------------------------------------------------------------


class _NeverBetter(BoringModel):
    def validation_step(self, batch, batch_idx):
        self.log("val/x", -float(self.current_epoch))  # mode=max: only the first validation is best


def _boring_trainer(root: Path, checkpoint: ResumableCheckpoint, max_epochs: int = 3) -> Trainer:
    return Trainer(
        default_root_dir=root,
        max_epochs=max_epochs,
        limit_train_batches=4,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
    )


def _checkpoint(root: Path, every_min: float | None) -> ResumableCheckpoint:
    return ResumableCheckpoint(
        dirpath=root / "checkpoints", monitor="val/x", mode="max", save_last=True, every_min=every_min
    )


def test_last_checkpoint_is_written_at_every_validation_and_every_interval(tmp_path):
    # every validation, improved or not (Lightning alone would leave last.ckpt at the first one)
    trainer = _boring_trainer(tmp_path / "a", _checkpoint(tmp_path / "a", None))
    trainer.fit(_NeverBetter())
    assert checkpoint_step(tmp_path / "a" / "checkpoints" / "last.ckpt") == 12

    # every interval during training: here after every step but an epoch's last (validation follows)
    written = []
    checkpoint = _checkpoint(tmp_path / "b", 1e-9)
    trainer = _boring_trainer(tmp_path / "b", checkpoint)
    save = trainer.save_checkpoint

    def spy(path, *args, **kwargs):
        written.append((Path(path).name, trainer.global_step))
        return save(path, *args, **kwargs)

    trainer.save_checkpoint = spy
    trainer.fit(_NeverBetter())
    assert [step for name, step in written if name == "last.ckpt"] == list(range(1, 13))
    assert [name for name, _ in written if name != "last.ckpt"] == ["epoch=0-step=4.ckpt"]
    assert checkpoint.best_model_path.endswith("epoch=0-step=4.ckpt")  # timed saves leave the top k alone


class _AlwaysBetter(BoringModel):
    def validation_step(self, batch, batch_idx):
        self.log("val/x", float(self.current_epoch))  # mode=max: every validation is a new best


def test_a_replaced_best_is_removed_only_after_last_checkpoint_names_its_successor(tmp_path):
    trainer = _boring_trainer(tmp_path, _checkpoint(tmp_path, None))
    folder, seen = tmp_path / "checkpoints", []
    save = trainer.save_checkpoint

    def spy(path, *args, **kwargs):
        save(path, *args, **kwargs)
        seen.append((Path(path).name, sorted(p.name for p in folder.iterdir())))

    trainer.save_checkpoint = spy
    trainer.fit(_AlwaysBetter())
    best = ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt"]
    assert seen[2] == ("epoch=1-step=8.ckpt", [best[0], best[1], "last.ckpt"])  # the old best is kept...
    assert seen[3] == ("last.ckpt", [best[0], best[1], "last.ckpt"])  # ...until last.ckpt is written
    assert sorted(p.name for p in folder.iterdir()) == [best[2], "last.ckpt"]  # then it goes


# a bare Trainer resuming in its own dir: the warning train() filters around a resume in place
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_resume_in_place_removes_checkpoints_its_state_does_not_know(tmp_path):
    first = _checkpoint(tmp_path, None)
    _boring_trainer(tmp_path, first, max_epochs=1).fit(_NeverBetter())
    last = tmp_path / "checkpoints" / "last.ckpt"
    # a best checkpoint written after last.ckpt by a run killed before it could write last.ckpt again
    stray = tmp_path / "checkpoints" / "epoch=1-step=8.ckpt"
    stray.write_bytes(last.read_bytes())
    again = _checkpoint(tmp_path, None)
    _boring_trainer(tmp_path, again, max_epochs=2).fit(_NeverBetter(), ckpt_path=last)
    assert not stray.exists()
    assert again.best_model_path == first.best_model_path and Path(first.best_model_path).is_file()
    assert checkpoint_step(last) == 8


class _FailsHalfWay:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_a_failed_checkpoint_write_leaves_the_previous_file_whole(tmp_path):
    io_plugin, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io_plugin.save_checkpoint({"global_step": 1}, path)
    with pytest.raises(RuntimeError, match="disk full"):  # the write fails half-way
        io_plugin.save_checkpoint({"global_step": 2, "state": _FailsHalfWay()}, path)
    assert torch.load(path, weights_only=True) == {"global_step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_csv_log_continues_before_the_checkpoint_step(tmp_path):
    folder = tmp_path / "csv"
    folder.mkdir()
    rows = "".join(f"{s // 5},{s},{0.1 * s}\n" for s in range(8))
    (folder / "metrics.csv").write_text("epoch,step,train/loss_step\n" + rows + "1,8,0.")  # a kill mid-row
    logger = ResumableCSVLogger(tmp_path, name="", version="csv", flush_logs_every_n_steps=1)
    logger.continue_before(5)
    logger.log_metrics({"train/loss_step": 0.55, "epoch": 1}, step=5)
    logger.log_metrics({"val/dice": 0.5, "epoch": 1}, step=5)  # a new column: the file is rewritten
    log = pd.read_csv(folder / "metrics.csv")
    assert list(log["step"]) == [0, 1, 2, 3, 4, 5, 5]
    assert log["train/loss_step"].iloc[4] == pytest.approx(0.4) and log["val/dice"].iloc[-1] == 0.5
    assert [p.name for p in folder.iterdir()] == ["metrics.csv"]


def test_resume_picks_the_newest_of_last_and_a_slurm_hpc_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name, step, age in (("checkpoints/last.ckpt", 10, 60), ("hpc_ckpt_1.ckpt", 12, 0)):
        torch.save({"global_step": step, "hyper_parameters": {"run_config": {}}}, run / name)
        os.utime(run / name, (time.time() - age, time.time() - age))
    resume = find_checkpoint("last", run)
    assert resume.path == run / "hpc_ckpt_1.ckpt" and resume.global_step == 12 and resume.in_place
    with pytest.raises(UserError, match="ckpt_path=last"):  # a new run may not overwrite it
        find_checkpoint(None, run)
    # a requeued SLURM job (same command, no ckpt_path) continues its run
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert find_checkpoint(None, run).path == run / "hpc_ckpt_1.ckpt"
    (run / "hpc_ckpt_1.ckpt").unlink()
    assert find_checkpoint(None, run).path == run / "checkpoints" / "last.ckpt"
    # a checkpoint of another dir is a fork
    assert not find_checkpoint(str(run / "checkpoints" / "last.ckpt"), tmp_path / "other").in_place
