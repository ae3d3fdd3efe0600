"""Mixed-precision watch: the fp16 loss scale, steps the grad scaler skipped, and a stop for a loss that
stays non-finite."""

import math
from collections.abc import Mapping

import torch
from pytorch_lightning import Callback, Trainer

from lightning_seg.errors import TrainingDiverged
from lightning_seg.model.module import SegmentationModule, grad_scaler, loss_scale

# the cause found for bf16 on CPUs, named where it may be the one (model/cpu_bf16.py works around it)
CPU_BF16_FINDING = (
    "On a CPU without AMX, oneDNN's bf16 Conv3d weight gradient returns garbage (NaN) where a feature map is "
    "smaller than the kernel: such nn.Conv3d layers run in fp32 here, other convolution layers are not "
    "covered (docs/benchmarks/bf16_cpu_nan.md)"
)


class NonFiniteLossError(TrainingDiverged):
    """Training diverged (NaN/inf loss or weights); stopped before a checkpoint could hold the damage."""


class AmpGuard(Callback):
    """With a grad scaler (fp16 AMP), logs `train/loss_scale` and `train/amp_skipped_steps` (scaler updates
    skipped for inf/NaN gradients, counted across resumes; the module records each skip and keeps
    step-interval LR schedulers from advancing on it). For every precision, a loss non-finite for
    `max_nonfinite_steps` steps in a row stops the run with NonFiniteLossError; saving non-finite weights
    raises first, so the last good checkpoint on disk stays as it was."""

    def __init__(self, max_nonfinite_steps: int = 20) -> None:
        if max_nonfinite_steps < 1:
            raise ValueError(f"callbacks.amp_guard.max_nonfinite_steps={max_nonfinite_steps}: must be >= 1")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.skipped_steps: torch.Tensor | int = 0  # a device tensor while training: no sync per step
        self.nonfinite_steps = 0  # consecutive, up to the last step
        self.nonfinite_since: dict | None = None  # where the current run of non-finite losses started
        self._step = self._epoch = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: SegmentationModule, batch, batch_idx) -> None:
        self._step, self._epoch = trainer.global_step, trainer.current_epoch

    def on_train_batch_end(self, trainer: Trainer, pl_module: SegmentationModule, outputs, batch, batch_idx):
        if (scaler := grad_scaler(trainer)) is not None:
            if pl_module.amp_step_skipped is not None:
                self.skipped_steps = self.skipped_steps + pl_module.amp_step_skipped
            skipped = torch.as_tensor(self.skipped_steps, dtype=torch.float32)
            metrics = {"train/loss_scale": loss_scale(scaler), "train/amp_skipped_steps": skipped}
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        # one host sync per step (the progress bar and a non-fused GradScaler read every step's values too);
        # a step the module skipped (no loss) counts as finite
        value = float(loss.detach().float()) if isinstance(loss, torch.Tensor) else 0.0
        # the same decision in every process, so that under DDP all of them stop at the same step
        if trainer.strategy.reduce_boolean_decision(math.isfinite(value), all=True):
            self.nonfinite_steps, self.nonfinite_since = 0, None
            return
        if self.nonfinite_since is None:
            shown = str(value) if not math.isfinite(value) else "in another process"
            self.nonfinite_since = {"step": self._step, "epoch": self._epoch, "loss": shown}
        self.nonfinite_steps += 1
        if self.nonfinite_steps >= self.max_nonfinite_steps:
            raise NonFiniteLossError(self._message(trainer, f"for {self.nonfinite_steps} consecutive steps"))

    def on_save_checkpoint(self, trainer: Trainer, pl_module: SegmentationModule, checkpoint: dict) -> None:
        # runs before the file is written: raising here leaves the previous checkpoint on disk untouched
        checks = [torch.isfinite(p).all() for p in pl_module.parameters()]
        if checks and not bool(torch.stack(checks).all()):  # one host sync
            raise NonFiniteLossError(
                self._message(trainer, "and the weights are no longer finite; stopped before saving them")
            )

    def _message(self, trainer: Trainer, what: str) -> str:
        since = self.nonfinite_since
        start = (
            f"training loss non-finite ({since['loss']}) since step {since['step']} (epoch {since['epoch']}) "
            if since
            else f"training diverged at step {self._step} (epoch {self._epoch}) "
        )
        checkpoint = trainer.checkpoint_callback
        last = (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint else ""
        kept = f"; the last checkpoint is {last}" if last else "; no checkpoint was written"
        lr = "a lower learning rate (optimizer.optimizer.lr)"
        if trainer.precision == "32-true":
            advice = f"Under precision 32-true (fp32 already), check the inputs for NaN/inf, or try {lr}"
        else:
            others = "precision=32" if trainer.precision == "bf16-mixed" else "precision=bf16 or precision=32"
            advice = f"Under precision {trainer.precision}, try {others}, or {lr}"
        if trainer.precision == "bf16-mixed" and trainer.strategy.root_device.type == "cpu":
            advice += f". {CPU_BF16_FINDING}"
        return f"{start}{what}{kept}. {advice}"

    def state_dict(self) -> dict:
        return {"skipped_steps": int(self.skipped_steps)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)
