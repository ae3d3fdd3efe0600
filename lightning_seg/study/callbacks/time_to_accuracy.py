"""Time-to-accuracy: when did validation Dice first reach each target?"""

from collections.abc import Sequence
from pathlib import Path

from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.loggers import WandbLogger

from lightning_seg.errors import TrainingDiverged
from lightning_seg.run_dir import write_json
from lightning_seg.study.callbacks.training_clock import TrainingClock


class TimeToAccuracy(Callback):
    """Records the first training time (validation excluded), wall time, step and epoch at which `monitor`
    reaches each threshold, in `path` after every validation and in the W&B run summary; stops training
    once `stop_at` is reached (as MLPerf's 3D U-Net does). Needs the TrainingClock callback."""

    def __init__(
        self, thresholds: Sequence[float], path: str, monitor: str = "val/dice", stop_at: float | None = None
    ) -> None:
        self.thresholds = sorted(float(t) for t in thresholds)
        self.path, self.monitor, self.stop_at = Path(path), monitor, stop_at
        self.reached: dict[str, dict] = {}
        self.best = float("-inf")
        self.diverged: dict | None = None  # where the loss or weights turned non-finite: the report counts it

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        clock = next((c for c in trainer.callbacks if isinstance(c, TrainingClock)), None)
        if clock is None:
            raise RuntimeError("TimeToAccuracy needs the TrainingClock callback (callbacks.training_clock)")
        value = float(trainer.callback_metrics[self.monitor])
        self.best = max(self.best, value)
        for threshold in self.thresholds:
            if value >= threshold and f"{threshold:g}" not in self.reached:
                self.reached[f"{threshold:g}"] = {
                    # the figures the clock logged with this validation (it runs again once it ends)
                    "train_s": clock.validated_at_train_s,
                    "wall_s": clock.wall_s,
                    "step": trainer.global_step,
                    "epoch": trainer.current_epoch,
                    self.monitor: value,
                }
        if trainer.is_global_zero:
            self._write(trainer)
        if self.stop_at is not None and value >= self.stop_at:
            trainer.should_stop = True

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # a diverged run is a result of the study, also one that never validated
        if isinstance(exception, TrainingDiverged) and trainer.is_global_zero:
            where = {"step": trainer.global_step, "epoch": trainer.current_epoch}
            self.diverged = {**where, "error": str(exception)}
            self._write(trainer)

    def _write(self, trainer: Trainer) -> None:
        # what the report and dashboard read
        keys = ("monitor", "thresholds", "stop_at", "best", "reached", "diverged")
        write_json(self.path, {key: getattr(self, key) for key in keys})
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                summary = logger.experiment.summary
                summary["best/val_dice"] = self.best
                if self.diverged:
                    summary["diverged_at_step"] = self.diverged["step"]
                for threshold, record in self.reached.items():
                    for key in ("train_s", "wall_s", "step"):
                        summary[f"time_to_dice/{threshold}/{key}"] = record[key]

    def state_dict(self) -> dict:
        return {"reached": self.reached, "best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.reached, self.best = state_dict["reached"], state_dict["best"]
