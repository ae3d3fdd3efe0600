"""Mixed-precision watch: the fp16 loss scale, steps the grad scaler skipped, and a stop for a loss that
stays non-finite."""

import math
from collections.abc import Mapping

import torch
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_seg.errors import UserError
from lightning_seg.model.module import SegmentationModule, grad_scaler, loss_scale


class NonFiniteLossError(UserError):
    """Training diverged (NaN/inf loss or weights); stopped before a checkpoint could hold the damage."""


def weights_finite(module: torch.nn.Module) -> bool:
    checks = [torch.isfinite(p).all() for p in module.parameters()]
    return bool(torch.stack(checks).all()) if checks else True  # one host sync


class AmpGuard(Callback):
    """Under fp16 AMP, logs `train/loss_scale` (the grad scaler's scale after each step) and
    `train/amp_skipped_steps` (steps whose optimizer update the scaler skipped for inf/NaN gradients,
    counted across resumes; the module records each skip and keeps step-interval LR schedulers from
    advancing on it). Without a grad scaler neither is logged.

    For every precision: a training loss that stays non-finite for `max_nonfinite_steps` consecutive
    steps stops the run with NonFiniteLossError, naming the step where it started and suggesting another
    precision; and no checkpoint is ever written from non-finite weights (a save raises the same error
    first), so the last good checkpoint on disk stays as it was.
    """

    def __init__(self, max_nonfinite_steps: int = 20) -> None:
        if max_nonfinite_steps < 1:
            raise ValueError(f"callbacks.amp_guard.max_nonfinite_steps={max_nonfinite_steps}: must be >= 1")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.skipped_steps: torch.Tensor | int = 0  # a device tensor while training: no sync per step
        self.nonfinite_steps = 0  # consecutive, up to the last step
        self.nonfinite_since: dict | None = None  # where the current run of non-finite losses started
        self._step = 0
        self._epoch = 0

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: SegmentationModule, batch, batch_idx: int
    ) -> None:
        self._step, self._epoch = trainer.global_step, trainer.current_epoch

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: SegmentationModule, outputs, batch, batch_idx: int
    ) -> None:
        scaler = grad_scaler(trainer)
        if scaler is not None:
            skipped = pl_module.amp_step_skipped
            if skipped is not None:
                self.skipped_steps = self.skipped_steps + skipped
            pl_module.log("train/loss_scale", loss_scale(scaler), on_step=True, on_epoch=False, batch_size=1)
            pl_module.log(
                "train/amp_skipped_steps",
                torch.as_tensor(self.skipped_steps, dtype=torch.float32),
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )
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
        if not weights_finite(pl_module):
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
        last = next(
            (
                c.last_model_path or c.best_model_path
                for c in trainer.callbacks
                if isinstance(c, ModelCheckpoint)
            ),
            "",
        )
        kept = f"; the last checkpoint is {last}" if last else "; no checkpoint was written"
        lr = "a lower learning rate (optimizer.optimizer.lr)"
        if trainer.precision == "32-true":
            advice = f"Under precision 32-true (fp32 already), check the inputs for NaN/inf, or try {lr}"
        else:
            others = "precision=32" if trainer.precision == "bf16-mixed" else "precision=bf16 or precision=32"
            advice = f"Under precision {trainer.precision}, try {others}, or {lr}"
        return f"{start}{what}{kept}. {advice}"

    def state_dict(self) -> dict:
        return {"skipped_steps": int(self.skipped_steps)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)
