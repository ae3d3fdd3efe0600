"""A learning-rate schedule that knows the run's budget: "Budgeted Training" (Li et al., ICLR 2020) finds
decaying the rate linearly (or by nnU-Net's poly) to zero exactly at the budget's end beats a constant rate
and schedules tuned for another length. Torch's schedulers count steps or epochs only, hence a callback."""

import logging
import math

from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import Timer

from lightning_seg.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("constant", "linear", "poly")


class BudgetSchedule(Callback):
    """Before every training step, sets each parameter group's rate to its initial rate times `decay(p)`:
    `constant` 1, `linear` 1 - p, `poly` (1 - p) ** power, p in [0, 1] the share used of the budget that stops
    the run: `max_time` (Lightning's Timer, validation included) or the steps of `max_steps` / `max_epochs`.
    Resumes continue it. Put it before LearningRateMonitor, which then logs the step's rate."""

    def __init__(self, kind: str = "constant", power: float = 0.9) -> None:
        if kind not in KINDS:
            raise ConfigError(f"the learning-rate schedule must be one of {', '.join(KINDS)}, got '{kind}'")
        self.kind, self.power = kind, power

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.kind == "constant":
            return
        timer = self._timer(trainer)  # whichever budget ends first ends the decay
        budget = [f"max_time ({timer.time_remaining():.0f} s)"] if timer else []
        if math.isfinite(trainer.estimated_stepping_batches):
            budget.append(f"{trainer.estimated_stepping_batches} steps")
        if not budget:
            raise ConfigError(
                f"a {self.kind} learning-rate schedule needs a budget: set trainer.max_time, "
                "trainer.max_steps or trainer.max_epochs"
            )
        log.info("learning rate: %s decay to zero over %s", self.kind, " or ".join(budget))
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])  # saved with the optimizer: a resume keeps it

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx) -> None:
        if self.kind == "constant":
            return
        factor = self.decay(self.progress(trainer))
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor

    def decay(self, progress: float) -> float:
        remaining = 1.0 - min(max(progress, 0.0), 1.0)
        return remaining if self.kind == "linear" else remaining**self.power

    def progress(self, trainer: Trainer) -> float:
        """Share of the budget used: the larger of the clock's and the step count's."""
        shares = [0.0]
        if timer := self._timer(trainer):
            elapsed = timer.time_elapsed()
            shares.append(elapsed / (elapsed + timer.time_remaining()))
        total_steps = trainer.estimated_stepping_batches
        if math.isfinite(total_steps) and total_steps > 0:
            shares.append(trainer.global_step / total_steps)
        return max(shares)

    @staticmethod
    def _timer(trainer: Trainer) -> Timer | None:
        # Lightning adds a Timer when max_time is set
        timers = (c for c in trainer.callbacks if isinstance(c, Timer))
        return next((t for t in timers if t.time_remaining() is not None), None)
