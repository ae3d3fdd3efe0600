"""The mixed-precision guard in real trainings: fp16 loss scale and skipped steps, a step-interval
scheduler that waits for real optimizer steps, and a stop for a loss that stays non-finite.

Real fp16 with a grad scaler needs a GPU for `precision=16` (Lightning runs bf16 on a CPU). The CPU
tests get genuine fp16 overflows anyway: Lightning's own MixedPrecision plugin, given as
`trainer.plugins` with fp16 autocast on the CPU and a GradScaler whose initial scale is too large,
so the first steps' scaled gradients overflow and the scaler skips them as it would on a GPU.
"""

import contextlib
import hashlib
import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import DictConfig, open_dict
from pytorch_lightning import Callback

from lightning_seg.errors import UserError
from lightning_seg.study.callbacks.amp_guard import NonFiniteLossError
from lightning_seg.training import train

from .conftest import compose_config, tiny_synthetic_overrides

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine"
)


def small_overrides() -> list[str]:
    """The tiny synthetic task (5 training steps per epoch) with a 16^3 patch: fp16 convolutions run
    slowly on a CPU."""
    return [
        *tiny_synthetic_overrides(),
        "model=monai_unet",
        "task.patch_size=[16,16,16]",
        "trainer.log_every_n_steps=1",
    ]


def with_fp16_grad_scaler(cfg: DictConfig, device: str, init_scale: float = 65536.0) -> DictConfig:
    """fp16 AMP with a grad scaler through Lightning's own plugin, beside the configured plugins (on a
    CPU too)."""
    plugin = {
        "_target_": "pytorch_lightning.plugins.MixedPrecision",
        "precision": "16-mixed",
        "device": device,
        "scaler": {"_target_": "torch.amp.GradScaler", "device": device, "init_scale": init_scale},
    }
    with open_dict(cfg):
        cfg.trainer.precision = None
        cfg.trainer.plugins = [*(cfg.trainer.get("plugins") or []), plugin]
    return cfg


def digest(path: Path) -> dict:
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "mtime_ns": path.stat().st_mtime_ns}


class PoisonImages(Callback):
    """From global step `from_step` on, every training image is NaN; when it starts, writes the state of
    the checkpoint files on disk to `record` (JSON)."""

    def __init__(self, from_step: int, checkpoints: str, record: str) -> None:
        self.from_step, self.checkpoints, self.record = from_step, Path(checkpoints), Path(record)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step < self.from_step:
            return
        if not self.record.exists():
            files = {p.name: digest(p) for p in sorted(self.checkpoints.glob("*.ckpt"))}
            self.record.write_text(json.dumps(files))
        batch["image"].fill_(float("nan"))


def poison(tmp_path: Path, from_step: int) -> list[str]:
    return [
        "+callbacks.poison._target_=tests.test_amp_guard.PoisonImages",
        f"+callbacks.poison.from_step={from_step}",
        f"+callbacks.poison.checkpoints={tmp_path / 'run' / 'checkpoints'}",
        f"+callbacks.poison.record={tmp_path / 'before_poison.json'}",
    ]


def assert_checkpoints_untouched_and_finite(tmp_path: Path, before_step: int) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    before = json.loads((tmp_path / "before_poison.json").read_text())
    assert "last.ckpt" in before
    assert {p.name: digest(p) for p in sorted(checkpoints.glob("*.ckpt"))} == before  # nothing rewritten
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] <= before_step
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    ("precision", "trainer_precision", "advice"),
    [
        ("32", "32-true", "Under precision 32-true (fp32 already), check the inputs for NaN/inf"),
        # on a CPU Lightning turns 16-mixed into bf16: no grad scaler, no loss-scale metrics
        ("16", "bf16-mixed", "Under precision bf16-mixed, try precision=32"),
        ("fp16_grad_scaler", "16-mixed", "Under precision 16-mixed, try precision=bf16 or precision=32"),
    ],
    ids=["fp32", "16_on_cpu_is_bf16", "fp16_with_grad_scaler"],
)
def test_a_loss_that_stays_non_finite_stops_the_run_and_keeps_the_last_checkpoint(
    tmp_path, synthetic_task_dir, precision, trainer_precision, advice
):
    overrides = [*small_overrides(), "trainer.max_epochs=3", "callbacks.amp_guard.max_nonfinite_steps=3"]
    if precision != "fp16_grad_scaler":
        overrides.append(f"precision={precision}")
    cfg = compose_config(
        tmp_path, [*overrides, *poison(tmp_path, from_step=6)], data_dir=synthetic_task_dir.parent
    )
    if precision == "fp16_grad_scaler":
        with_fp16_grad_scaler(cfg, "cpu")
    warns = pytest.warns(UserWarning, match="fp16 is not supported on CPU")
    with warns if precision == "16" else contextlib.nullcontext(), pytest.raises(NonFiniteLossError) as error:
        train(cfg)
    message = str(error.value)
    assert isinstance(error.value, UserError)
    # epoch 0 is steps 0-4 (checkpointed), the poison starts at step 6, the third bad step stops the run
    assert message.startswith("training loss non-finite (nan) since step 6 (epoch 1) for 3 consecutive steps")
    assert f"the last checkpoint is {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}" in message
    assert advice in message and trainer_precision in message
    # the open finding of bf16 autocast on a CPU is named where it may be the cause, and only there
    assert ("docs/benchmarks/bf16_cpu_nan.md" in message) == (trainer_precision == "bf16-mixed")
    assert_checkpoints_untouched_and_finite(tmp_path, before_step=5)
    logged = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    if trainer_precision == "16-mixed":
        skipped = logged.dropna(subset=["train/amp_skipped_steps"])
        # the scaler skipped the three NaN steps and halved the scale on each
        assert skipped["train/amp_skipped_steps"].iloc[-1] >= 2  # the last step's row may not be flushed
        assert skipped["train/loss_scale"].is_monotonic_decreasing
    else:
        assert not {"train/loss_scale", "train/amp_skipped_steps"} & set(logged)


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path, synthetic_task_dir):
    """The default patience (20 steps) outlasts the epoch: its checkpoint would hold NaN weights."""
    cfg = compose_config(
        tmp_path,
        [*small_overrides(), "trainer.max_epochs=3", *poison(tmp_path, from_step=6)],
        data_dir=synthetic_task_dir.parent,
    )
    with pytest.raises(
        NonFiniteLossError, match=r"since step 6 \(epoch 1\) and the weights are no longer finite"
    ):
        train(cfg)
    assert_checkpoints_untouched_and_finite(tmp_path, before_step=5)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])], ids=["cpu", "cuda"]
)
def test_steps_the_grad_scaler_skips_do_not_advance_a_step_scheduler(tmp_path, synthetic_task_dir, device):
    overrides = [
        *small_overrides(),
        f"hardware={'cpu' if device == 'cpu' else 'gpu'}",
        "optimizer.scheduler={_target_:torch.optim.lr_scheduler.LinearLR,_partial_:true,"
        "start_factor:1.0,end_factor:0.1,total_iters:100}",
        "optimizer.scheduler_interval=step",
        "trainer.max_epochs=2",
    ]
    cfg = compose_config(tmp_path, overrides, data_dir=synthetic_task_dir.parent)
    with_fp16_grad_scaler(cfg, device, init_scale=2.0**24)  # the first steps' scaled gradients overflow fp16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.precision == "16-mixed" and trainer.global_step == 10
    optimizer_steps = {int(state["step"]) for state in trainer.optimizers[0].state.values()}
    assert len(optimizer_steps) == 1
    [taken] = optimizer_steps
    skipped = trainer.global_step - taken
    assert 0 < skipped < trainer.global_step  # some steps overflowed, later ones trained
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == taken  # one scheduler step per real optimizer step
    assert not [w for w in caught if "lr_scheduler.step()` before `optimizer.step()" in str(w.message)]

    logged = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv").dropna(subset=["train/loss_scale"])
    assert logged["train/amp_skipped_steps"].iloc[-1] == skipped
    assert logged["train/loss_scale"].iloc[0] == 2.0**23  # halved after the first, skipped, step
    assert logged["train/loss_scale"].iloc[-1] == trainer.precision_plugin.scaler.get_scale()
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["callbacks"]["AmpGuard"] == {"skipped_steps": skipped}  # the count survives a resume


@pytest.mark.gpu
@needs_cuda
def test_precision_16_on_a_gpu_logs_the_loss_scale(tmp_path, synthetic_task_dir):
    cfg = compose_config(
        tmp_path,
        [*small_overrides(), "hardware=gpu", "precision=16", "trainer.max_epochs=1"],
        data_dir=synthetic_task_dir.parent,
    )
    _, objects = train(cfg)
    assert objects["trainer"].precision_plugin.scaler is not None
    logged = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv").dropna(subset=["train/loss_scale"])
    assert len(logged) == 5 and (logged["train/loss_scale"] > 0).all()
    assert (logged["train/amp_skipped_steps"] >= 0).all()
