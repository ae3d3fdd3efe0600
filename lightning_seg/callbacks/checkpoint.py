"""Checkpoints a killed run resumes from: last.ckpt at every validation and every few minutes."""

import logging
import os
import time
from pathlib import Path
from typing import Any

from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lightning_seg.checkpoint_io import AtomicCheckpointIO

log = logging.getLogger(__name__)


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint ranks the best checkpoints by the monitor; this subclass writes `last.ckpt`
    itself, through public hooks and `trainer.save_checkpoint`, so that a killed run loses little: at every
    validation, improved or not (Lightning 2.6 rewrites it only with a new top k), every `every_min` minutes
    of training, at the run's last step (max_steps, max_time, an epoch without validation) and on SIGTERM,
    but not during a validation (Lightning resumes a mid-validation checkpoint by skipping that validation).
    Loggers are flushed before any checkpoint; a replaced best is deleted once `last.ckpt` names its
    successor (`AtomicCheckpointIO` holds the removal). Atomic writes: `AtomicCheckpointIO`."""

    @property
    def state_key(self) -> str:
        # Lightning keys a callback's state by its class name: ModelCheckpoint's key, so best score and
        # paths load from checkpoints written before this subclass existed
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def __init__(self, *args: Any, save_last: bool | None = None, every_min: float | None = None, **kwargs):
        if save_last == "link":
            raise ValueError(
                "save_last='link' would point last.ckpt at an older checkpoint: use save_last=true"
            )
        super().__init__(*args, save_last=False, **kwargs)  # Lightning's last.ckpt policy stays off
        if every_min is not None and every_min <= 0:
            raise ValueError(f"checkpoint_every_min must be positive or null, got {every_min}")
        self.writes_last = bool(save_last)
        self.every_s = None if every_min is None else float(every_min) * 60.0
        self.last_written_at = time.monotonic()
        self.last_written_step: int | None = None
        self.top_k_written: tuple = ()
        self.last_after_epoch = False
        self.resumed_in_place = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.last_written_at = time.monotonic()
        self.top_k_written = self._top_k()
        if self.resumed_in_place and trainer.is_global_zero:
            self._remove_unknown_checkpoints(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._may_save(trainer):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch and not self._top_k_changed():
            return  # validation or the epoch end comes next; a SIGTERM is handled in on_exception
        # a stop mid-epoch (max_steps, max_time): no validation follows, and Lightning resumes a
        # checkpoint of this hook exactly as a timed one
        timed = self.every_s is not None and time.monotonic() - self.last_written_at >= self.every_s
        due = _stops(trainer) or trainer.received_sigterm or timed
        if trainer.world_size > 1:  # one decision for all processes: saving is collective
            due = trainer.strategy.broadcast(due)
        if (due and self.last_written_step != trainer.global_step) or self._top_k_changed():
            self._write_last(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._may_save(trainer):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self.last_after_epoch = True  # Lightning may rank this validation at the epoch's end
        else:
            self._write_last(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self._may_save(trainer):
            return
        # a run ending after an epoch without validation: here, not on the epoch's last batch (Lightning
        # resumes that one without counting the next epoch's start) nor in on_train_end (resumed with
        # max_steps, that one skips the next epoch); without validation at all, every epoch end
        unwritten = self.last_written_step != trainer.global_step
        ends = unwritten and (_stops(trainer, epoch_end=True) or not trainer.enable_validation)
        if self.last_after_epoch or ends or self._top_k_changed():
            self._write_last(trainer)
        self.last_after_epoch = False

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        sigterm = isinstance(exception, SIGTERMException) and self._may_save(trainer)
        if sigterm and trainer.global_step not in (0, self.last_written_step):
            if trainer.validating:
                log.warning(
                    f"SIGTERM during validation: last.ckpt stays at step {self.last_written_step}, "
                    f"written {time.monotonic() - self.last_written_at:.0f} s before"
                )
            else:
                log.info("SIGTERM: writing last.ckpt at step %d before stopping", trainer.global_step)
                self._write_last(trainer)
        self._release_removals(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._release_removals(trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # every row logged so far is on disk before the checkpoint
                logger.save()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        io = trainer.strategy.checkpoint_io
        # a replaced best stays until last.ckpt, which names its successor, is written: a kill in
        # between leaves an extra file (removed on resume), never a state pointing at a deleted one
        if self.writes_last and isinstance(io, AtomicCheckpointIO):
            io.hold_removals = True

    def _write_last(self, trainer: Trainer) -> None:
        if not self.writes_last:
            return
        # named before the save: the path is part of the state it saves
        self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        trainer.save_checkpoint(self.last_model_path, self.save_weights_only)
        self.last_written_at = time.monotonic()
        self.last_written_step = trainer.global_step
        self.top_k_written = self._top_k()
        self._release_removals(trainer)

    def _release_removals(self, trainer: Trainer) -> None:
        io = trainer.strategy.checkpoint_io
        if isinstance(io, AtomicCheckpointIO):
            io.release_removals(keep={*self.best_k_models, self.best_model_path, self.last_model_path})

    def _top_k(self) -> tuple:
        return (*self.best_k_models, self.best_model_path)

    def _top_k_changed(self) -> bool:
        """Whether Lightning saved a checkpoint of the top k since `last.ckpt` was written."""
        return self.writes_last and self._top_k() != self.top_k_written

    @staticmethod
    def _may_save(trainer: Trainer) -> bool:
        return not (trainer.fast_dev_run or trainer.sanity_checking) and trainer.state.fn == TrainerFn.FITTING

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dir = state_dict.get("dirpath")
        same = saved_dir and self.dirpath and os.path.realpath(saved_dir) == os.path.realpath(self.dirpath)
        self.resumed_in_place = bool(same)
        if same:  # the same folder spelled differently (relative, through a symlink) is the same folder
            super().load_state_dict({**state_dict, "dirpath": self.dirpath})
        else:  # a new run from another run's checkpoint ranks its own checkpoints, in its own folder
            log.info(
                "checkpoint from %s: best checkpoint tracking starts anew in %s", saved_dir, self.dirpath
            )

    def _remove_unknown_checkpoints(self, trainer: Trainer) -> None:
        """After a resume in place: delete the checkpoints the restored state does not know, written
        after the checkpoint this run resumed from (a best replaced, a kill before last.ckpt followed)."""
        tracked = [*self.best_k_models, self.best_model_path, self.last_model_path, trainer.ckpt_path]
        known = {os.path.realpath(p) for p in tracked if p}
        for path in Path(self.dirpath).glob(f"*{self.FILE_EXTENSION}"):
            if path.name.startswith(self.CHECKPOINT_NAME_LAST) or os.path.realpath(path) in known:
                continue
            log.info("removing %s: written after the checkpoint this run resumes from", path)
            path.unlink(missing_ok=True)


def _stops(trainer: Trainer, epoch_end: bool = False) -> bool:
    """Whether fit stops after this training batch, or (`epoch_end`) after this epoch: the fit loop's own
    tests, on the Trainer's public limits (max_time's Timer has set should_stop before this callback runs)."""
    epochs_done = trainer.fit_loop.epoch_progress.current.processed
    minimum_met = epochs_done >= (trainer.min_epochs or 0) and trainer.global_step >= (trainer.min_steps or 0)
    return (
        _reached(trainer.global_step, trainer.max_steps)
        or (trainer.should_stop and minimum_met)
        or (epoch_end and _reached(epochs_done, trainer.max_epochs))
    )


def _reached(count: int, limit: int | None) -> bool:
    return limit is not None and limit != -1 and count >= limit  # Lightning's -1 and None: no limit
