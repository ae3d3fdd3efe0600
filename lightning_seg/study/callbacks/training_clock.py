"""Training time that excludes validation, logged with every validation."""

import time
from typing import Any

from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.trainer.states import TrainerFn


class TrainingClock(Callback):
    """Logs `time/train_s` (training only, accumulated across resumes) and `time/wall_s` (including
    validation) at the end of each validation during fit. Lightning's `Timer` counts validation inside
    its "train" stage and restarts on resume, hence this small clock; its state is saved in checkpoints."""

    def __init__(self) -> None:
        self.train_s = 0.0  # finished training segments
        self.wall_s = 0.0  # at the last validation (logged as time/wall_s)
        self.validated_at_train_s = 0.0  # time/train_s as logged at the last validation
        self._segment_start: float | None = None
        self._fit_start: float | None = None
        self._wall_at_fit_start = 0.0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                # W&B plots validation curves against training time, not steps
                logger.experiment.define_metric("time/train_s")
                logger.experiment.define_metric("val/*", step_metric="time/train_s")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = self._segment_start = time.perf_counter()
        self._wall_at_fit_start = self.wall_s

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._segment_start is not None:  # pause: validation is not training
            self.train_s += time.perf_counter() - self._segment_start
            self._segment_start = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and self._fit_start is not None:
            self._segment_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self._fit_start is None:
            return
        self.wall_s, self.validated_at_train_s = self.wall_seconds(), self.train_seconds()
        # under DDP: the mean of the processes' clocks, which differ by the last step's sync at most
        pl_module.log("time/train_s", self.validated_at_train_s, sync_dist=True)
        pl_module.log("time/wall_s", self.wall_s, sync_dist=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.train_s = self.train_seconds()
        self._segment_start = None

    def train_seconds(self) -> float:
        running = time.perf_counter() - self._segment_start if self._segment_start is not None else 0.0
        return self.train_s + running

    def wall_seconds(self) -> float:
        if self._fit_start is None:
            return self.wall_s
        return self._wall_at_fit_start + time.perf_counter() - self._fit_start

    def state_dict(self) -> dict[str, Any]:
        # both clocks as of the save: a checkpoint between validations resumes them there
        return {"train_s": self.train_seconds(), "wall_s": self.wall_seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_s, self.wall_s = state_dict["train_s"], state_dict["wall_s"]
